"""DeepseekForCausalLM: target log-probs without the full log-softmax, gradient checkpointing, routing replay,
router-bias balancing, parameter names and tying."""

import pytest
import torch

from thinkzero.model.checkpoint import hf_views
from thinkzero.model.config import ModelConfig
from thinkzero.model.transformer import DeepseekForCausalLM


def ids(B, T, seed=0, vocab=70):  # conftest's SMALL_V3 vocabulary
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_target_logprobs_and_entropy_match_full_log_softmax(small_model, temperature):
    model = small_model()
    x, targets = ids(2, 11), ids(2, 11, seed=1)
    model.logprob_chunk_elems = 3 * 2 * model.config.vocab_size  # chunks of 3 positions: 4 chunks, the last short
    out = model(x, target_ids=targets, temperature=temperature, compute_entropy=True)
    assert out.logits is None
    logp = torch.log_softmax(model(x).logits.float() / temperature, dim=-1)  # (B, T, V) reference
    expected = logp.gather(-1, targets[..., None])[..., 0]
    expected_entropy = -(logp.exp() * logp).sum(-1)
    assert out.logprobs.shape == out.entropy.shape == (2, 11)
    assert torch.allclose(out.logprobs, expected, atol=1e-5)
    assert torch.allclose(out.entropy, expected_entropy, atol=1e-5)


