"""rl/batch.py, rl/metrics.py's pure parts and the one-process collectives: how batches are cut, padded, joined and
moved, and how routing drift is counted. Expected values are written out by hand."""

from collections import Counter

import pytest
import torch

from thinkzero.rewards import ScoreResult
from thinkzero.rl.batch import RolloutBatch, ScoredRollout, decode_completions
from thinkzero.rl.metrics import UpdateMetrics, routing_mismatches

PAD = 0


def _batch(prompt_rows, completion_rows, group_index, routing=False) -> RolloutBatch:
    """A batch from ragged rows: prompts left-padded, completions right-padded, with PAD; routing (N, T, 1) holds
    each position's token id, so where padding went is visible."""
    Tp, Tc = max(map(len, prompt_rows)), max(map(len, completion_rows))
    prompt = torch.tensor([[PAD] * (Tp - len(p)) + p for p in prompt_rows])
    completion = torch.tensor([c + [PAD] * (Tc - len(c)) for c in completion_rows])
    prompt_mask = torch.tensor([[0] * (Tp - len(p)) + [1] * len(p) for p in prompt_rows])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (Tc - len(c)) for c in completion_rows])
    return RolloutBatch(
        prompt_ids=prompt, prompt_mask=prompt_mask, completion_ids=completion, completion_mask=completion_mask,
        sampling_logprobs=-completion_mask.float(), lengths=completion_mask.sum(1),
        finish_reasons=["stop" if len(c) < 3 else "length" for c in completion_rows],
        group_index=torch.tensor(group_index),
        routing=[torch.cat([prompt, completion], dim=1)[..., None]] if routing else None)


def test_select_by_index_and_by_slice():
    b = _batch([[5], [5], [6, 7], [6, 7]], [[8], [9, 9, 9], [10, 11], [12]], [0, 0, 1, 1], routing=True)
    picked = b.select(torch.tensor([3, 0]))
    assert picked.completion_ids.tolist() == [[12, PAD, PAD], [8, PAD, PAD]]
    assert picked.finish_reasons == ["stop", "stop"] and picked.group_index.tolist() == [1, 0]
    assert picked.routing[0][:, :, 0].tolist() == [[6, 7, 12, PAD, PAD], [PAD, 5, 8, PAD, PAD]]
    tail = b.select(slice(1, 3))
    assert tail.finish_reasons == ["length", "stop"] and tail.lengths.tolist() == [3, 2]


def test_pad_to_pads_prompts_left_completions_right_and_routing_alike():
    b = _batch([[5, 6]], [[8, 9]], [0], routing=True).pad_to(4, 3, PAD)
    assert b.prompt_ids.tolist() == [[PAD, PAD, 5, 6]] and b.prompt_mask.tolist() == [[0, 0, 1, 1]]
    assert b.completion_ids.tolist() == [[8, 9, PAD]] and b.completion_mask.tolist() == [[1, 1, 0]]
    assert b.sampling_logprobs.tolist() == [[-1.0, -1.0, 0.0]]
    assert b.routing[0][0, :, 0].tolist() == [0, 0, 5, 6, 8, 9, 0]  # same columns as input_ids
    assert b.input_ids.tolist() == [[PAD, PAD, 5, 6, 8, 9, PAD]]


def test_cat_pads_to_the_widest_counts_prompts_across_and_keeps_routing_only_if_all_have_it():
    a = _batch([[5], [5]], [[8], [9]], [0, 0], routing=True)
    b = _batch([[6, 7]], [[10, 11, 12]], [0], routing=True)
    joined = RolloutBatch.cat([a, b], PAD)
    assert joined.prompt_ids.tolist() == [[PAD, 5], [PAD, 5], [6, 7]]
    assert joined.completion_ids.tolist() == [[8, PAD, PAD], [9, PAD, PAD], [10, 11, 12]]
    assert joined.group_index.tolist() == [0, 0, 1]  # b's prompt 0 is the joined batch's prompt 1
    assert joined.finish_reasons == ["stop", "stop", "length"]
    assert joined.routing[0][:, :, 0].tolist() == joined.input_ids.tolist()
    without = _batch([[6]], [[10]], [0])
    assert RolloutBatch.cat([a, without], PAD).routing is None


