"""A small, bounded parser for final answers written in LaTeX or plain math.

Model text is never handed to Python or to sympy's string parsers (`eval`, `sympify`, `parse_expr`): we tokenize it
ourselves, parse it with a recursive-descent parser into a tree of small NamedTuples, and evaluate that tree with exact
`Fraction` arithmetic (falling back to complex floats for irrational values). sympy objects are only ever built from
the tree through constructors (`to_sympy`), and only for small trees.

Every resource an answer could blow up is bounded before any arithmetic happens:
  * answer length (MAX_CHARS), tokens (MAX_TOKENS), nesting depth (MAX_DEPTH), tree size (MAX_NODES),
  * digits in a literal (MAX_DIGITS), exponent magnitude (MAX_EXPONENT), factorial argument (MAX_FACTORIAL),
  * size of every exact intermediate result (MAX_BITS).
Anything over a bound raises `TooLarge`; anything unparseable raises `ParseError`. Both are `AnswerError`.

Tree nodes are small NamedTuples whose first field is the tag (so they still compare and unpack as tuples):
  Num(num, value: Fraction, is_decimal)   Name(sym | const | text, name) (const: pi e i inf)
  Unary(neg | fact | abs | percent, arg)  Binary(add | sub | mul | div | pow | binom | pm, left, right)
  Func(func, name, arg)  Log(log, base, arg)  Root(root, arg, index)
  Rel(rel, ops, sides) (ops: = < > <= >= != and ~ for \\approx)   Seq(seq, open, close, items) (tuples, intervals)
  Items(set | list | union, items) (a `;` list holds `,` lists: a=3,b=1;a=5,b=1)   Matrix(matrix, rows)
`pm` is a ± b: it stands for the two values a + b and a - b.
"""

import cmath
import math
import re
from fractions import Fraction
from typing import NamedTuple

MAX_CHARS = 1_000
MAX_TOKENS = 400
MAX_DEPTH = 40
MAX_NODES = 400
MAX_DIGITS = 200
MAX_EXPONENT = 1_000
MAX_FACTORIAL = 1_000
MAX_BITS = 50_000


class AnswerError(ValueError):
    """The text is not an answer we can evaluate."""


class ParseError(AnswerError):
    pass


class TooLarge(AnswerError):
    pass


# --- tree nodes -----------------------------------------------------------------------------------------------------

class Num(NamedTuple):
    tag: str  # "num"
    value: Fraction
    is_decimal: bool  # written with a decimal point: it may approximate a value (see math._close)


class Name(NamedTuple):
    tag: str  # "sym" | "const" | "text"
    name: str


class Unary(NamedTuple):
    tag: str  # "neg" | "fact" | "abs" | "percent"
    arg: tuple


class Binary(NamedTuple):
    tag: str  # "add" | "sub" | "mul" | "div" | "pow" | "binom" | "pm"
    left: tuple
    right: tuple


class Func(NamedTuple):
    tag: str  # "func"
    name: str  # a key of _CFUNCS
    arg: tuple


class Log(NamedTuple):
    tag: str  # "log"
    base: tuple
    arg: tuple


class Root(NamedTuple):
    tag: str  # "root"
    arg: tuple
    index: tuple


class Rel(NamedTuple):
    tag: str  # "rel"
    ops: tuple  # len(sides) - 1 of "=", "<", ">", "<=", ">=", "!=", "~"
    sides: list


class Seq(NamedTuple):
    tag: str  # "seq"
    open: str  # "(" | "["
    close: str  # ")" | "]"
    items: list


class Items(NamedTuple):
    tag: str  # "set" | "list" | "union"
    items: list


class Matrix(NamedTuple):
    tag: str  # "matrix"
    rows: list  # lists of cells, all of one length


# `type(x) in NODE_TYPES`: a node, not one of the plain values or lists it holds (Rel.ops is a plain tuple).
NODE_TYPES = frozenset((Num, Name, Unary, Binary, Func, Log, Root, Rel, Seq, Items, Matrix))


# --- string clean-up ------------------------------------------------------------------------------------------------

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u00f7": "/", "\u22c5": r"\cdot ", "\u00b7": r"\cdot ",
    "\u03c0": r"\pi ", "\u221a": r"\sqrt", "\u221e": r"\infty ", "\u2264": r"\le ", "\u2265": r"\ge ",
    "\u00b0": "", "\u222a": r"\cup ", "\uff0c": ",",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