def test_target_start_scores_only_the_asked_positions(small_model):
    model = small_model()
    x, targets = ids(2, 11), ids(2, 4, seed=1)
    out = model(x, target_ids=targets, target_start=6, compute_entropy=True)  # predictions made at positions 6..9
    logp = torch.log_softmax(model(x).logits.float(), dim=-1)[:, 6:10]  # (B, 4, V) reference
    assert out.logprobs.shape == out.entropy.shape == (2, 4)
    assert torch.allclose(out.logprobs, logp.gather(-1, targets[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(out.entropy, -(logp.exp() * logp).sum(-1), atol=1e-5)
    with pytest.raises(ValueError, match="must fit"):
        model(x, target_ids=targets, target_start=8)


def test_chunked_logprobs_gradients_match_direct(small_model):
    model = small_model()
    x, targets = ids(2, 9), ids(2, 9, seed=1)
    weights = torch.randn(2, 9)
    model.logprob_chunk_elems = 2 * 2 * model.config.vocab_size
    (model(x, target_ids=targets).logprobs * weights).sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logp = torch.log_softmax(model(x).logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    (logp * weights).sum().backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(chunked[n], p.grad, atol=1e-5), n
    assert "lm_head.weight" in chunked and chunked["lm_head.weight"].abs().sum() > 0


def test_lm_head_called_as_a_module_per_chunk(small_model):
    """ZeRO-3 gathers lm_head's weight in its forward hooks, so logprobs must go through the module call."""
    model = small_model()
    calls = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: calls.append(tuple(out.shape)))
    model.logprob_chunk_elems = 4 * 1 * model.config.vocab_size
    with torch.no_grad():
        model(ids(1, 10), target_ids=ids(1, 10, seed=1))
    assert calls == [(1, 4, 70), (1, 4, 70), (1, 2, 70)]


def test_gradient_checkpointing_same_loss_and_grads(small_model):
    model = small_model(aux_loss_alpha=0.01).train()
    x, targets = ids(2, 8), ids(2, 8, seed=1)

    def loss_and_grads():
        model.zero_grad()
        out = model(x, target_ids=targets)
        loss = -out.logprobs.mean() + out.aux_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for n in grads:
        assert torch.allclose(grads[n], grads_ckpt[n], atol=1e-5), n


def test_aux_loss_only_when_enabled_and_training(small_model):
    x = ids(2, 8)
    assert small_model().train()(x).aux_loss.item() == 0.0
    model = small_model(aux_loss_alpha=0.01)
    assert model.eval()(x).aux_loss.item() == 0.0
    out = model.train()(x)
    assert out.aux_loss.item() > 0 and out.aux_loss.requires_grad


@pytest.mark.parametrize("seq_aux", [True, False])
def test_aux_loss_ignores_padding(small_model, seq_aux):
    """Left padding neither dilutes nor skews the balance loss: what the pad tokens are does not matter, and (per
    sequence) a padded row counts as that row alone."""
    model = small_model(aux_loss_alpha=0.01, seq_aux=seq_aux).train()
    a, b = ids(1, 9, seed=1), ids(1, 6, seed=2)
    mask = torch.tensor([[1] * 9, [0] * 3 + [1] * 6])
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    other_pads = batch.clone()
    other_pads[1, :3] = torch.tensor([5, 17, 33])
    aux = model(batch, mask).aux_loss
    assert aux.item() > 0
    torch.testing.assert_close(model(other_pads, mask).aux_loss, aux)
    unmasked = model(batch).aux_loss  # the pads counted as tokens: a different value, so the check above can fail
    assert not torch.allclose(unmasked, aux)
    if seq_aux:
        torch.testing.assert_close(aux, (model(a).aux_loss + model(b).aux_loss) / 2)


def test_routing_replay_and_expert_counts(small_model):
    model = small_model()
    x = ids(2, 8)
    with torch.no_grad():
        first = model(x, return_routing=True)
        n_moe = len(model.moe_layers)
        assert len(first.routing) == len(first.expert_counts) == n_moe == 2
        for r, c in zip(first.routing, first.expert_counts):
            assert r.shape == (2, 8, 2) and c.shape == (8,) and c.sum() == 2 * 8 * 2
            assert torch.equal(torch.bincount(r.flatten(), minlength=8), c)
        # Moving the router bias changes the choice, but a replay of the recorded routing undoes that.
        for moe in model.moe_layers:
            moe.gate.e_score_correction_bias.copy_(torch.linspace(-1, 1, 8))
        moved = model(x, return_routing=True)
        assert any(not torch.equal(a, b) for a, b in zip(first.routing, moved.routing))
        replay = model(x, routing=first.routing, return_routing=True)
        assert torch.allclose(replay.logits, first.logits, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(replay.routing, first.routing))
        with pytest.raises(ValueError, match="routing has 1 entries; the model has 2 MoE layers"):
            model(x, routing=first.routing[:1])


def test_update_router_bias_moves_toward_balance(small_model):
    model = small_model()
    counts = [torch.tensor([10, 0, 2, 4, 4, 4, 4, 4]), torch.tensor([4] * 8)]
    before = [moe.gate.e_score_correction_bias.clone() for moe in model.moe_layers]
    model.update_router_bias(counts, gamma=0.1)
    after = [moe.gate.e_score_correction_bias for moe in model.moe_layers]
    assert torch.allclose(after[0] - before[0], torch.tensor([-0.1, 0.1, 0.1, 0, 0, 0, 0, 0]))  # mean load 4
    assert torch.equal(after[1], before[1])  # already balanced: unchanged
    with pytest.raises(ValueError, match="expert_counts has 1 entries"):
        model.update_router_bias(counts[:1], gamma=0.1)


def test_parameter_names_are_the_checkpoint_names(small_model):
    model = small_model(first_k_dense_replace=1, moe_layer_freq=2, q_lora_rank=None)
    names = set(model.state_dict())
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense
    assert "model.layers.1.mlp.up_proj.weight" in names  # dense: 1 % 2 != 0
    assert "model.layers.2.mlp.experts.gate_up_proj" in names  # stacked in memory, as transformers 5 does
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in hf_views(model.state_dict())  # per expert on disk
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.2.mlp.shared_experts.gate_proj.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("q_a_proj" in n or "rotary" in n or "inv_freq" in n for n in names)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names


def test_tied_embeddings_share_one_tensor(small_model):
    model = small_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_fresh_init_is_small_and_finite(small_config):
    torch.manual_seed(0)
    model = DeepseekForCausalLM(ModelConfig.from_dict(small_config))
    logits = model(ids(2, 6)).logits
    assert torch.isfinite(logits).all() and logits.abs().max() < 1.0
    assert all(
        n.endswith("norm.weight") == bool((p == 1).all())
        for n, p in model.named_parameters()
        if n.endswith("norm.weight")
    )


def test_positions_follow_the_mask_not_the_column(small_model):
    """Shifting a sequence right by padding does not change its logits (positions come from the mask)."""
    model = small_model()
    x = ids(1, 6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.allclose(model(padded, attention_mask=mask).logits[:, 3:], model(x).logits, atol=1e-5)
        # Without the mask the padding would count as context and positions would shift.
        assert not torch.allclose(model(padded).logits[:, 3:], model(x).logits, atol=1e-3)


def test_rms_norm_by_hand_fused_fp32_and_bf16_paths():
    from thinkzero.model.norm import RMSNorm

    norm = RMSNorm(2, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    # x = [3, 4]: rms = sqrt((9 + 16) / 2) = sqrt(12.5) = 3.5355; x / rms = [0.8485, 1.1314]; times w = [0.8485, 2.2627]
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    out = norm(x)  # fp32: the fused F.rms_norm path
    torch.testing.assert_close(out, torch.tensor([[3 / 12.5**0.5, 8 / 12.5**0.5]]))
    # Same values and gradients as the written-out formula.
    y = torch.randn(5, 7, 16, requires_grad=True)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(16))
    formula = norm.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6))
    fused = norm(y)
    torch.testing.assert_close(fused, formula)
    g = torch.randn_like(fused)
    torch.testing.assert_close(torch.autograd.grad(fused, (y, norm.weight), g),
                               torch.autograd.grad(formula, (y, norm.weight), g))
    # bf16 input: statistics in fp32, rounded to bf16 before the (fp32) weight multiplies.
    yb = y.detach().bfloat16()
    expected = norm.weight * (yb.float() * torch.rsqrt(yb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(norm(yb), expected)
