"""Benchmark the math grader against the `math-verify` package (bench extra) on the same 2,000 answers.

    python scripts/bench_rewards.py [--n 2000] [--seed 0] [--show 10]

The answers: our hand-written tables (tests/rewards/test_rewards_math.py: TABLE and the per-category CATEGORIES) plus generated pairs (integers with
separators, fractions vs decimals, roots, polynomials, scientific notation, percentages, tuples, intervals, multiples
of pi), each with a known verdict. Both graders see the same gold and prediction text; math-verify gets the gold after
GSM8K `####` extraction and predictions after `<answer>` extraction (it has no such rules), and each text in `$…$`
when it has no LaTeX anchor of its own (that is how math-verify expects LaTeX; without it, it misses more). Caches are cleared before timing. Prints throughput
(answers/s), verdict agreement, errors on our tables and on the generated pairs, agreement by category; the last line is `speedup=X.XX`
(our answers/s over math-verify's).
"""

import argparse
import importlib.util
import pathlib
import random
import sys
import time
import warnings
from math import gcd

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thinkzero.rewards import math as ours


def load_tables():
    """(category, gold, prediction, expected) rows: the base table as category 'table', then the issue-17 categories."""
    path = ROOT / "tests" / "rewards" / "test_rewards_math.py"
    spec = importlib.util.spec_from_file_location("_bench_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [("table", *row) for row in module.TABLE] + list(module.CATEGORY_ROWS)


def _frac(p, q):
    g = gcd(p, q)
    return p // g, q // g


def generate(rng: random.Random, n: int):
    """n (kind, gold, prediction, expected) rows, half of them equal, half near misses."""

    def integer(same):
        v = rng.randint(-5000, 2_000_000)
        gold = rng.choice([str(v), f"#### {v:,}", f"${v}$"])
        w = v if same else v + rng.choice([-10, -1, 1, 2, 100])
        pred = rng.choice([f"{w:,}", f"\\boxed{{{w}}}", f"The answer is {w}.", f"<answer>{w}</answer>"])
        return gold, pred

    def fraction(same):
        q = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 16, 20, 25])
        p, q = _frac(rng.randint(1, 60), q)
        gold = f"\\frac{{{p}}}{{{q}}}"
        if same:
            k = rng.randint(2, 5)
            options = [f"\\dfrac{{{k * p}}}{{{k * q}}}", f"{p}/{q}", f"\\boxed{{\\tfrac{{{p}}}{{{q}}}}}"]
            if all(f not in (3, 7, 9, 11) for f in (q % 3 == 0 and 3, q % 7 == 0 and 7, q % 11 == 0 and 11)):
                options.append(f"{p / q:.6f}".rstrip("0").rstrip("."))
            return gold, rng.choice(options)
        options = [f"\\frac{{{p + 1}}}{{{q}}}", f"{round(p / q, 2)}"]
        if p != q:
            options.append(f"\\frac{{{q}}}{{{p}}}")
        pred = rng.choice(options)
        if pred == f"{round(p / q, 2)}" and abs(round(p / q, 2) - p / q) < 1e-12:
            pred = f"\\frac{{{p + 1}}}{{{q}}}"
        return gold, pred

    def root(same):
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7, 10, 11, 13])
        gold = f"{a}\\sqrt{{{b}}}"
        pred = f"\\sqrt{{{a * a * b}}}" if same else rng.choice([f"\\sqrt{{{a * b}}}", f"{a + 1}\\sqrt{{{b}}}"])
        return gold, f"\\boxed{{{pred}}}"

    def polynomial(same):
        a, b = rng.randint(-9, 9), rng.randint(1, 9)
        gold = f"(x{a:+d})(x{b:+d})"
        c = a * b if same else a * b + rng.choice([-1, 1])
        return gold, f"\\boxed{{x^2 {a + b:+d}x {c:+d}}}"

    def scientific(same):
        m, k = rng.randint(11, 99) / 10, rng.randint(2, 9)
        value = round(m * 10 ** k)
        gold = str(value)
        kk = k if same else k + 1
        return gold, rng.choice([f"{m} \\times 10^{{{kk}}}", f"{m}e{kk}"])

    def percent(same):
        v = rng.randint(1, 99)
        gold = f"{v}\\%"
        w = v if same else v + 1
        return gold, rng.choice([f"{w}\\%", f"{w}", f"{w / 100}"])

    def pair(same):
        a, b = rng.sample(range(-20, 20), 2)
        return f"({a}, {b})", (f"({a},{b})" if same else f"({b},{a})")

    def interval(same):
        a, b = sorted(rng.sample(range(-20, 20), 2))
        gold = f"[{a}, {b})"
        return gold, (f"{a} \\le x < {b}" if same else rng.choice([f"({a}, {b}]", f"[{a}, {b}]"]))

    def pi(same):
        k, m = _frac(rng.randint(1, 12), rng.randint(2, 12))
        gold = f"\\frac{{{k}\\pi}}{{{m}}}"
        pred = f"\\frac{{{k}}}{{{m}}}\\pi" if same else f"\\frac{{{k}\\pi}}{{{m + 1}}}"
        return gold, pred

    kinds = [integer, fraction, root, polynomial, scientific, percent, pair, interval, pi]
    out = []
    for i in range(n):
        same = i % 2 == 0
        kind = rng.choice(kinds)
        gold, pred = kind(same)
        out.append((kind.__name__, gold, pred, same))
    return out


