"""Math answers: find the final answer in a completion, decide whether it equals the gold answer.

`verify(gold, prediction)` is the whole grader; `math_accuracy` is the reward built on it. The rules, all in one place
(each has cases in tests/rewards/test_rewards_math.py, TABLE and CATEGORIES):

  where the answer is taken from
    prediction   the last <answer>…</answer> (its boxes if it has any), else the last \\boxed{…} together with the
                 boxes just before it joined only by `,` / `and` / `or` (\\boxed{2}, \\boxed{5} -> 2, 5; a box
                 after other text is a correction: only the last counts), else a "final answer is …" / "answer: …"
                 phrase (markdown ** dropped), else the line after a last `####`, else the whole text if it parses
                 as an answer, else the last number in the text
    gold         the text after the last `####` (GSM8K), else the last \\boxed{…}, else the whole text
    both         JSON-escaped LaTeX (every command written \\\\frac) is read with single backslashes
  when two answers are equal
    text         same after normalisation (case, spaces, \\text{}, \\left/\\right, \\! \\, $, trailing period)
    numbers      exact rationals: 1,234 = 12{,}345-style thousands; 0.5 = 1/2 = \\dfrac12; 1.5e3 = 1500; a decimal
                 comma in a prediction (3,75 = 3{,}75 = 3.75, not three digits after it) only against a single gold
                 number; a gold `2,5` is the list 2, 5 (decimal_comma=False: never a decimal)
    decimals     may approximate a value without a finite expansion to 1e-6 relative (0.3333333 = 1/3,
                 1.41421356 = \\sqrt2; 0.333 != 1/3, 3.14 != \\pi); a value with one must match exactly
                 (0.7500001 != 3/4); irrational values otherwise compare as floats to 1e-9 relative
    percent      p% also equals p/100 on the other side (50% = 50 = 0.5; 50 != 0.5); ^\\circ is dropped
    units        dropped when one side has none or both have the same (5 cm = 5, 10\\text{ m} = 10, \\$18 = 18);
                 different unit words differ (10 cm != 10 m)
    labels       `x = 7` = 7; a chain states its last side (x = 3+4 = 7 is 7) up to its first \\approx
                 (x = 7 \\approx 6.9 is 7, not 6.9); `S_1:S_2 = 5:9` = 5:9; a ratio a:b is a/b (5:9 = 10:18);
                 labelled values `x=1, y=2` are the tuple (1, 2); `;` splits groups (a=3,b=1;a=5,b=1 = (3,1),(5,1));
                 two labelled lists match label by label, in any order
    equations    a = b vs c = d: the same equation up to sides and sign (2x+3y=6 = 6=3y+2x; a different right side
                 differs)
    expressions  with variables: equal at three random rational points, with sympy's simplify of the difference as
                 a fallback for small algebraic expressions (\\sin x != \\cos x)
    sequences    tuples and intervals are ordered and keep their brackets ((1,2) != (2,1), [t,t+1] != [t+1,t],
                 [1,2) != (1,2)); sets \\{…\\} and bare lists `1, 2` (also joined by and / or) are unordered and
                 must have the same size (\\boxed{2}, \\boxed{3} != 2: wrong alternatives beside the gold fail);
                 a bare list also matches a tuple in order
    intervals    an inequality on one variable, -variable or |variable| equals the interval(s) it describes
                 (0<y<2 = (0,2); -x>-4 = x<4; 2\\le|t|\\le3 = [-3,-2]\\cup[2,3]; x<1 or x>2 = (-oo,1)\\cup(2,oo));
                 unions compare as unordered sets of intervals
    matrices     pmatrix / bmatrix / array (also inside \\left( \\right)) compare cell by cell; a one-row or
                 one-column matrix also matches a tuple
Nothing here evaluates model text as code; see math_parse for the bounds on every input.
"""

import cmath
import re
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

from thinkzero.rewards import math_parse as mp
from thinkzero.rewards.registry import reward