# LaTeX spacing and sizing that carries no meaning for the value.
_DROP_RE = re.compile(
    r"(?<!\\)(?:\\left\.|\\right\.|\\left\b|\\right\b|\\big+[lr]?\b|\\Big+[lr]?\b|\\displaystyle\b|\\!|\\;|\\:|\\ |\\quad\b|\\qquad\b"
    r"|\^\s*\{\s*\\circ\s*\}|\^\s*\\circ\b|\\circ\b|\\degree\b|\\\$|\$|~|\\,)"
)
# 1,234,567 / 1{,}234 / 1\,234 -> 1234567 (a thousands separator: groups of exactly three digits).
_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+(?![\d])")


def clean(text: str) -> str:
    text = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], text)
    if not re.match(r"\s*(\(|\[|\\\{|\\lbrack|\\langle)", text):  # inside brackets "1,234" is a pair
        text = _THOUSANDS_RE.sub(lambda m: re.sub(r"\{,\}|,|\\,", "", m.group(0)), text)
    text = _DROP_RE.sub(" ", text)
    text = text.replace(r"\%", "%").replace("**", "^")
    return text.strip().rstrip(".").strip()


# --- tokens ---------------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+(?![.\d]))?)"
    r"|(?P<cmd>\\[a-zA-Z]+|\\[{}|\\])"
    r"|(?P<word>[a-zA-Z]+)"
    r"|(?P<op><=|>=|!=|[-+*/^_()\[\]{}=<>!,;|&%:'])"
)
# Function commands and the name their value is computed under (a key of _CFUNCS).
_FUNCS = {name: name for name in ("sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh",
                                  "cosh", "tanh", "exp", "log")} | {"ln": "log", "lg": "log10"}
# The same written as plain words (sin x, sqrt 2); a bare "lg" stays the product l*g, only \lg is a logarithm.
_FUNC_WORDS = (_FUNCS.keys() - {"lg"}) | {"sqrt"}
_CONST_WORDS = {"pi": "pi", "inf": "inf", "infty": "inf", "infinity": "inf"}
_SEPARATOR_WORDS = {"or", "and"}
_UNITS = {"cm", "mm", "km", "kg", "mg", "ml", "mL", "kb", "mb", "gb", "ft", "in", "yd", "mi", "lb", "lbs", "oz",
          "hr", "hrs", "min", "mins", "sec", "secs", "cents", "mph", "kmh", "sq", "units", "unit", "deg"}
# Words that name a unit: two answers that carry different ones differ (10 cm != 10 m); plural "s" is dropped first.
UNIT_WORDS = _UNITS | {"m", "g", "s", "h", "l", "km", "meter", "metre", "centimeter", "centimetre", "millimeter",
                       "kilometer", "kilometre", "gram", "kilogram", "second", "minute", "hour", "day", "week",
                       "month", "year", "liter", "litre", "degree", "radian", "dollar", "cent", "euro", "inch",
                       "inche", "foot", "feet", "yard", "mile", "pound", "ounce", "ton", "acre", "percent"}
_STOPWORDS = {"is", "be", "so", "we", "it", "of", "to", "as", "at", "by", "if", "on", "an", "am", "he", "my", "no",
              "do", "go", "up", "us", "me", "ok"}
