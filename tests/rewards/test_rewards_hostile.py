"""Hostile completions: each returns a verdict fast, runs no code, creates no file."""

import time

import pytest

from thinkzero.rewards.math import math_accuracy, verify

INJECTIONS = [
    "__import__('os').system('touch {path}')",
    "\\boxed{{__import__('os').system('touch {path}')}}",
    "<answer>__import__(\"os\").system(\"touch {path}\")</answer>",
    "<answer>eval(\"__import__('os').system('touch {path}')\")</answer>",
    "\\boxed{{exec('open(\"{path}\", \"w\").write(\"x\")')}}",
    "\\boxed{{(lambda: __import__('os').system('touch {path}'))()}}",
    "<answer>open('{path}', 'w')</answer>",
    "\\boxed{{Symbol('x').__class__.__init__.__globals__['os'].system('touch {path}')}}",
    "\\boxed{{\\text{{__import__('subprocess').run(['touch', '{path}'])}}}}",
]

BOMBS = {
    "python_tower": "\\boxed{10**10**10}",
    "latex_tower": "\\boxed{9^{9^{9^9}}}",
    "two_tower": "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
    "tower_minus_itself": "\\boxed{10^{10^{10}} - 10^{10^{10}} + 1}",
    "symbolic_tower": "\\boxed{x^{10^{10}}}",
    "exp_tower": "\\boxed{e^{e^{e^{e^{e^{10}}}}}}",
    "func_tower": "\\boxed{\\exp(\\exp(\\exp(\\exp(\\exp(x)))))}",
    "factorial_of_factorial": "\\boxed{(100!)!}",
    "big_factorial": "\\boxed{1000000!}",
    "big_binomial": "\\boxed{\\binom{10^{9}}{5 \\cdot 10^{8}}}",
    "product_of_big_powers": "\\boxed{" + "\\cdot ".join(["2^{999}"] * 60) + "}",
    "polynomial_power": "\\boxed{(x+y+z+w)^{1000} - (w+z+y+x)^{1000}}",
    "huge_literal": "\\boxed{" + "9" * 900 + "}",
    "deep_braces": "\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}",
    "deep_parens": "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
    "deep_fracs": "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    "deep_sqrt": "\\boxed{" + "\\sqrt{" * 300 + "2" + "}" * 300 + "}",
    "unclosed_boxed": "\\boxed{" * 50_000,
    "unclosed_answer": "<answer>" * 20_000 + "1",
    "megabyte_digits": "1" * 1_000_000,
    "megabyte_text": "a b " * 250_000,
    "megabyte_boxed": "\\boxed{" + "1+" * 500_000 + "1}",
    "megabyte_commas": "1," * 500_000,
    "many_boxes": "\\boxed{1} " * 100_000,
    "long_chain": "\\boxed{" + "+".join(["x"] * 199) + "}",
    "nested_abs": "\\boxed{" + "|" * 400 + "}",
    "backslashes": "\\" * 1_000_000,
    "braces_only": "}" * 500_000 + "{" * 500_000,
    "joined_boxes": "\\boxed{1}, " * 100_000,
    "doubled_backslashes": "\\\\frac{1}{2}" * 50_000,
    "abs_inequality_chain": "\\boxed{" + "<|x|".join(["1"] * 150) + "}",
    "ratio_chain": "\\boxed{" + ":".join(["1"] * 300) + "}",
    "semicolon_groups": "\\boxed{" + "a=1;" * 200 + "}",
    "decimal_comma_digits": "3," + "7" * 900,
}


def _timed_verify(gold, prediction):
    start = time.perf_counter()
    verdict = verify(gold, prediction)
    return verdict, time.perf_counter() - start


@pytest.mark.parametrize("template", INJECTIONS)
def test_injection_runs_nothing(template, tmp_path):
    target = tmp_path / "pwned"
    completion = template.format(path=target)
    verdict, seconds = _timed_verify("7", completion)
    assert verdict is False
    assert seconds < 2.0
    assert not target.exists()
    assert math_accuracy(completion, "7") == 0.0
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bomb_returns_fast(name):
    completion = BOMBS[name]
    for gold in ("1", "x", "\\frac{1}{2}"):
        verdict, seconds = _timed_verify(gold, completion)
        assert isinstance(verdict, bool)
        assert seconds < 2.0, f"{name}: {seconds:.2f}s"


def test_bomb_as_gold_returns_fast():
    for name, text in BOMBS.items():
        verdict, seconds = _timed_verify(text, "1")
        assert isinstance(verdict, bool)
        assert seconds < 2.0, f"{name} as gold: {seconds:.2f}s"


def test_bounded_but_legitimate_values_still_grade():
    assert verify("1024", "\\boxed{2^{10}}")
    assert verify("2^{100}", "\\boxed{1267650600228229401496703205376}")
    assert verify("120", "\\boxed{5!}")
    assert not verify("1", BOMBS["latex_tower"])
    assert verify(BOMBS["latex_tower"], BOMBS["latex_tower"])  # identical text still matches


def test_random_latex_soup_never_raises():
    import random

    pieces = ["\\frac", "\\sqrt", "{", "}", "(", ")", "[", "]", "^", "_", "1", "23", "0.5", ".", "x", "e", "i",
              "\\pi", "+", "-", "/", "=", "<", "\\le", ",", "\\{", "\\}", "!", "%", "\\text{cm}", "\\boxed{",
              "<answer>", "</answer>", "\\begin{pmatrix}", "\\end{pmatrix}", "&", "\\\\", "|", "\\infty", "\\cup",
              "\\pm", "\\sin", "\\log_", "\\binom", " ", "and", "apples", "\\left(", "\\right)", "9^", "10^{", "$",
              "\\cdot", "1e5", "\\sqrt[", "'"]
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(1500):
        soup = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        gold = rng.choice(["1", "x", "(1,2)", "\\frac{1}{2}", "[0,1)", soup])
        assert isinstance(verify(gold, soup), bool)
        assert isinstance(verify(soup, gold), bool)
    assert time.perf_counter() - start < 20