def test_to_moves_the_given_rows_with_every_tensor():
    b = _batch([[5], [6]], [[8], [9, 9]], [0, 1], routing=True)
    moved = b.to("meta", slice(1, 2))
    assert moved.completion_ids.device.type == "meta" and moved.routing[0].device.type == "meta"
    assert moved.lengths.device.type == "meta" and moved.finish_reasons == ["stop"]
    assert moved.completion_ids.shape == (1, 2)


def _scored(values, G=2) -> ScoredRollout:
    n = len(values)
    b = _batch([[5 + i // G] for i in range(n)], [[20 + i] for i in range(n)], [i // G for i in range(n)])
    scores = ScoreResult(total=list(values), per_function={"f": [v * 10 for v in values]},
                         failures={"f": Counter(exception=1)})
    return ScoredRollout(b, [f"t{i}" for i in range(n)], scores, [{"id": p} for p in range(n // G)])


def test_scored_rollouts_are_cut_and_joined_by_whole_groups():
    G = 2
    first, second = _scored([0.0, 1.0, 2.0, 2.0, 3.0, 4.0], G), _scored([5.0, 6.0], G)
    kept = first.select_groups(torch.tensor([0, 2]), G)
    assert kept.texts == ["t0", "t1", "t4", "t5"] and kept.examples == [{"id": 0}, {"id": 2}]
    assert kept.scores.total == [0.0, 1.0, 3.0, 4.0] and kept.scores.per_function == {"f": [0.0, 10.0, 30.0, 40.0]}
    assert kept.scores.failures == {}  # counted when scored, never again through a selection
    none = first.select_groups(torch.tensor([], dtype=torch.long), G)
    joined = ScoredRollout.cat([kept, none, second], PAD)
    assert joined.num_groups == 3 and joined.scores.total == [0.0, 1.0, 3.0, 4.0, 5.0, 6.0]
    assert joined.batch.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    top = joined.first_groups(2, G)
    assert top.texts == ["t0", "t1", "t4", "t5"] and top.batch.completion_ids.shape[0] == 4
    assert top.examples_per_row(G) == [{"id": 0}, {"id": 0}, {"id": 2}, {"id": 2}]
    assert joined.first_groups(5, G) is joined


def test_decode_completions_leaves_padding_out():
    class Chars:
        def decode(self, ids, skip_special_tokens):
            return "".join(chr(ord("a") + i) for i in ids)

    ids, texts = decode_completions(_batch([[5], [5]], [[1, 2], [3]], [0, 0]), Chars())
    assert ids == [[1, 2], [3]] and texts == ["bc", "d"]


def test_routing_mismatches_compare_expert_sets_on_completion_tokens():
    Tp = 1
    # (B=1, Tp + Tc = 4, k=2); position 0 is the prompt (ignored), then three completion tokens.
    chosen = torch.tensor([[[0, 1], [2, 3], [4, 5], [6, 7]]])
    sampled = torch.tensor([[[7, 7], [3, 2], [4, 6], [0, 1]]])  # same set reordered, one expert differs, all differ
    mask = torch.tensor([[1, 1, 0]])  # the last completion token is padding
    assert int(routing_mismatches(chosen, sampled, Tp, mask)) == 1  # only token 2 (experts {4,5} vs {4,6})
    assert int(routing_mismatches(chosen, chosen, Tp, torch.ones(1, 3))) == 0


def test_update_metrics_weight_means_by_tokens_and_skip_empty_micro_batches_for_extremes():
    acc = UpdateMetrics(moe_layers=0, num_experts=1)
    entropy = torch.ones(1, 2)
    acc.add({"kl": torch.tensor(0.5), "mismatch/ratio_max": torch.tensor(1.5)}, entropy, torch.tensor([[1, 1]]))
    acc.add({"kl": torch.tensor(2.0), "mismatch/ratio_max": torch.tensor(1.0)}, entropy, torch.tensor([[0, 0]]))
    acc.add({"kl": torch.tensor(1.0), "mismatch/ratio_max": torch.tensor(1.2)}, entropy, torch.tensor([[1, 0]]))
    assert acc.tokens == 3 and acc.sums["kl"] == pytest.approx(0.5 * 2 + 1.0 * 1)
    assert acc.extremes == {"mismatch/ratio_max": pytest.approx(1.5)}
