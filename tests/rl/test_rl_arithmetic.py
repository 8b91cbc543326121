"""The arithmetic task generator: solutions add up, splits are disjoint and reproducible, styles mix as asked."""

import re

import pytest

from thinkzero.rl.arithmetic import DIRECT_THINK, Difficulty, make_problems, make_splits, mix_styles


def test_worked_solutions_add_up():
    for p in make_problems(200, seed=3, difficulty=Difficulty(num_ops=3, min_ops=1, max_value=9, ops="+-*")):
        steps = re.findall(r"^(\d+)([+*-])(\d+)=(\d+)$", p["solution"], re.MULTILINE)
        assert len(steps) == p["num_ops"] and 1 <= p["num_ops"] <= 3
        for a, op, b, c in steps:
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert steps[-1][3] == p["answer"] and p["solution"].endswith(f"<answer>\n{p['answer']}\n</answer>")


def test_splits_are_disjoint_and_reproducible():
    sizes = {"test": 50, "train": 300, "sft": 40}
    a = make_splits(sizes, seed=7, difficulty=Difficulty(num_ops=2, min_ops=1, max_value=9))
    assert {k: len(v) for k, v in a.items()} == sizes
    questions = [{r["question"] for r in rows} for rows in a.values()]
    assert sum(len(q) for q in questions) == sum(sizes.values())  # no question twice, within or across splits
    assert a == make_splits(sizes, seed=7, difficulty=Difficulty(num_ops=2, min_ops=1, max_value=9))
    assert a["test"] != make_splits(sizes, seed=8, difficulty=Difficulty(num_ops=2, min_ops=1, max_value=9))["test"]


def test_too_many_problems_for_a_tiny_task_is_an_error():
    with pytest.raises(ValueError, match="distinct problems"):
        make_splits({"train": 1000}, seed=0, difficulty=Difficulty(num_ops=1, max_value=2, ops="+"))  # 600 exist


@pytest.mark.parametrize("kwargs, message", [({"num_ops": 2, "min_ops": 3}, "min_ops <= num_ops"),
                                             ({"max_value": 1}, "max_value"), ({"ops": "+/"}, "ops")])
def test_bad_difficulty(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Difficulty(**kwargs)


def test_mix_styles():
    rows = make_problems(40, seed=1)
    mixed = mix_styles(rows, 0.25, seed=0)
    direct = [r for r in mixed if r["style"] == "direct"]
    assert len(direct) == 10  # 0.25 * 40
    for r in direct:
        assert r["solution"] == f"<think>\n{DIRECT_THINK}\n</think>\n<answer>\n{r['answer']}\n</answer>"
    assert all(r["solution"] == o["solution"] for r, o in zip(mixed, rows) if r["style"] == "worked")
    assert mixed == mix_styles(rows, 0.25, seed=0) and "style" not in rows[0]  # reproducible; input untouched