DECIMAL_REL_TOL = 1e-6
FLOAT_REL_TOL = 1e-9
_ABS_TOL = 1e-12
_MAX_SYMPY_NODES = 60
# A final answer sits at the end: markers are searched for in the last MAX_SCAN_CHARS characters only.
MAX_SCAN_CHARS = 100_000

# --- extraction -----------------------------------------------------------------------------------------------------

_BRACE_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_BOXED_BARE_RE = re.compile(r"\\boxed +([^\s{}$]+)")
_PHRASE_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:|=)\s*:?\s*([^\n]{1,200})", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


_BOX_JOINER_RE = re.compile(r"[\s,;$]*(?:(?:\\text\s*\{\s*(?:and|or)\s*\}|\band\b|\bor\b|\\quad|\\qquad)[\s,;$]*)?")
MAX_JOINED_BOXES = 20


def _boxed_spans(text: str) -> tuple[str, list[tuple[int, int]]]:
    """The scanned tail of `text` and the (start, end) of each complete outermost \\boxed{…} content in it."""
    start = text.find("\\boxed", max(0, len(text) - MAX_SCAN_CHARS))
    fbox = text.find("\\fbox", max(0, len(text) - MAX_SCAN_CHARS))
    if start < 0 and fbox < 0:
        return text, []
    text = text[min(i for i in (start, fbox) if i >= 0):]
    stack: list[tuple[bool, int]] = []
    boxed_open = 0
    spans = []
    for m in _BRACE_RE.finditer(text):
        tok = m.group(0)
        if tok in ("\\{", "\\}"):
            continue
        if tok == "}":
            if stack:
                is_boxed, start = stack.pop()
                if is_boxed:
                    boxed_open -= 1
                    if boxed_open == 0:
                        spans.append((start, m.start()))
        else:
            is_boxed = tok != "{"
            boxed_open += is_boxed
            stack.append((is_boxed, m.end()))
    bare = None
    for m in _BOXED_BARE_RE.finditer(text):
        bare = m
    if bare is not None and (not spans or bare.start() > spans[-1][1]):
        spans.append(bare.span(1))
    return text, spans


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{…} (outermost if nested), one linear pass over the text's tail."""
    text, spans = _boxed_spans(text)
    return text[spans[-1][0]:spans[-1][1]] if spans else None


def final_boxed(text: str) -> str | None:
    """The last \\boxed{…} together with the boxes just before it that only a comma, 'and' or 'or' separates from it:
    `\\boxed{2}, \\boxed{5}` -> '2, 5' (several answers), but `\\boxed{3} then \\boxed{4}` -> '4' (a correction)."""
    text, spans = _boxed_spans(text)
    if not spans:
        return None
    first = len(spans) - 1
    while first > 0 and len(spans) - first < MAX_JOINED_BOXES:
        gap = text[spans[first - 1][1] + 1:spans[first][0]]
        gap = re.sub(r"\\(?:boxed|fbox)\s*\{?$", "", gap)
        if _BOX_JOINER_RE.fullmatch(gap) is None:
            break
        first -= 1
    return ", ".join(text[a:b].strip() for a, b in spans[first:])


def extract_answer(text: str) -> str | None:
    """The answer a completion marks as final (answer tag, \\boxed, or an 'answer is' phrase), else None."""
    start = text.rfind("<answer>")
    if start >= 0:
        end = text.find("</answer>", start)
        if end >= 0:
            inner = text[start + len("<answer>"):end]
            boxed = final_boxed(inner)
            return (boxed if boxed is not None else inner).strip()
    boxed = final_boxed(text)
    if boxed is not None:
        return boxed.strip()
    phrase = None
    for m in _PHRASE_RE.finditer(text, max(0, len(text) - MAX_SCAN_CHARS)):
        phrase = m
    if phrase is not None:  # markdown bold and a closing period are not part of the answer
        return phrase.group(1).strip().rstrip(".").strip().strip("*").strip().rstrip(".").strip()
    pos = text.rfind("####", max(0, len(text) - MAX_SCAN_CHARS))
    if pos >= 0 and text[pos + 4:].strip():
        return text[pos + 4:].strip().splitlines()[0].strip().rstrip(".").strip()
    return None


