"""Evaluation estimators against hand-computed values (arithmetic in the comments), grading, and evaluate_policy on
a scripted policy whose outputs we know, so the numbers must come from what it wrote."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from thinkzero.model.config import ModelConfig
from thinkzero.model.presets import preset
from thinkzero.model.tokenizer import build_char_tokenizer
from thinkzero.rl.arithmetic import Difficulty, make_problems
from thinkzero.rl.data import prepare_examples, render_prompt
from thinkzero.rl.evaluation import evaluate_policy, grade, maj_at_k, majority_index, pass_at_k, summarize


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 1 - 3 / 5),  # 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4 (= c/n)
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9
    (5, 2, 4, 1.0),  # n - c = 3 < k: every 4 of the 5 include a correct one
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 0.91666...
    (4, 0, 2, 0.0),  # 1 - C(4,2)/C(4,2) = 0
    (4, 4, 1, 1.0),
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_for_large_n():
    # 1 - C(200-7, 16) / C(200, 16), exactly with integers, against the product form
    exact = 1 - math.comb(193, 16) / math.comb(200, 16)
    assert pass_at_k(200, 7, 16) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n, c, k, message", [(4, 5, 1, "0 <= c <= n"), (4, 2, 5, "1 <= k <= n"),
                                              (4, 2, 0, "1 <= k <= n"), (3, -1, 1, "0 <= c <= n")])
def test_pass_at_k_rejects_impossible_counts(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_majority_vote():
    # "3" has two votes, "5" one, None does not vote -> the first "3" (index 0), which is correct
    assert majority_index(["3", "5", "3", None]) == 0
    assert maj_at_k(["3", "5", "3", None], [True, False, True, False]) == 1.0
    # a tie 2-2 goes to the answer seen first: "5" at index 0 (wrong), although "3" is right
    assert majority_index(["5", "3", "3", "5"]) == 0
    assert maj_at_k(["5", "3", "3", "5"], [False, True, True, False]) == 0.0
    # the majority can be wrong while one sample is right (pass@3 = 1, maj@3 = 0)
    assert maj_at_k(["7", "7", "4"], [False, False, True]) == 0.0
    assert majority_index([None, None]) is None
    assert maj_at_k([None, None], [False, False]) == 0.0
    with pytest.raises(ValueError, match="2 answers but 1"):
        maj_at_k(["1", "2"], [True])


def test_grade():
    g = grade("<think>\n1+2=3\n</think>\n<answer>\n3\n</answer>", "3")
    assert g == {"correct": True, "formatted": True, "answer": "3"}
    g = grade("the answer is 4", "3")  # no layout; the last number is the answer it commits to
    assert g == {"correct": False, "formatted": False, "answer": "4"}
    g = grade("<think>\n1+2=3\n</think>\n<answer>\n3\n</answer>", "4")
    assert g["formatted"] and not g["correct"]
    assert grade("no digits at all", "3")["answer"] is None


def test_grade_counts_a_think_the_r1_zero_prompt_opened():
    prompt_text = render_prompt("What is 1 + 2?", "r1_zero")  # ends "Assistant: <think>"
    assert grade("\n1+2=3\n</think>\n<answer>\n3\n</answer>", "3", prompt_text)["formatted"]
    assert not grade("\n1+2=3\n</think>\n3", "3", prompt_text)["formatted"]  # no answer block
    assert not grade("<think>\n1+2=3\n</think>\n<answer>\n3\n</answer>", "3", prompt_text)["formatted"]  # twice


def _sample(correct, answer, formatted=True, num_tokens=10):
    return {"correct": correct, "answer": answer, "formatted": formatted, "num_tokens": num_tokens}


def test_summarize_hand_computed():
    records = [
        {"greedy": _sample(True, "3", num_tokens=10),
         "samples": [_sample(True, "3"), _sample(False, "4"), _sample(True, "3"), _sample(False, "5", False)]},
        {"greedy": _sample(False, "1", formatted=False, num_tokens=20),
         "samples": [_sample(False, "1"), _sample(False, "1"), _sample(False, "2"), _sample(False, None, False)]},
    ]
    s = summarize(records, num_samples=4)
    assert s["greedy/pass@1"] == 0.5  # (1 + 0) / 2
    assert s["greedy/format"] == 0.5
    assert s["greedy/mean_length"] == 15.0  # (10 + 20) / 2
    assert s["sampled/pass@1"] == 0.25  # (2/4 + 0/4) / 2
    assert s["sampled/format"] == pytest.approx((3 / 4 + 3 / 4) / 2)
    # pass@2: problem 1: 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6; problem 2: 0 -> 5/12
    assert s["pass@2"] == pytest.approx(5 / 12)
    assert s["pass@4"] == 0.5  # (1 + 0) / 2
    assert s["pass@1"] == s["sampled/pass@1"]
    assert s["maj@4"] == 0.5  # problem 1: "3" wins 2-1-1 (right); problem 2: "1" wins (wrong)


class ScriptedPolicy(nn.Module):
    """Writes the same text after every prompt: its logits put all mass on the script's next character. Has what
    model.generate needs (config, a parameter for device/dtype, the cache protocol)."""

    def __init__(self, text: str, tokenizer):
        super().__init__()
        self.config = ModelConfig.from_dict(preset("tiny"))
        self.anchor = nn.Parameter(torch.zeros(()))
        self.script = tokenizer.encode(text) + [tokenizer.eos_token_id]
        self.prompt_len = 0

    def forward(self, input_ids, attention_mask=None, cache=None, return_routing=False, **_):
        B, T = input_ids.shape
        if cache.length == 0:
            self.prompt_len = T
        written = cache.length + T - self.prompt_len  # tokens of the script already written
        logits = torch.full((B, T, self.config.vocab_size), -30.0)
        logits[:, -1, self.script[min(written, len(self.script) - 1)]] = 30.0
        cache.advance(T)
        return SimpleNamespace(logits=logits, routing=None)


def test_evaluate_policy_numbers_come_from_the_outputs():
    tokenizer = build_char_tokenizer(vocab_size=128)
    problems = make_problems(40, seed=1, difficulty=Difficulty(num_ops=1, max_value=9))
    examples, _ = prepare_examples(problems, tokenizer, prompt_column="question", template="{prompt}\n")
    text = "<think>\n1+6=7\n</think>\n<answer>\n7\n</answer>"
    policy = ScriptedPolicy(text, tokenizer)
    summary, records = evaluate_policy(policy, tokenizer, examples, num_samples=3, max_new_tokens=64, batch_size=16)
    expected = sum(p["answer"] == "7" for p in problems) / len(problems)
    assert 0 < expected < 1  # the data set mixes answers, so the test can fail both ways
    assert summary["greedy/pass@1"] == pytest.approx(expected)
    assert summary["sampled/pass@1"] == pytest.approx(expected)  # all mass on one token: samples = greedy
    assert summary["pass@3"] == pytest.approx(expected) and summary["maj@3"] == pytest.approx(expected)
    assert summary["greedy/format"] == 1.0
    assert summary["greedy/mean_length"] == len(text)  # one token per character; stops at </answer>
    assert all(r["greedy"]["text"] == text and r["greedy"]["finish_reason"] == "stop" for r in records)
    assert [r["answer"] for r in records] == [p["answer"] for p in problems]