def _anchored(text: str) -> str:
    start = text.rfind("<answer>")  # our completion format; math-verify does not know the tag
    if start >= 0 and text.find("</answer>", start) >= 0:
        text = text[start + len("<answer>"):text.find("</answer>", start)]
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"


def run_math_verify(pairs):
    from math_verify import parse, verify

    verdicts = []
    for gold, pred in pairs:
        try:
            g = ours.gold_answer(gold)
        except ValueError:
            g = gold
        try:
            verdicts.append(bool(verify(parse(_anchored(g)), parse(_anchored(pred)))))
        except Exception:  # noqa: BLE001 -- math-verify errors count as "not equal", as in its own default
            verdicts.append(False)
    return verdicts


def run_ours(pairs):
    return [ours.verify(gold, pred) for gold, pred in pairs]


def timed(fn, pairs):
    start = time.perf_counter()
    verdicts = fn(pairs)
    return verdicts, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="total answers (table + generated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="print this many disagreements")
    args = parser.parse_args()
    try:
        import math_verify  # noqa: F401
    except ImportError:
        sys.exit("math-verify is not installed: pip install -e '.[bench]' (or pip install math-verify)")

    table = load_tables()
    generated = generate(random.Random(args.seed), max(0, args.n - len(table)))
    data = table + generated
    categories = [c for c, _, _, _ in data]
    pairs = [(g, p) for _, g, p, _ in data]
    expected = [e for _, _, _, e in data]

    warm = pairs[:20]  # imports, grammar construction
    run_ours(warm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_math_verify(warm)
    ours._parse.cache_clear()

    ours_v, ours_s = timed(run_ours, pairs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mv_v, mv_s = timed(run_math_verify, pairs)

    n, nt = len(pairs), len(table)
    agree = sum(a == b for a, b in zip(ours_v, mv_v))
    ours_table = sum(v != e for v, e in zip(ours_v[:nt], expected[:nt]))
    mv_table = sum(v != e for v, e in zip(mv_v[:nt], expected[:nt]))
    ours_gen = sum(v != e for v, e in zip(ours_v[nt:], expected[nt:]))
    mv_gen = sum(v != e for v, e in zip(mv_v[nt:], expected[nt:]))
    print(f"answers: {n} (table {nt}, generated {n - nt}, seed {args.seed})")
    print(f"ours:        {n / ours_s:10.1f} answers/s ({ours_s:.2f} s)")
    print(f"math-verify: {n / mv_s:10.1f} answers/s ({mv_s:.2f} s)")
    print(f"verdict agreement: {agree}/{n} ({100 * agree / n:.1f}%)")
    print(f"wrong on our tables ({nt}): ours={ours_table} math-verify={mv_table}")
    print(f"wrong on generated ({n - nt}): ours={ours_gen} math-verify={mv_gen}")
    print("by category (rows, where ours and math-verify differ, wrong: ours / math-verify):")
    for cat in dict.fromkeys(categories):
        rows = [i for i, c in enumerate(categories) if c == cat]
        differ = sum(ours_v[i] != mv_v[i] for i in rows)
        wrong_ours = sum(ours_v[i] != expected[i] for i in rows)
        wrong_mv = sum(mv_v[i] != expected[i] for i in rows)
        print(f"  {cat:24} {len(rows):5}  differ={differ:4}  wrong={wrong_ours} / {wrong_mv}")
    shown = 0
    for (g, p), e, a, b in zip(pairs, expected, ours_v, mv_v):
        if shown >= args.show:
            break
        if a != b or a != e:
            print(f"  expected={e!s:5} ours={a!s:5} math-verify={b!s:5} gold={g[:50]!r} pred={p[:60]!r}")
            shown += 1
    print(f"speedup={(n / ours_s) / (n / mv_s):.2f}")


if __name__ == "__main__":
    main()