def extract_gsm8k_gold(text: str) -> str:
    """The final answer of a GSM8K solution: '… #### 1,234' -> '1234'."""
    pos = text.rfind("####")
    if pos < 0:
        raise ValueError(f"no '####' final-answer marker in GSM8K solution {text[-80:]!r}")
    answer = text[pos + 4:].strip().splitlines()
    if not answer or not answer[0].strip():
        raise ValueError(f"nothing after '####' in GSM8K solution {text[-80:]!r}")
    answer = answer[0].strip().replace("$", "").rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    return answer


def gold_answer(gold: str) -> str:
    if "####" in gold:
        return extract_gsm8k_gold(gold)
    boxed = last_boxed(gold) if "\\boxed" in gold or "\\fbox" in gold else None
    return (boxed if boxed is not None else gold).strip()


# --- parsing (cached: a gold answer is graded once per sampled completion) -------------------------------------------

_NORM_RE = re.compile(r"\\left|\\right|\\!|\\,|\\;|[\s$]")


def _norm_string(text: str) -> str:
    return _NORM_RE.sub("", mp.clean(text)).lower()


@lru_cache(maxsize=8192)
def _parse(text: str):
    """Tree for an answer string, or None when it cannot be parsed (or is over a bound)."""
    if len(text) > mp.MAX_CHARS:
        return None
    try:
        return mp.parse(mp.clean(text))
    except (mp.AnswerError, RecursionError):
        return None
    except (ValueError, TypeError, IndexError, KeyError, ArithmeticError):  # a parser bug must not stop grading
        return None


# --- equality -------------------------------------------------------------------------------------------------------

_STRUCTURE = {"rel", "seq", "set", "list", "union", "matrix", "text"}
# Three points per symbol (symbol k of a comparison gets column k); rationals keep polynomial checks exact.
_POINTS = [
    [Fraction(p, q) for p, q in ((7, 11), (13, 17), (19, 23), (29, 31), (37, 41), (43, 47), (53, 59), (61, 67))],
    [Fraction(p, q) for p, q in ((23, 13), (31, 19), (41, 29), (47, 37), (59, 43), (67, 53), (73, 61), (83, 71))],
    [Fraction(p, q) for p, q in ((5, 3), (11, 7), (3, 2), (17, 13), (9, 5), (19, 11), (25, 14), (27, 16))],
]


def _terminates(x: Fraction) -> bool:
    """Whether x has a finite decimal expansion (its denominator has no prime factors but 2 and 5)."""
    d = x.denominator
    for prime in (2, 5):
        while d % prime == 0:
            d //= prime
    return d == 1


def _close(a, b, rel: float) -> bool | None:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if a == b:
            return True
        # A decimal may approximate a value it cannot write exactly (1/3, 2/7); a value it can write (an integer,
        # 3/4) must be written exactly: 1000000.5 != 1000000.
        inexact = not (_terminates(a) and _terminates(b))
        return inexact and rel > 0 and abs(a - b) <= rel * max(abs(a), abs(b))
    try:
        ca, cb = complex(a), complex(b)
    except OverflowError:
        return None
    if cmath.isnan(ca) or cmath.isnan(cb):
        return None
    inf_a = abs(ca) == float("inf")
    inf_b = abs(cb) == float("inf")
    if inf_a or inf_b:
        return inf_a and inf_b and ca.real == cb.real and (ca.imag == cb.imag or ca.imag == 0 == cb.imag)
    scale = max(abs(ca), abs(cb))
    return abs(ca - cb) <= max(max(rel, FLOAT_REL_TOL) * scale, _ABS_TOL)


def _equal_values(g, p, rel, g_percent, p_percent) -> bool | None:
    result = _close(g, p, rel)
    if result:
        return True
    if g_percent and _close(g / 100, p, rel):
        return True
    if p_percent and _close(g, p / 100, rel):
        return True
    return result