_TEXT_CMDS = {"text", "textbf", "textit", "textrm", "textnormal", "mathrm", "mathbf", "mathit", "mbox", "operatorname",
              "mathsf", "texttt", "textsf"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
          "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
_REL_CMDS = {"le": "<=", "leq": "<=", "leqslant": "<=", "ge": ">=", "geq": ">=", "geqslant": ">=", "lt": "<",
             "gt": ">", "neq": "!=", "ne": "!=", "in": "=", "approx": "~", "simeq": "~", "equiv": "="}
_MUL_CMDS = {"times", "cdot", "ast"}
_SKIP_CMDS = {"boxed", "fbox", "mathbb", "mathcal"}  # wrappers whose group is read as-is


def _read_group(text: str, i: int) -> tuple[str, int]:
    """text[i] == '{': return the content up to the matching brace and the index after it."""
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "\\":
            continue
        if c == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
            if depth > MAX_DEPTH:
                raise TooLarge("nesting too deep")
        elif c == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[i + 1:j], j + 1
    raise ParseError("unbalanced braces")


def _group_at(text: str, i: int) -> tuple[str, int] | None:
    """The {…} group at text[i] after any spaces, as _read_group returns it; None when there is none."""
    while i < len(text) and text[i] == " ":
        i += 1
    return _read_group(text, i) if i < len(text) and text[i] == "{" else None


def tokenize(text: str, _depth: int = 0) -> list[tuple[str, object, bool]]:
    """Tokens are (kind, value, attached) where attached says no whitespace preceded the token."""
    if len(text) > MAX_CHARS:
        raise TooLarge(f"answer longer than {MAX_CHARS} characters")
    if _depth > 3:
        raise TooLarge("text groups nested too deep")
    tokens: list[tuple[str, object, bool]] = []
    i, n, attached = 0, len(text), True
    while i < n:
        m = _TOKEN_RE.match(text, i)
        if m is None:
            raise ParseError(f"unexpected character {text[i]!r}")
        kind, value = m.lastgroup, m.group(0)
        i = m.end()
        if kind == "ws":
            attached = False
            continue
        if kind == "num":
            digits = sum(ch.isdigit() for ch in value)
            if digits > MAX_DIGITS:
                raise TooLarge("number with too many digits")
            prev = tokens[-1] if tokens else None
            if prev is not None and prev[0] == "cmd" and prev[1] in ("frac", "sqrt", "binom") and value.isdigit():
                # \frac12 and \sqrt2: LaTeX takes a single character as the argument.
                for ch in value:
                    tokens.append(("num", ch, True))
                attached = True
                continue
            tokens.append(("num", value, attached))
        elif kind == "cmd":
            name = value[1:]
            if name in ("dfrac", "tfrac", "cfrac"):
                name = "frac"
            group = _group_at(text, i) if name in _TEXT_CMDS else None
            if group is not None:
                content, i = group
                after_number = bool(tokens) and tokens[-1][0] == "num"
                tokens.extend(_text_tokens(content, attached, _depth, after_number))
                attached = True
                continue
            tokens.append(("cmd", name, attached))
            group = _group_at(text, i) if name in ("begin", "end") else None
            if group is not None:
                content, i = group
                tokens.append(("env", content.strip(), True))
        elif kind == "word":
            tokens.extend(_word_tokens(value, attached, tokens))
        else:
            tokens.append(("op", value, attached))
        attached = True
        if len(tokens) > MAX_TOKENS:
            raise TooLarge(f"answer has more than {MAX_TOKENS} tokens")
    return tokens


def _text_tokens(content: str, attached: bool, depth: int,
                 after_number: bool = False) -> list[tuple[str, object, bool]]:
    stripped = content.strip()
    if after_number and re.fullmatch(r"[A-Za-z]", stripped):  # 10\text{ m}: a unit
        return [("word", stripped, attached)]
    if re.fullmatch(r"[A-Za-z]", stripped):
        return [("sym", stripped, attached)]
    if stripped.lower() in _SEPARATOR_WORDS:
        return [("op", ",", attached)]
    if re.search(r"[A-Za-z]{2}", stripped) or not stripped:
        return [("word", stripped, attached)]
    return tokenize(content, depth + 1)


def _word_tokens(word: str, attached: bool, previous: list) -> list[tuple[str, object, bool]]:
    if len(word) == 1:
        return [("sym", word, attached)]
    low = word.lower()
    if low in _FUNC_WORDS:
        return [("cmd", low, attached)]
    if low in _CONST_WORDS:
        return [("cmd", "infty" if _CONST_WORDS[low] == "inf" else "pi", attached)]
    if low in _SEPARATOR_WORDS:
        return [("op", ",", attached)]
    prev = previous[-1] if previous else None
    glued = attached and prev is not None and (prev[0] in ("num", "sym") or prev[1] in (")", "}"))
    if word not in _UNITS and low not in _STOPWORDS and (len(word) == 2 or (glued and len(word) <= 3)):
        # "xy", "2ab": a product of single-letter symbols.
        return [("sym", ch, attached if k == 0 else True) for k, ch in enumerate(word)]
    return [("word", word, attached)]


# --- parser ---------------------------------------------------------------------------------------------------------

_OPENERS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}", "lbrack": "rbrack", "langle": "rangle", "lbrace": "rbrace"}


_END = (None, None, True)  # what peek() sees past the last token
_ADDITIVE = {"+": "add", "-": "sub", "pm": "pm", "mp": "pm"}


