"""MoE: dispatch vs a per-expert reference, router math vs transformers, routing replay, load balancing."""

from types import SimpleNamespace

import pytest
import torch

from thinkzero.model.moe import MLP, MoE, MoEGate, update_bias


def make_cfg(**overrides):
    cfg = dict(
        hidden_size=32,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        aux_loss_alpha=0.0,
        seq_aux=True,
        hidden_act="silu",
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def make_moe(seed=0, **overrides):
    torch.manual_seed(seed)
    moe = MoE(make_cfg(**overrides))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return moe


def reference_moe(moe: MoE, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the routing: obviously right, wasteful."""
    y = moe.shared_experts(x) if moe.shared_experts is not None else torch.zeros_like(x)
    I = moe.experts.intermediate_size
    for e in range(moe.n_routed_experts):
        gate, up, down = moe.experts.gate_up_proj[e, :I], moe.experts.gate_up_proj[e, I:], moe.experts.down_proj[e]
        w = (topk_weights * (topk_idx == e)).sum(-1, keepdim=True)  # (B, T, 1)
        y = y + w * (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    return y


CONFIGS = {
    "v3_sigmoid_noaux_groups": {},
    "v2_softmax_greedy": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
                              routed_scaling_factor=1.0, n_group=None, topk_group=None),
    "v2_softmax_group_limited": dict(scoring_func="softmax", topk_method="group_limited_greedy",
                                     norm_topk_prob=False, routed_scaling_factor=16.0),
    "no_shared_top3": dict(n_shared_experts=0, num_experts_per_tok=3),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dispatch_matches_reference_outputs_and_gradients(name):
    moe = make_moe(**CONFIGS[name])
    x = torch.randn(3, 7, 32, requires_grad=True)
    y, stats = moe(x)
    topk_idx, _, _ = moe.gate(x)
    assert torch.equal(stats.topk_idx, topk_idx)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference_moe(moe, x_ref, topk_idx, moe.gate(x_ref)[1])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)

    grad_out = torch.randn_like(y)
    params = list(moe.parameters())
    grads = torch.autograd.grad(y, [x] + params, grad_out, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x_ref] + params, grad_out, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        if g_ref is None or not g_ref.any():
            assert g is None or not g.any()
        else:  # stacked experts: a slice of zeros for an expert nobody was routed to, in both
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [[0, 0, 0, 0, 0, 0, 1, 0], [3, 0, 1, 7, 0, 2, 2, 1], [16, 9, 0, 13, 12, 1, 0, 5],
                                   [40, 9, 0, 33, 12, 1, 0, 5]])
def test_batched_experts_equal_the_loop(sizes):
    """Without gradients the experts may run as two padded batched matmuls or as a grouped matmul (CPU): same rows
    as one call per expert, idle experts included."""
    experts = make_moe().experts
    xs = torch.randn(sum(sizes), 32)  # rows sorted by expert, as dispatch passes them
    with torch.no_grad():
        batched = experts._batched(xs, torch.tensor(sizes), max(sizes))
        grouped = experts._grouped(xs, torch.tensor(sizes))
        looped = experts._looped(xs, sizes)
        chosen = experts(xs, torch.tensor(sizes))
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chosen, looped, rtol=1e-5, atol=1e-6)


def test_experts_pick_their_path_by_rows_and_gradients(monkeypatch):
    """Without gradients: the grouped call up to grouped_capacity rows per expert, the loop above it; with gradients
    always the loop (its backward is the fast one); float64 takes the padded batched matmuls."""
    experts = make_moe().experts
    taken = []
    for name in ("_grouped", "_batched", "_looped"):
        real = getattr(experts, name)
        monkeypatch.setattr(experts, name, lambda *a, _real=real, _name=name: taken.append(_name) or _real(*a))
    for rows_per_expert, grad in [(4, False), (experts.grouped_capacity, False), (experts.grouped_capacity + 1, False),
                                  (4, True)]:
        sizes = [rows_per_expert] + [1] * 7
        xs = torch.randn(sum(sizes), 32)
        with torch.set_grad_enabled(grad):
            experts(xs, torch.tensor(sizes))
    assert taken == ["_grouped", "_grouped", "_looped", "_looped"]
    # float64, which the grouped matmul does not take: the padded batched matmuls instead.
    experts.double()
    sizes = [4] + [1] * 7
    with torch.no_grad():
        experts(torch.randn(11, 32, dtype=torch.float64), torch.tensor(sizes))
    assert taken[-1] == "_batched"


def test_expert_counts_and_skipped_experts():
    moe = make_moe()
    x = torch.randn(2, 5, 32)
    _, stats = moe(x)
    assert stats.expert_counts.shape == (8,)
    assert int(stats.expert_counts.sum()) == 2 * 5 * 2
    assert torch.equal(stats.expert_counts, torch.bincount(stats.topk_idx.flatten(), minlength=8))
    # Replay everything onto experts 3 and 5: the others never run and get no gradient.
    forced = torch.tensor([3, 5]).expand(2, 5, 2)
    y, stats = moe(x, forced)
    assert stats.expert_counts.tolist() == [0, 0, 0, 10, 0, 10, 0, 0]
    y.sum().backward()
    grad = moe.experts.gate_up_proj.grad  # (E, 2I, D)
    assert [bool(grad[e].any()) for e in range(8)] == [e in (3, 5) for e in range(8)]


def test_routing_replay_reproduces_output():
    moe = make_moe()
    x = torch.randn(2, 9, 32)
    y, stats = moe(x)
    y_replay, stats_replay = moe(x, stats.topk_idx)
    torch.testing.assert_close(y_replay, y, rtol=0, atol=0)
    assert torch.equal(stats_replay.topk_idx, stats.topk_idx)
    # Replay after the router moved: same experts, weights from the new scores at those experts.
    with torch.no_grad():
        moe.gate.weight.add_(torch.randn_like(moe.gate.weight))
    _, stats_new = moe(x, stats.topk_idx)
    assert torch.equal(stats_new.topk_idx, stats.topk_idx)


def test_replay_with_wrong_shape_is_an_error():
    moe = make_moe()
    with pytest.raises(ValueError, match=r"routing replay expects topk_idx of shape \(2, 3, 2\)"):
        moe(torch.randn(2, 3, 32), torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expert ids outside \[0, 8\)"):
        moe(torch.randn(2, 3, 32), torch.full((2, 3, 2), 8))


def test_weights_hand_computed():
    # One token, 4 experts, sigmoid scores chosen through the logits; no groups, k=2, normalised, scaled by 2.
    gate = MoEGate(2, 4, 2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1,
                   norm_topk_prob=True, routed_scaling_factor=2.0)
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0])  # sigmoid: .5, .881, .269, .731
    with torch.no_grad():
        gate.weight.copy_(torch.stack([logits, torch.zeros(4)], dim=1))  # x = (1, 0) -> logits
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))  # biased choice: expert 2 wins
    idx, w, _ = gate(torch.tensor([[[1.0, 0.0]]]))
    assert sorted(idx.flatten().tolist()) == [1, 2]  # .881 and .269 + 1 beat .731 and .5
    s = torch.sigmoid(torch.tensor([2.0, -1.0]))
    expected = dict(zip([1, 2], (2.0 * s / s.sum()).tolist()))  # unbiased scores, normalised, scaled
    for e, weight in zip(idx.flatten().tolist(), w.flatten().tolist()):
        assert weight == pytest.approx(expected[e], rel=1e-6)


def test_aux_loss_hand_computed_and_differentiable():
    # With a zero router, softmax scores are uniform (1/E): sum_i f_i * P_i = (1/E) * sum_i f_i = 1 for any
    # routing, because sum_i f_i = E / (k T) * (k T). So the loss is exactly alpha.
    moe = make_moe(scoring_func="softmax", topk_method="greedy", n_group=None, topk_group=None, aux_loss_alpha=0.01)
    with torch.no_grad():
        moe.gate.weight.zero_()
    x = torch.randn(2, 6, 32)
    moe.train()
    _, stats = moe(x)
    assert stats.aux_loss.item() == pytest.approx(0.01, rel=1e-6)
    moe.eval()  # only computed in training
    assert moe(x)[1].aux_loss.item() == 0.0
    # Skewed router: loss above alpha and its gradient reaches the router weights.
    moe.train()
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)
    _, stats = moe(x)
    assert stats.aux_loss.item() > 0.01
    stats.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_bias_update_moves_skewed_router_toward_balance():
    torch.manual_seed(0)
    moe = make_moe(n_group=1, topk_group=1, num_experts_per_tok=2)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.weight.normal_(0, 0.05)
        moe.gate.weight[:2] += 0.3  # experts 0 and 1 favoured by every positive-leaning token
    x = torch.randn(16, 32, 32).abs()

    def expert_counts():  # the router alone decides the load; no need to run the experts
        return torch.bincount(moe.gate(x)[0].flatten(), minlength=8)

    def load_cv():
        counts = expert_counts().float()
        return (counts.std(unbiased=False) / counts.mean()).item()

    with torch.no_grad():
        assert torch.equal(moe(x)[1].expert_counts, expert_counts())
        cv_before = load_cv()
        cvs = []
        for _ in range(150):  # sign updates oscillate by about gamma at the end, so average the last few
            update_bias(moe.gate, expert_counts(), gamma=0.003)
            cvs.append(load_cv())
    cv_after = sum(cvs[-10:]) / 10
    assert cv_before > 1.5, cv_before  # experts 0 and 1 take every token
    assert cv_after < 0.25 * cv_before, (cv_before, cv_after)


def test_update_bias_needs_noaux_router():
    gate = MoEGate(8, 4, 2, scoring_func="softmax", topk_method="greedy")
    with pytest.raises(ValueError, match="noaux_tc"):
        update_bias(gate, torch.ones(4), 0.1)


def test_bias_in_state_dict_and_not_a_parameter():
    moe = make_moe()
    assert "gate.e_score_correction_bias" in moe.state_dict()
    assert "gate.e_score_correction_bias" not in dict(moe.named_parameters())
    assert {"experts.gate_up_proj", "experts.down_proj", "shared_experts.up_proj.weight", "gate.weight"} <= set(
        moe.state_dict())
    assert "gate.e_score_correction_bias" not in make_moe(**CONFIGS["v2_softmax_greedy"]).state_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(scoring_func="relu"), "scoring_func='relu' is not supported"),
        (dict(topk_method="random"), "topk_method='random' is not supported"),
        (dict(n_group=3), "n_group dividing n_routed_experts"),
        (dict(topk_group=1, num_experts_per_tok=3), "cannot hold num_experts_per_tok=3"),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    ],
)
def test_bad_router_config_is_an_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoE(make_cfg(**overrides))


def test_mlp_is_swiglu():
    mlp = MLP(4, 3)
    x = torch.randn(5, 4)
    expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected)


transformers = pytest.importorskip("transformers")


def hf_moe_from_ours(moe: MoE, version: str, cfg):
    """Build transformers' MoE block with our weights (its experts are fused 3D tensors in memory)."""
    common = dict(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
                  n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
                  num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
                  norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
                  num_attention_heads=4, num_hidden_layers=1, vocab_size=16, intermediate_size=16)
    if version == "v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE
        block = DeepseekV3MoE(DeepseekV3Config(**common))
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Config, DeepseekV2Moe
        block = DeepseekV2Moe(DeepseekV2Config(topk_method=cfg.topk_method, **common))
    with torch.no_grad():
        # Same names and layouts (router, bias, stacked experts, shared experts): one strict load.
        block.load_state_dict(moe.state_dict(), strict=True)
    return block


@pytest.mark.parametrize(
    "version, name",
    [("v3", "v3_sigmoid_noaux_groups"), ("v2", "v2_softmax_greedy"), ("v2", "v2_softmax_group_limited")],
)
def test_matches_transformers_moe_block(version, name):
    cfg = make_cfg(**CONFIGS[name])
    moe = make_moe(**CONFIGS[name])
    block = hf_moe_from_ours(moe, version, cfg)
    x = torch.randn(3, 11, 32)
    _, hf_weights, hf_idx = block.gate(x)
    idx, weights, _ = moe.gate(x)
    # Same experts (topk is unsorted, so compare as sets) and the same weight for each.
    hf_sorted, hf_order = hf_idx.sort(dim=-1)
    ours_sorted, our_order = idx.reshape(-1, cfg.num_experts_per_tok).sort(dim=-1)
    assert torch.equal(ours_sorted, hf_sorted)
    torch.testing.assert_close(weights.reshape(-1, cfg.num_experts_per_tok).gather(-1, our_order),
                               hf_weights.gather(-1, hf_order), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(moe(x)[0], block(x), rtol=1e-5, atol=1e-6)