def _equal_expr(g, p) -> bool:
    if g.tag in _STRUCTURE or p.tag in _STRUCTURE:
        return False
    rel = DECIMAL_REL_TOL if mp.has_decimal(g) or mp.has_decimal(p) else 0.0
    symbols = sorted(mp.symbols_of(g) | mp.symbols_of(p))
    if len(symbols) > len(_POINTS[0]):
        return False
    g_percent, p_percent = mp.has_tag(g, {"percent"}), mp.has_tag(p, {"percent"})
    checked = 0
    for point in _POINTS if symbols else _POINTS[:1]:
        env = dict(zip(symbols, point))
        try:
            gv, pv = mp.evaluate(g, env), mp.evaluate(p, env)
        except mp.TooLarge:
            return False
        except mp.EvalError:
            continue
        verdict = _equal_values(gv, pv, rel, g_percent, p_percent)
        if verdict is False:
            return False
        if verdict:
            checked += 1
    if checked:
        return True
    return _equal_sympy(g, p)


_ALGEBRAIC = {"num", "sym", "const", "add", "sub", "mul", "div", "neg", "pow", "percent"}


def _algebraic(node) -> bool:
    """Rational operations and small integer powers only: what simplify handles in predictable time."""
    if node.tag not in _ALGEBRAIC:
        return False
    if node.tag == "pow" and not (node.right.tag == "num" and node.right.value.denominator == 1
                                  and abs(node.right.value) <= 20):
        return False
    return all(_algebraic(part) for part in node[1:] if type(part) in mp.NODE_TYPES)


def _equal_sympy(g, p) -> bool:
    """Last resort for small algebraic expressions with variables that the numeric check could not evaluate."""
    if mp.size(g) + mp.size(p) > _MAX_SYMPY_NODES or not (mp.symbols_of(g) | mp.symbols_of(p)):
        return False
    if not (_algebraic(g) and _algebraic(p)):
        return False
    try:
        import sympy

        diff = mp.to_sympy(g) - mp.to_sympy(p)
        return sympy.simplify(diff) == 0
    except Exception:  # noqa: BLE001 -- sympy raises many kinds of errors on odd input; undecided means not equal
        return False


def _rhs(node):
    """The value an equation chain states: `x = 3` -> 3, `2 + 3 = 5` -> 5."""
    return node.sides[-1] if node.tag == "rel" and all(op == "=" for op in node.ops) else None


_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}
_INF = mp.Name("const", "inf")


class Interval(NamedTuple):
    """A piece of the real line; the bounds are trees (-inf is neg(const inf))."""

    lo: tuple
    hi: tuple
    lo_closed: bool
    hi_closed: bool


def _neg(node):
    return mp.Unary("neg", node)


def _one_sided(var, op, bound):
    """Intervals of `var op bound` where var is a symbol, -symbol or |symbol|; None for anything else."""
    if var.tag == "neg" and var.arg.tag in ("sym", "abs"):  # -x > -4  ->  x < 4
        var, op, bound = var.arg, _FLIP[op], _neg(bound)
    if var.tag == "sym":
        if op in ("<", "<="):
            return [Interval(_neg(_INF), bound, False, op == "<=")]
        return [Interval(bound, _INF, op == ">=", False)]
    if var.tag == "abs" and var.arg.tag == "sym":  # |x| < 2 -> (-2, 2); |x| >= 2 -> (-inf, -2] U [2, inf)
        if op in ("<", "<="):
            return [Interval(_neg(bound), bound, op == "<=", op == "<=")]
        return [Interval(_neg(_INF), _neg(bound), False, op == ">="), Interval(bound, _INF, op == ">=", False)]
    return None