class _Parser:
    def __init__(self, tokens: list[tuple[str, object, bool]]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.nodes = 0

    # helpers
    def peek(self, k: int = 0) -> tuple[str, object, bool]:
        j = self.pos + k
        return self.tokens[j] if j < len(self.tokens) else _END

    def next(self) -> tuple[str, object, bool]:
        tok = self.peek()
        self.pos += 1
        return tok

    def at_end(self) -> bool:
        return self.pos >= len(self.tokens)

    def at(self, kind, value=None) -> bool:
        tok_kind, tok_value, _ = self.peek()
        return tok_kind == kind and (value is None or tok_value == value)

    def at_op(self, *values) -> bool:
        kind, value, _ = self.peek()
        if kind == "op" and value in values:
            return True
        return kind == "cmd" and ("\\" + value) in values

    def expect_op(self, value):
        if not self.at_op(value):
            raise ParseError(f"expected {value!r}")
        self.pos += 1

    def node(self, node):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise TooLarge("expression too large")
        return node

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise TooLarge("expression nested too deep")

    def leave(self):
        self.depth -= 1

    def braced_tokens(self, unclosed: str) -> list[tuple[str, object, bool]]:
        """The tokens inside the {…} that starts here, nested braces included; moves past its closing brace."""
        start, depth = self.pos + 1, 0
        while True:
            kind, value, _ = self.next()
            if kind is None:
                raise ParseError(unclosed)
            if value == "{":
                depth += 1
            elif value == "}":
                depth -= 1
                if depth == 0:
                    return self.tokens[start:self.pos - 1]

    def braced_list(self):
        """The answer inside {…}, its `{` already read."""
        self.enter()
        inner = self.parse_list(stop=("}",))
        self.leave()
        self.expect_op("}")
        return inner

    # grammar
    def parse_answer(self):
        tree = self.parse_list(stop=())
        if self.pos != len(self.tokens):
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        return tree

    def parse_list(self, stop):
        """Items split by `,`; groups split by `;` (`a=3,b=1;a=5,b=1`: two labelled pairs)."""
        groups = [self.parse_commas(stop)]
        while self.at_op(";"):
            self.pos += 1
            if self.at_end() or self.at_op(*stop):
                break
            groups.append(self.parse_commas(stop))
        return groups[0] if len(groups) == 1 else self.node(Items("list", groups))

    def parse_commas(self, stop):
        items = [self.parse_relation()]
        while self.at_op(","):
            self.pos += 1
            if self.at_end() or self.at_op(*stop):
                break
            items.append(self.parse_relation())
        return items[0] if len(items) == 1 else self.node(Items("list", items))

    def parse_relation(self):
        sides = [self.parse_ratio()]
        ops = []
        while True:
            kind, value, _ = self.peek()
            if kind == "op" and value in ("=", "<", ">", "<=", ">=", "!="):
                op = value
            elif kind == "cmd" and value in _REL_CMDS:
                op = _REL_CMDS[value]
            else:
                break
            self.pos += 1
            ops.append(op)
            sides.append(self.parse_ratio())
        return sides[0] if not ops else self.node(Rel("rel", tuple(ops), sides))

    def parse_ratio(self):
        """`a : b` is the ratio a / b (5:9 = 10:18 = 5/9)."""
        left = self.parse_union()
        while self.at_op(":"):
            self.pos += 1
            left = self.node(Binary("div", left, self.parse_union()))
        return left

    def parse_union(self):
        parts = [self.parse_expr()]
        while self.at("cmd", "cup") or self.at("op", "U"):
            self.pos += 1
            parts.append(self.parse_expr())
        return parts[0] if len(parts) == 1 else self.node(Items("union", parts))

    def parse_expr(self):
        self.enter()
        if self.at_op("-"):
            self.pos += 1
            left = self.node(Unary("neg", self.parse_term()))
        elif self.at_op("\\pm", "\\mp"):  # ±3: the two values 3 and -3
            self.pos += 1
            left = self.node(Binary("pm", self.node(Num("num", Fraction(0), False)), self.parse_term()))
        else:
            if self.at_op("+"):
                self.pos += 1
            left = self.parse_term()
        while self.at_op("+", "-", "\\pm", "\\mp"):
            op = self.next()[1]
            right = self.parse_term()
            left = self.node(Binary(_ADDITIVE[op], left, right))
        self.leave()
        return left

    def starts_atom(self) -> bool:
        kind, value, _ = self.peek()
        if kind in ("num", "sym"):
            return True
        if kind == "op":
            return value == "("
        if kind == "cmd":
            return value in ("frac", "sqrt", "pi", "infty", "binom") or value in _FUNCS or value in _GREEK \
                or value in _SKIP_CMDS
        return False

    def parse_term(self):
        left = self.parse_power()
        while True:
            if self.at_op("*", "\\times", "\\cdot", "\\ast"):
                self.pos += 1
                left = self.node(Binary("mul", left, self.parse_power()))
            elif self.at_op("/", "\\div"):
                self.pos += 1
                left = self.node(Binary("div", left, self.parse_power()))
            elif self.at("word"):
                self.pos += 1  # a unit or a word around the number: drop it (and a power on it: cm^2)
                if self.at_op("^"):
                    self.pos += 1
                    self.parse_postfix()
            elif self.at_op("%"):
                self.pos += 1
                left = self.node(Unary("percent", left))
            elif self.starts_atom():
                right = self.parse_power()
                left = self.node(Binary("mul", left, right))
            else:
                return left

    def parse_power(self):
        self.enter()
        base = self.parse_postfix()
        if self.at_op("^"):
            self.pos += 1
            if self.at_op("-"):  # x^-1
                self.pos += 1
                base = self.node(Binary("pow", base, self.node(Unary("neg", self.parse_power()))))
            else:
                base = self.node(Binary("pow", base, self.parse_power()))
        self.leave()
        return base

    def parse_postfix(self):
        atom = self.parse_atom()
        while True:
            if self.at_op("!"):
                self.pos += 1
                atom = self.node(Unary("fact", atom))
            elif self.at_op("_") and atom.tag == "sym":
                self.pos += 1
                if self.at_op("{"):
                    label = "".join(str(value) for _, value, _ in self.braced_tokens("unclosed subscript"))
                else:
                    kind, value, _ = self.next()
                    if kind not in ("num", "sym"):
                        raise ParseError("bad subscript")
                    label = str(value)
                atom = self.node(Name("sym", f"{atom.name}_{label}"))
            elif self.at_op("'"):
                self.pos += 1
                atom = self.node(Name("sym", atom.name + "'")) if atom.tag == "sym" else atom
            else:
                return atom

    def parse_group(self):
        """A LaTeX argument: {…} or a single token."""
        if self.at_op("{"):
            self.pos += 1
            return self.braced_list()
        return self.parse_postfix()

    def parse_bracketed(self, open_value):
        close = _OPENERS[open_value]
        self.enter()
        if self.at_op(")", "]", "\\}", "\\" + close):  # empty set / tuple
            items = []
        else:
            inner = self.parse_list(stop=(")", "]", "\\}"))
            items = inner.items if inner.tag == "list" else [inner]
        self.leave()
        kind, value, _ = self.next()
        closer = value if kind == "op" else ("\\" + value if kind == "cmd" else None)
        closer = {"\\rbrack": "]", "\\rangle": ")", "\\rbrace": "}", "\\}": "}"}.get(closer, closer)
        if closer not in (")", "]", "}"):
            raise ParseError("unclosed bracket")
        opener = {"lbrack": "[", "langle": "(", "lbrace": "{", "\\{": "{"}.get(open_value, open_value)
        if opener == "{":
            if closer != "}":
                raise ParseError("unclosed set")
            return self.node(Items("set", items))
        if opener == "(" and closer == ")" and len(items) == 1:
            return items[0]
        if closer == "}":
            raise ParseError("mismatched bracket")
        return self.node(Seq("seq", opener, closer, items))

    def parse_number(self, value: str):
        # Fraction(int) skips the string parser Fraction(str) runs; integers are most literals.
        node = self.node(Num("num", Fraction(int(value)) if value.isdigit() else Fraction(value), "." in value))
        # mixed number: 2\frac{1}{2} means 2 + 1/2
        if "." not in value and "e" not in value.lower() and self.at("cmd", "frac") and self.peek()[2]:
            save = self.pos
            self.pos += 1
            num, den = self.parse_group(), self.parse_group()
            if num.tag == "num" and den.tag == "num" and not num.is_decimal and not den.is_decimal \
                    and num.value < den.value:
                return self.node(Binary("add", node, self.node(Binary("div", num, den))))
            self.pos = save
        return node

    def parse_atom(self):
        kind, value, _ = self.next()
        if kind is None:
            raise ParseError("unexpected end of answer")
        if kind == "num":
            return self.parse_number(value)
        if kind == "sym":
            if value in ("e", "i"):
                return self.node(Name("const", value))
            return self.node(Name("sym", value))
        if kind == "word":
            raise ParseError("word")
        if kind == "op":
            if value in ("(", "["):
                return self.parse_bracketed(value)
            if value == "{":
                return self.braced_list()
            if value == "|":
                self.enter()
                inner = self.parse_expr()
                self.leave()
                self.expect_op("|")
                return self.node(Unary("abs", inner))
            if value == "-":
                return self.node(Unary("neg", self.parse_power()))
            raise ParseError(f"unexpected {value!r}")
        return self.parse_command(value)

    def parse_command(self, name):
        if name in ("{", "lbrack", "langle", "lbrace"):
            return self.parse_bracketed("\\{" if name == "{" else name)
        if name in ("frac", "over"):
            return self.node(Binary("div", self.parse_group(), self.parse_group()))
        if name == "sqrt":
            index = None
            if self.at_op("["):
                self.pos += 1
                index = self.parse_expr()
                self.expect_op("]")
            arg = self.parse_group()
            if index is None:
                index = self.node(Num("num", Fraction(2), False))
            return self.node(Root("root", arg, index))
        if name == "binom":
            return self.node(Binary("binom", self.parse_group(), self.parse_group()))
        if name == "pi":
            return self.node(Name("const", "pi"))
        if name == "infty":
            return self.node(Name("const", "inf"))
        if name in ("vert", "lvert", "rvert", "|"):
            inner = self.parse_expr()
            if not (self.at("cmd") and self.peek()[1] in ("vert", "rvert", "|")):
                raise ParseError("unclosed absolute value")
            self.pos += 1
            return self.node(Unary("abs", inner))
        if name in _GREEK:
            return self.node(Name("sym", name))
        if name in _SKIP_CMDS:
            return self.parse_group()
        if name == "begin":
            return self.parse_matrix()
        if name in _FUNCS:
            return self.parse_function(name)
        raise ParseError(f"unsupported command \\{name}")

    def parse_function(self, name):
        base = None
        power = None
        if name == "log" and self.at_op("_"):
            self.pos += 1
            base = self.parse_group()
        if self.at_op("^"):  # \sin^2 x
            self.pos += 1
            power = self.parse_group()
        if self.at_op("("):
            self.pos += 1
            self.enter()
            arg = self.parse_expr()
            self.leave()
            self.expect_op(")")
        elif self.at_op("{"):
            arg = self.parse_group()
        else:
            arg = self.parse_power()
            while self.starts_atom() and not (self.at("cmd") and self.peek()[1] in _FUNCS):
                arg = self.node(Binary("mul", arg, self.parse_power()))
        if name == "log" and base is not None:
            out = self.node(Log("log", base, arg))
        else:
            out = self.node(Func("func", _FUNCS[name], arg))
        return self.node(Binary("pow", out, power)) if power is not None else out

    def parse_matrix(self):
        env_name = self.next()[1] if self.at("env") else None
        if env_name not in ("pmatrix", "bmatrix", "matrix", "array", "smallmatrix", "Bmatrix"):
            raise ParseError("unsupported environment")
        if env_name == "array" and self.at_op("{"):
            self.braced_tokens("unclosed group")  # the column spec {cc|c}
        rows, row = [], []
        while True:
            if self.at("cmd", "end"):
                self.pos += 1
                if self.at("env"):
                    self.pos += 1
                break
            if self.at_end():
                raise ParseError("unclosed matrix")
            self.enter()
            row.append(self.parse_expr())
            self.leave()
            if self.at_op("&"):
                self.pos += 1
            elif self.at("cmd", "\\"):
                self.pos += 1
                rows.append(row)
                row = []
            elif not self.at("cmd", "end"):
                raise ParseError("bad matrix cell")
        if row:
            rows.append(row)
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise ParseError("ragged matrix")
        return self.node(Matrix("matrix", rows))


def parse(text: str):
    """Parse a cleaned-up answer into a tree. Raises ParseError / TooLarge."""
    tokens = tokenize(text)
    if not tokens:
        raise ParseError("empty answer")
    words = [value for kind, value, _ in tokens if kind == "word"]
    if len(words) == len(tokens):
        return Name("text", " ".join(map(str, words)))
    tokens = _drop_leading_words(tokens)
    return _Parser(tokens).parse_answer()


def _drop_leading_words(tokens):
    # "The answer is 5" / "x = 5 apples": words before the math are commentary.
    i = 0
    while i < len(tokens) and tokens[i][0] == "word":
        i += 1
    if i < len(tokens) and tokens[i][:2] == ("op", ":"):
        i += 1
    return tokens[i:]


# --- evaluation -----------------------------------------------------------------------------------------------------

class EvalError(AnswerError):
    """The tree has no value here (division by zero, domain error, not an expression)."""


def _check(value):
    if isinstance(value, Fraction) and value.numerator.bit_length() + value.denominator.bit_length() > MAX_BITS:
        raise TooLarge("intermediate value too large")
    return value


def _complex(value) -> complex:
    try:
        return complex(value)
    except OverflowError as err:
        raise EvalError("value out of float range") from err


def _int_root(n: int, k: int) -> int | None:
    if n < 0:
        return None
    r = round(n ** (1.0 / k)) if n.bit_length() < 1000 else None
    if r is None:
        return None
    for cand in (r - 1, r, r + 1):
        if cand >= 0 and cand ** k == n:
            return cand
    return None


def _exact_root(value: Fraction, k: int):
    """k-th root of a rational if it is rational (real odd roots of negatives too), else None."""
    sign = 1
    if value < 0:
        if k % 2 == 0:
            return None
        sign, value = -1, -value
    p, q = _int_root(value.numerator, k), _int_root(value.denominator, k)
    if p is None or q is None:
        return None
    return sign * Fraction(p, q)


def _power(base, exp):
    if isinstance(exp, Fraction):
        if abs(exp) > MAX_EXPONENT:
            raise TooLarge("exponent too large")
        if isinstance(base, Fraction):
            if exp.denominator == 1:
                e = int(exp)
                bits = base.numerator.bit_length() + base.denominator.bit_length()
                if bits * abs(e) > MAX_BITS:
                    raise TooLarge("power too large")
                if base == 0 and e < 0:
                    raise EvalError("division by zero")
                return base ** e
            if exp.denominator <= 12 and base >= 0:
                root = _exact_root(base, exp.denominator)
                if root is not None:
                    return _power(root, Fraction(exp.numerator))
        b = _complex(base)
        if b == 0 and exp < 0:
            raise EvalError("division by zero")
        try:
            return b ** float(exp) if b.imag == 0 and b.real > 0 else b ** complex(float(exp))
        except (OverflowError, ZeroDivisionError) as err:
            raise EvalError(str(err)) from err
    b, e = _complex(base), _complex(exp)
    if abs(e) > MAX_EXPONENT * 10:
        raise TooLarge("exponent too large")
    try:
        return b ** e
    except (OverflowError, ZeroDivisionError) as err:
        raise EvalError(str(err)) from err


_CFUNCS = {
    "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "cot": lambda z: 1 / cmath.tan(z),
    "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z), "arcsin": cmath.asin,
    "arccos": cmath.acos, "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh,
    "exp": cmath.exp, "log": cmath.log, "log10": cmath.log10,
}
_CONSTS = {"pi": complex(math.pi), "e": complex(math.e), "i": 1j, "inf": complex(math.inf)}


def _root(a, k):
    """The k-th root of a: exact when it is rational, the real root for odd k of a negative rational."""
    if isinstance(k, Fraction) and k.denominator == 1 and 1 < k <= MAX_EXPONENT:
        if isinstance(a, Fraction):
            exact = _exact_root(a, int(k))
            if exact is not None:
                return exact
            if a < 0 and k % 2 == 1:  # real odd root
                return -(complex(-a) ** (1.0 / int(k)))
        return _power(a, 1 / k)
    if k == 0:
        raise EvalError("zeroth root")
    return _power(a, 1 / _complex(k))


def _function(name: str, a):
    """A function of _CFUNCS at a; exact at the rational points where the value is rational (sin 0, exp 0, log 1)."""
    if name == "exp" and isinstance(a, Fraction) and a == 0:
        return Fraction(1)
    if name in ("sin", "tan", "arcsin", "arctan", "sinh", "tanh") and isinstance(a, Fraction) and a == 0:
        return Fraction(0)
    if name in ("log", "log10") and isinstance(a, Fraction) and a == 1:
        return Fraction(0)
    return _CFUNCS[name](_complex(a))


def evaluate(node, env: dict):
    """Value of an expression tree: a Fraction when exact, else a complex. env maps symbol names to values."""
    tag = node.tag
    try:
        if tag == "num":
            return node.value
        if tag == "sym":
            if node.name not in env:
                raise EvalError(f"unbound symbol {node.name}")
            return env[node.name]
        if tag == "const":
            return _CONSTS[node.name]
        if tag == "neg":
            return -evaluate(node.arg, env)
        if tag == "percent":
            return evaluate(node.arg, env)
        if tag in ("add", "sub", "mul", "div"):
            a, b = evaluate(node.left, env), evaluate(node.right, env)
            if tag == "add":
                return _check(a + b)
            if tag == "sub":
                return _check(a - b)
            if tag == "mul":
                return _check(a * b)
            if b == 0:
                raise EvalError("division by zero")
            return _check(a / b)
        if tag == "pow":
            return _check(_power(evaluate(node.left, env), evaluate(node.right, env)))
        if tag == "root":
            return _root(evaluate(node.arg, env), evaluate(node.index, env))
        if tag == "fact":
            a = evaluate(node.arg, env)
            if not (isinstance(a, Fraction) and a.denominator == 1 and 0 <= a <= MAX_FACTORIAL):
                raise TooLarge("factorial argument not a small natural number")
            return Fraction(math.factorial(int(a)))
        if tag == "binom":
            n, k = evaluate(node.left, env), evaluate(node.right, env)
            if not all(isinstance(v, Fraction) and v.denominator == 1 and 0 <= v <= 10_000 for v in (n, k)):
                raise TooLarge("binomial arguments not small natural numbers")
            return _check(Fraction(math.comb(int(n), int(k))))
        if tag == "abs":
            a = evaluate(node.arg, env)
            return abs(a) if isinstance(a, Fraction) else complex(abs(a))
        if tag == "func":
            return _function(node.name, evaluate(node.arg, env))
        if tag == "log":
            base, a = _complex(evaluate(node.base, env)), _complex(evaluate(node.arg, env))
            return cmath.log(a) / cmath.log(base)
    except (ZeroDivisionError, OverflowError, ValueError) as err:
        if isinstance(err, AnswerError):
            raise
        raise EvalError(str(err)) from err
    raise EvalError(f"{tag} is not an expression")


# Generic walks over a tree: a node's parts are nodes, lists of nodes (items, sides) or, in a matrix, lists of rows.

def symbols_of(node, out: set | None = None) -> set:
    out = set() if out is None else out
    if node.tag == "sym":
        out.add(node.name)
    else:
        for part in node[1:]:
            if type(part) in NODE_TYPES:
                symbols_of(part, out)
            elif isinstance(part, list):
                for item in part:
                    if type(item) in NODE_TYPES:
                        symbols_of(item, out)
                    elif isinstance(item, list):  # matrix rows
                        for cell in item:
                            symbols_of(cell, out)
    return out


def has_tag(node, tags) -> bool:
    """Whether a node of one of `tags` is in the tree (not looking inside matrix rows)."""
    if node.tag in tags:
        return True
    if node.tag == "num":
        return False
    for part in node[1:]:
        if type(part) in NODE_TYPES and has_tag(part, tags):
            return True
        if isinstance(part, list) and any(type(x) in NODE_TYPES and has_tag(x, tags) for x in part):
            return True
    return False


def has_decimal(node) -> bool:
    """Whether an expression holds a number written with a decimal point."""
    if node.tag == "num":
        return node.is_decimal
    return any(type(part) in NODE_TYPES and has_decimal(part) for part in node[1:])


def size(node) -> int:
    """Nodes in an expression."""
    return 1 + sum(size(p) for p in node[1:] if type(p) in NODE_TYPES)


# --- sympy (only from trees, only through constructors) -------------------------------------------------------------

def to_sympy(node):
    """Build a sympy expression from a tree. Call only on trees that passed `evaluate`'s bounds."""
    import sympy

    tag = node.tag
    if tag == "num":
        return sympy.Rational(node.value.numerator, node.value.denominator)
    if tag == "sym":
        return sympy.Symbol(node.name)
    if tag == "const":
        return {"pi": sympy.pi, "e": sympy.E, "i": sympy.I, "inf": sympy.oo}[node.name]
    if tag in ("neg", "percent"):
        inner = to_sympy(node.arg)
        return -inner if tag == "neg" else inner
    if tag in ("add", "sub", "mul", "div", "pow"):
        a, b = to_sympy(node.left), to_sympy(node.right)
        if tag == "pow":
            if b.is_Number and abs(b) > MAX_EXPONENT:
                raise TooLarge("exponent too large")
            if not b.is_Number and not b.free_symbols:
                raise TooLarge("irrational exponent left to numeric comparison")
            return sympy.Pow(a, b)
        return {"add": lambda: sympy.Add(a, b), "sub": lambda: sympy.Add(a, -b), "mul": lambda: sympy.Mul(a, b),
                "div": lambda: sympy.Mul(a, sympy.Pow(b, -1))}[tag]()
    if tag == "root":
        return sympy.root(to_sympy(node.arg), to_sympy(node.index))
    if tag == "abs":
        return sympy.Abs(to_sympy(node.arg))
    if tag == "func":
        fn = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
              "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh,
              "cosh": sympy.cosh, "tanh": sympy.tanh, "exp": sympy.exp, "log": sympy.log,
              "log10": lambda z: sympy.log(z, 10)}[node.name]
        return fn(to_sympy(node.arg))
    if tag == "log":
        return sympy.log(to_sympy(node.arg), to_sympy(node.base))
    raise TooLarge(f"{tag} not converted to sympy")
