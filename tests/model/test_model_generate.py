"""Sampling engine: sampling maths, stop handling, log-probs vs a full forward, greedy vs transformers, prefix sharing."""

import math

import pytest
import torch

from model.generate import GenerationOutput, SamplingParams, StopStringChecker, filter_logits, generate, sample_next

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------------
# Sampling maths (no model).


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    # top_k=2 keeps the two largest.
    assert filter_logits(logits, top_k=2).tolist() == [[NEG_INF, NEG_INF, 2.0, 3.0]]
    # softmax([0,1,2,3]) = [0.032, 0.087, 0.237, 0.644]; mass of strictly more likely tokens, sorted:
    # token 3: 0, token 2: 0.644, token 1: 0.881, token 0: 0.968.
    assert filter_logits(logits, top_p=0.7).tolist() == [[NEG_INF, NEG_INF, 2.0, 3.0]]  # 0.644 < 0.7 keeps token 2
    assert filter_logits(logits, top_p=0.6).tolist() == [[NEG_INF, NEG_INF, NEG_INF, 3.0]]  # the top token always stays
    assert filter_logits(logits, top_p=0.9).tolist() == [[NEG_INF, 1.0, 2.0, 3.0]]
    # Both: top-k first, then top-p on what is left: softmax([2,3]) = [0.269, 0.731] -> p=0.7 keeps only token 3.
    assert filter_logits(logits, top_k=2, top_p=0.7).tolist() == [[NEG_INF, NEG_INF, NEG_INF, 3.0]]
    # No filtering: unchanged; rows are independent.
    two = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    assert torch.equal(filter_logits(two), two)
    assert filter_logits(two, top_k=1).tolist() == [[NEG_INF] * 3 + [3.0], [3.0] + [NEG_INF] * 3]


def test_sample_next_logprobs_and_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 3
    g = torch.Generator().manual_seed(0)
    tok, slp, lp = sample_next(logits, temperature=0.7, top_k=20, top_p=0.9, generator=g)
    expected_s = filter_logits(logits / 0.7, 20, 0.9).log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    expected = logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    torch.testing.assert_close(slp, expected_s)
    torch.testing.assert_close(lp, expected)
    assert torch.isfinite(slp).all()  # never a filtered-out token
    # Greedy: argmax, and the sampling log-prob is reported as the policy's.
    tok, slp, lp = sample_next(logits, temperature=0.0)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(lp, logits.log_softmax(-1).max(-1).values)
    torch.testing.assert_close(slp, lp)


def test_sample_next_frequencies_match_the_distribution():
    # 3 tokens with probabilities 0.5, 0.3, 0.2 at temperature 2 (so raw logits are 2 * log p).
    p = torch.tensor([0.5, 0.3, 0.2])
    logits = (2 * p.log()).expand(40000, 3)
    tok, _, _ = sample_next(logits, temperature=2.0, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(tok, minlength=3).float() / tok.numel()
    assert (freq - p).abs().max() < 0.01  # std of each frequency ~ 0.0025
    # Same generator seed -> same draws; different seed -> different draws.
    a, _, _ = sample_next(logits[:100], 2.0, generator=torch.Generator().manual_seed(5))
    b, _, _ = sample_next(logits[:100], 2.0, generator=torch.Generator().manual_seed(5))
    c, _, _ = sample_next(logits[:100], 2.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stop_string_checker_spans_tokens_and_only_decodes_the_tail():
    vocab = {0: "<", 1: "/", 2: "ans", 3: "wer", 4: ">", 5: "x", 6: "</answer>"}
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return "".join(vocab[i] for i in ids)

    check = StopStringChecker(("</answer>",), decode)
    assert check.window == len("</answer>") + 4
    assert check([[5, 0, 1, 2, 3, 4], [5, 0, 1, 2, 3], [6], [5, 5]]) == [True, False, True, False]
    assert max(calls) <= check.window


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(8, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(8, temperature=-1.0)
    assert SamplingParams(8, eos_token_ids=[2, 3]).eos_token_ids == (2, 3)