def _intervals(node):
    """The Intervals a node describes: `(a, b]`, a union of those, an inequality on one
    variable (or on |variable|: 2 <= |t| <= 3 is [-3, -2] U [2, 3]), or a list of inequalities ('x < 1 or x > 2');
    None for anything else."""
    tag = node.tag
    if tag == "seq" and len(node.items) == 2:
        return [Interval(node.items[0], node.items[1], node.open == "[", node.close == "]")]
    if tag in ("union", "list"):
        if tag == "list" and not all(item.tag == "rel" for item in node.items):
            return None
        parts = [_intervals(item) for item in node.items]
        return None if any(p is None for p in parts) else [iv for p in parts for iv in p]
    if tag != "rel" or any(op not in _FLIP for op in node.ops):
        return None
    ops, sides = node.ops, node.sides
    if len(ops) == 1:
        a, b = sides
        if _one_sided(b, "<", a) is not None and _one_sided(a, "<", b) is None:
            a, b, op = b, a, _FLIP[ops[0]]
        else:
            op = ops[0]
        return _one_sided(a, op, b)
    if len(ops) != 2 or (ops[0] in ("<", "<=")) != (ops[1] in ("<", "<=")):
        return None
    lo_op, hi_op = ops
    lo, var, hi = sides
    if ops[0] in (">", ">="):  # 5 > x >= 1
        lo, hi, lo_op, hi_op = hi, lo, _FLIP[ops[1]], _FLIP[ops[0]]
    below, above = _one_sided(var, ">" if lo_op == "<" else ">=", lo), _one_sided(var, hi_op, hi)
    if below is None or above is None:
        return None
    if var.tag == "sym" or var.tag == "neg" and var.arg.tag == "sym":
        if var.tag == "neg":  # -3 < -x < 1  ->  -1 < x < 3
            return [Interval(above[0].lo, below[0].hi, above[0].lo_closed, below[0].hi_closed)]
        return [Interval(below[0].lo, above[0].hi, below[0].lo_closed, above[0].hi_closed)]
    # lo <= |t| <= hi: the two pieces [-hi, -lo] and [lo, hi]
    inner = _one_sided(var, hi_op, hi)[0]
    outer = _one_sided(var, ">" if lo_op == "<" else ">=", lo)
    return [Interval(inner.lo, outer[0].hi, inner.lo_closed, outer[0].hi_closed),
            Interval(outer[1].lo, inner.hi, outer[1].lo_closed, inner.hi_closed)]


def _equal_interval(a: Interval, b: Interval) -> bool:
    return a.lo_closed == b.lo_closed and a.hi_closed == b.hi_closed and _equal(a.lo, b.lo) and _equal(a.hi, b.hi)


def _exact_part(node):
    """`x = 7 \\approx 6.9` states x = 7: a chain is read up to its first \\approx."""
    if node.tag != "rel" or "~" not in node.ops:
        return node
    k = node.ops.index("~")
    return node.sides[0] if k == 0 else mp.Rel("rel", node.ops[:k], node.sides[:k + 1])


def _equal_unordered(gs: list, ps: list, equal=None) -> bool:
    """Same items in any order, each used once; `equal` compares two items (default: `_equal`)."""
    equal = equal or _equal
    if len(gs) != len(ps):
        return False
    remaining = list(ps)
    for g in gs:
        for j, p in enumerate(remaining):
            if equal(g, p):
                del remaining[j]
                break
        else:
            return False
    return True


def _equal_ordered(gs: list, ps: list) -> bool:
    return len(gs) == len(ps) and all(_equal(g, p) for g, p in zip(gs, ps))


def _cells(node):
    """A matrix's cells as a flat list when it is one row or one column, else None."""
    rows = node.rows
    if len(rows) == 1:
        return rows[0]
    if all(len(r) == 1 for r in rows):
        return [r[0] for r in rows]
    return None


