"""A forward over groups of rows that share their first columns (a prompt and its G completions) computes the shared
part once per group and must give exactly what the plain forward gives: log-probs, entropy, routing, expert counts
and gradients."""

import pytest
import torch

# conftest's small V3 model, with values narrower than the query/key heads (v 6 < 8 + 4).
FIELDS = {"vocab_size": 50, "qk_rope_head_dim": 4, "v_head_dim": 6}
P, G, TP, TC = 3, 4, 7, 9


def grouped_batch(seed: int = 0):
    """P left-padded prompts (lengths 7, 4, 2), each repeated G times, then right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.zeros(P, TP, dtype=torch.long)
    prompt_mask = torch.zeros(P, TP, dtype=torch.long)
    for p, n in enumerate((7, 4, 2)):
        prompt_ids[p, TP - n:] = torch.randint(1, FIELDS["vocab_size"], (n,), generator=g)
        prompt_mask[p, TP - n:] = 1
    lengths = torch.randint(1, TC + 1, (P * G,), generator=g)
    lengths[0] = TC
    completion_mask = (torch.arange(TC)[None, :] < lengths[:, None]).long()
    completion_ids = torch.randint(1, FIELDS["vocab_size"], (P * G, TC), generator=g) * completion_mask
    input_ids = torch.cat([prompt_ids.repeat_interleave(G, 0), completion_ids], dim=1)
    mask = torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask], dim=1)
    return input_ids, mask, completion_ids, completion_mask


def score(model, input_ids, mask, targets, **kwargs):
    return model(input_ids, mask, target_ids=targets, target_start=TP - 1, return_routing=True,
                 compute_entropy=True, **kwargs)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_equals_the_plain_forward_values_and_gradients(small_model, checkpointing):
    model = small_model(scale=0.3, **FIELDS).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    input_ids, mask, targets, completion_mask = grouped_batch()
    plain = score(model, input_ids, mask, targets)
    grads_plain = torch.autograd.grad((plain.logprobs * completion_mask).sum() + plain.entropy.sum(),
                                      list(model.parameters()))
    shared = score(model, input_ids, mask, targets, shared_prefix=TP, group_size=G)
    grads_shared = torch.autograd.grad((shared.logprobs * completion_mask).sum() + shared.entropy.sum(),
                                       list(model.parameters()))

    torch.testing.assert_close(shared.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.entropy, plain.entropy, rtol=1e-5, atol=1e-5)
    for a, b in zip(shared.routing, plain.routing):
        assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    for a, b in zip(shared.expert_counts, plain.expert_counts):
        assert torch.equal(a, b)  # a shared prefix token counts once per row, as in the plain forward
    for (name, _), a, b in zip(model.named_parameters(), grads_shared, grads_plain):
        # The prefix's gradient is summed over its group in another order: fp32 rounding relative to the largest.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=name)


def test_shared_prefix_with_routing_replay_and_without_targets(small_model):
    model = small_model(scale=0.3, **FIELDS)
    input_ids, mask, targets, _ = grouped_batch(seed=1)
    with torch.no_grad():
        plain = score(model, input_ids, mask, targets)
        # Replay a routing that differs from the router's own choice: both forwards must follow it.
        forced = [torch.stack([(r[..., 0] + 3) % 8, (r[..., 0] + 5) % 8], -1) for r in plain.routing]
        replay_plain = score(model, input_ids, mask, targets, routing=forced)
        replay_shared = score(model, input_ids, mask, targets, routing=forced, shared_prefix=TP, group_size=G)
        logits_plain = model(input_ids, mask).logits
        logits_shared = model(input_ids, mask, shared_prefix=TP, group_size=G).logits
    torch.testing.assert_close(replay_shared.logprobs, replay_plain.logprobs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(replay_plain.logprobs, plain.logprobs)  # the replay changed something
    torch.testing.assert_close(logits_shared, logits_plain, rtol=1e-5, atol=1e-5)


def test_shared_prefix_refuses_groups_whose_prefixes_differ(small_model):
    model = small_model(scale=0.3, **FIELDS)
    input_ids, mask, targets, _ = grouped_batch()
    input_ids[1, TP - 1] = (input_ids[1, TP - 1] + 1) % FIELDS["vocab_size"]  # row 1 no longer shares prompt 0
    with pytest.raises(ValueError, match="group 0"):
        score(model, input_ids, mask, targets, shared_prefix=TP, group_size=G)
    with pytest.raises(ValueError, match="group_size"):
        score(model, input_ids[:-1], mask[:-1], targets[:-1], shared_prefix=TP, group_size=G)


def test_shared_prefix_with_sequence_aux_loss_matches(small_model):
    """The sequence-wise balance loss needs whole rows: with it on, the forward does not share (same result)."""
    model = small_model(scale=0.3, aux_loss_alpha=0.01, seq_aux=True, **FIELDS).train()
    input_ids, mask, targets, _ = grouped_batch()
    plain = score(model, input_ids, mask, targets)
    shared = score(model, input_ids, mask, targets, shared_prefix=TP, group_size=G)
    assert plain.aux_loss > 0
    torch.testing.assert_close(shared.aux_loss, plain.aux_loss, rtol=1e-5, atol=1e-7)
