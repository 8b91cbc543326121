"""Built-in rewards with hand-computed values, and the package's dependency boundary."""

import ast
import math
import pathlib
import subprocess
import sys

import pytest

from thinkzero.rewards import list_rewards
from thinkzero.rewards.format import format_reward, tag_count
from thinkzero.rewards.length import cosine_length, soft_overlong
from thinkzero.rewards.repetition import repetition

GOOD = "<think>\nadd them\n</think>\n<answer>\n4\n</answer>"


def test_builtins_are_registered():
    assert {"math_accuracy", "format", "tag_count", "cosine_length", "soft_overlong", "repetition"} <= set(
        list_rewards())


@pytest.mark.parametrize("completion,strict,soft", [
    (GOOD, 1.0, 1.0),
    (GOOD + "\n", 1.0, 1.0),
    ("<think>\nmulti\nline\n</think>\n<answer>\n4\n</answer>", 1.0, 1.0),
    ("<think>add them</think><answer>4</answer>", 0.0, 1.0),  # no newlines: soft only
    ("Sure! " + GOOD, 0.0, 1.0),  # text before the think block
    (GOOD + " trailing", 0.0, 1.0),
    ("<think>\na\n</think>\n<answer>\n4\n</answer>\n<answer>\n5\n</answer>", 0.0, 1.0),  # two answers
    ("<answer>\n4\n</answer>\n<think>\na\n</think>", 0.0, 0.0),  # wrong order
    ("<think>\nnever closed\n<answer>\n4\n</answer>", 0.0, 0.0),
    ("4", 0.0, 0.0),
])
def test_format(completion, strict, soft):
    assert format_reward(completion, strict=True) == strict
    assert format_reward(completion, strict=False) == soft


def test_tag_count():
    assert tag_count(GOOD) == 1.0
    assert tag_count("<think>\nonly thinking\n</think>") == 0.5
    assert tag_count("<think><think></think><answer>") == 0.5  # <think> twice earns nothing, </answer> missing
    assert tag_count("nothing") == 0.0


def test_cosine_length_hand_values():
    right, wrong = "<answer>4</answer>", "<answer>5</answer>"
    # correct: 0.5 + 0.5 * (1.0 - 0.5) * (1 + cos(pi * t / 100))
    assert cosine_length(right, "4", num_tokens=0, max_length=100) == pytest.approx(1.0)
    assert cosine_length(right, "4", num_tokens=50, max_length=100) == pytest.approx(0.75)
    assert cosine_length(right, "4", num_tokens=100, max_length=100) == pytest.approx(0.5)
    assert cosine_length(right, "4", num_tokens=25, max_length=100) == pytest.approx(
        0.5 + 0.25 * (1 + math.cos(math.pi / 4)))
    # wrong: 0.0 + 0.5 * (-0.5 - 0.0) * (1 + cos(pi * t / 100)): short wrong answers are penalised most
    assert cosine_length(wrong, "4", num_tokens=0, max_length=100) == pytest.approx(-0.5)
    assert cosine_length(wrong, "4", num_tokens=50, max_length=100) == pytest.approx(-0.25)
    assert cosine_length(wrong, "4", num_tokens=100, max_length=100) == pytest.approx(0.0)
    assert cosine_length(wrong, "4", num_tokens=500, max_length=100) == pytest.approx(0.0)  # clipped
    assert cosine_length(right, "no #### marker ####", num_tokens=5, max_length=100) is None


def test_soft_overlong_hand_values():
    # max_length 100, buffer 20: free up to 80 tokens, then (80 - t) / 20, -1 beyond 100
    assert soft_overlong("", num_tokens=10, max_length=100, buffer=20) == 0.0
    assert soft_overlong("", num_tokens=80, max_length=100, buffer=20) == 0.0
    assert soft_overlong("", num_tokens=90, max_length=100, buffer=20) == pytest.approx(-0.5)
    assert soft_overlong("", num_tokens=100, max_length=100, buffer=20) == pytest.approx(-1.0)
    assert soft_overlong("", num_tokens=101, max_length=100, buffer=20) == -1.0
    with pytest.raises(ValueError, match="0 < buffer <= max_length"):
        soft_overlong("", num_tokens=1, max_length=10, buffer=20)


def test_repetition_hand_values():
    # trigrams of "a b c a b c": abc, bca, cab, abc -> 3 unique of 4 -> 1 - 3/4 = 0.25
    assert repetition("a b c a b c") == pytest.approx(-0.25)
    assert repetition("a b c a b c", max_penalty=-0.5) == pytest.approx(-0.125)
    assert repetition("the cat sat on the mat") == 0.0
    assert repetition("go go go go go", ngram_size=1) == pytest.approx(-0.8)  # 1 unique of 5
    assert repetition("too short") == 0.0
    with pytest.raises(ValueError, match="max_penalty must be <= 0"):
        repetition("x", max_penalty=1.0)


def test_rewards_does_not_depend_on_torch_or_trainer():
    root = pathlib.Path(__file__).resolve().parents[2] / "rewards"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("torch", "rl", "model", "transformers"), (path.name, name)
    code = "import sys, rewards; rewards.Scorer; bad = {'torch', 'rl', 'model'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root.parent)
    assert out.stdout.strip() == "set()"