def _equal_relations(g, p) -> bool:
    if g.sides[0].tag == "sym" and p.sides[0].tag == "sym" and _rhs(g) is not None and _rhs(p) is not None:
        return g.sides[0].name == p.sides[0].name and _equal(_rhs(g), _rhs(p))  # x = 3 + 4 = 7 vs x = 7
    if g.ops == p.ops and len(g.sides) == len(p.sides) and all(map(_equal, g.sides, p.sides)):
        return True
    if g.ops == p.ops == ("=",):  # a = b vs c = d: same equation up to sides and sign
        dg = mp.Binary("sub", g.sides[0], g.sides[1])
        return (_equal_expr(dg, mp.Binary("sub", p.sides[0], p.sides[1]))
                or _equal_expr(dg, mp.Binary("sub", p.sides[1], p.sides[0])))
    return False


def _equal(g, p) -> bool:
    tg, tp = g.tag, p.tag
    if tg == "text" or tp == "text":
        return tg == tp and _norm_string(g.name) == _norm_string(p.name)
    g, p = _exact_part(g), _exact_part(p)
    tg, tp = g.tag, p.tag
    if "rel" in (tg, tp) or "union" in (tg, tp) or "list" in (tg, tp):
        gi, pi = _intervals(g), _intervals(p)
        if gi is not None and pi is not None and (tg, tp) != ("seq", "seq"):
            return _equal_unordered(gi, pi, _equal_interval)
    if tg == "rel" or tp == "rel":
        if tg == "rel" and tp == "rel":
            return _equal_relations(g, p)
        rel, other = (g, p) if tg == "rel" else (p, g)
        value = _rhs(rel)
        if value is not None:
            return _equal(value, other) if tg == "rel" else _equal(other, value)
        return False
    if tg in ("set", "list") and tp in ("set", "list"):
        return _equal_unordered(g.items, p.items)
    if tg == "list" and tp == "seq" or tg == "seq" and tp == "list":
        return _equal_ordered(g.items, p.items)
    if tg == "seq" and tp == "seq":
        return g.open == p.open and g.close == p.close and _equal_ordered(g.items, p.items)
    if tg == "union" and tp == "union":
        return _equal_unordered(g.items, p.items)
    if tg == "matrix" and tp == "matrix":
        return len(g.rows) == len(p.rows) and all(_equal_ordered(a, b) for a, b in zip(g.rows, p.rows))
    if tg == "matrix" and tp in ("seq", "list") or tp == "matrix" and tg in ("seq", "list"):
        m, other = (g, p) if tg == "matrix" else (p, g)
        cells = _cells(m)
        if cells is None or (other.tag == "seq" and other.open != "("):
            return False
        return _equal_ordered(cells, other.items) if tg == "matrix" else _equal_ordered(other.items, cells)
    if tg in ("set", "list") and len(g.items) == 1:
        return _equal(g.items[0], p)
    if tp in ("set", "list") and len(p.items) == 1:
        return _equal(g, p.items[0])
    return _equal_expr(g, p)


def _expand_pm(node, budget: int = 2):
    """A tree with a ± as the list of its values (1 \\pm \\sqrt{2} -> 1 + \\sqrt{2}, 1 - \\sqrt{2}); others unchanged."""
    if budget == 0 or not mp.has_tag(node, {"pm"}):
        return node
    if node.tag == "rel":  # x = 1 \pm 2
        last = _expand_pm(node.sides[-1], budget)
        return last if last.tag == "list" and all(op == "=" for op in node.ops) else node
    variants = []

    def substitute(n, tag):
        if n.tag == "pm":
            return mp.Binary(tag, n.left, n.right)
        return type(n)(*(substitute(part, tag) if type(part) in mp.NODE_TYPES and mp.has_tag(part, {"pm"})
                         else part for part in n))

    for tag in ("add", "sub"):
        expanded = _expand_pm(substitute(node, tag), budget - 1)
        variants.extend(expanded.items if expanded.tag == "list" else [expanded])
    return mp.Items("list", variants)


@lru_cache(maxsize=8192)
def _units(text: str) -> frozenset:
    """The unit words an answer carries ('10 \\text{ cm}' -> {'cm'})."""
    try:
        tokens = mp.tokenize(mp.clean(text)) if len(text) <= mp.MAX_CHARS else []
    except mp.AnswerError:
        return frozenset()
    words = (str(value).lower() for kind, value, _ in tokens if kind == "word")
    words = (w[:-1] if len(w) > 2 and w.endswith("s") else w for w in words)
    return frozenset(w for w in words if w in mp.UNIT_WORDS)


# 3,75 or 3{,}75: a decimal comma (not a thousands separator: not exactly three digits after it).
_DECIMAL_COMMA_RE = re.compile(r"(-?\d+)(?:,|\{,\})(\d{1,2}|\d{4,})")


def _decimal_comma(text: str) -> str | None:
    m = _DECIMAL_COMMA_RE.fullmatch(text.strip().strip("$").strip())
    return f"{m.group(1)}.{m.group(2)}" if m else None


def answers_equal(gold: str, prediction: str, decimal_comma: bool = True) -> bool:
    """Equality of two bare answers (no extraction)."""
    if _norm_string(gold) == _norm_string(prediction) and _norm_string(gold):
        return True
    g_units, p_units = _units(gold), _units(prediction)
    if g_units and p_units and g_units != p_units:
        return False
    if decimal_comma:  # a predicted `3,75` is 3.75 only against a single number: against `3, 75` it is a list
        reading = _decimal_comma(prediction)
        parsed = _parse(gold)
        if reading is not None and parsed is not None and parsed.tag not in _STRUCTURE:
            return answers_equal(gold, reading, False)
    g, p = _parse(gold), _parse(prediction)
    if g is None or p is None:
        return False
    try:
        return _equal(_expand_pm(g), _expand_pm(p))
    except (mp.AnswerError, RecursionError):
        return False
    except (ValueError, TypeError, IndexError, KeyError, ArithmeticError):  # a grader bug must not stop grading
        return False


_DOUBLED_RE = re.compile(r"\\\\[a-zA-Z]")
_SINGLE_RE = re.compile(r"(?<!\\)\\[a-zA-Z]")


def _unescape(text: str) -> str:
    """JSON-escaped LaTeX ('\\\\frac{1}{2}') back to LaTeX, when every command in it is doubled."""
    if _DOUBLED_RE.search(text) and not _SINGLE_RE.search(text):
        return text.replace("\\\\", "\\")
    return text


_WORD_RE = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")


def _looks_like_answer(text: str) -> bool:
    """A bare answer ('5 apples', 'x = 3'), not prose whose numbers a parser would run together."""
    return len(text) <= 200 and "\n" not in text and len(_WORD_RE.findall(text[:200])) < 4


def verify(gold: str, prediction: str, decimal_comma: bool = True) -> bool:
    """Whether `prediction` (a completion or a bare answer) states the same final answer as `gold`."""
    gold, prediction = _unescape(gold), _unescape(prediction)
    try:
        gold_text = gold_answer(gold)
    except ValueError:
        return False
    explicit = extract_answer(prediction)
    if explicit is not None:
        return answers_equal(gold_text, explicit, decimal_comma)
    candidate = prediction.strip()
    if _looks_like_answer(candidate) and (_parse(candidate) is not None or _decimal_comma(candidate)):
        return answers_equal(gold_text, candidate, decimal_comma)
    last = None
    for m in _NUMBER_RE.finditer(prediction, max(0, len(prediction) - MAX_SCAN_CHARS)):
        last = m
    return last is not None and answers_equal(gold_text, last.group(0), decimal_comma)


@reward("math_accuracy")
def math_accuracy(completion: str, answer: str, decimal_comma: bool = True) -> float | None:
    """1.0 when the completion's final answer equals the gold `answer`, else 0.0; None if the gold is unusable.

    decimal_comma=False reads `3,75` only as the list 3, 75 (for data where a comma never marks decimals)."""
    try:
        gold_text = gold_answer(answer)
    except ValueError:
        return None
    if not gold_text or (_parse(gold_text) is None and not _norm_string(gold_text)):
        return None
    return 1.0 if verify(answer, completion, decimal_comma) else 0.0
