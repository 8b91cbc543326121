"""The math grader: a table of gold/prediction pairs with the verdict we expect, plus extraction and GSM8K gold."""

import pytest

from thinkzero.rewards.math import (
    answers_equal,
    extract_answer,
    extract_gsm8k_gold,
    last_boxed,
    math_accuracy,
    verify,
)

# (gold, prediction, expected). Predictions are bare answers or whole completions; `verify` extracts either way.
TABLE = [
    # integers, signs, whitespace
    ("5", "5", True),
    ("5", "6", False),
    ("-5", "-5", True),
    ("-5", "5", False),
    ("-5", "- 5", True),
    ("-5", "\u22125", True),  # unicode minus
    ("0", "-0", True),
    ("12", "012", True),
    ("7", "7.", True),
    ("7", "7.0", True),
    ("7", "7.01", False),
    ("100", "10", False),
    # thousands separators
    ("1234", "1,234", True),
    ("1,234", "1234", True),
    ("1234567", "1,234,567", True),
    ("1234", "1{,}234", True),
    ("1234", "1\\,234", True),
    ("1234", "1,243", False),
    ("1234.5", "1,234.5", True),
    ("1000", "1,000,000", False),
    # decimals vs fractions (tolerance: 1e-6 relative when a decimal is involved)
    ("1/2", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", ".5", True),
    ("1/2", "2", False),
    ("1/2", "0.05", False),
    ("1/3", "0.33", False),
    ("1/3", "0.333", False),
    ("1/3", "0.3333333", True),
    ("1/3", "0.3333", False),
    ("2/3", "0.6666667", True),
    ("2/3", "0.67", False),
    ("3/4", "0.75", True),
    ("3/4", "0.57", False),
    ("1.25", "5/4", True),
    ("1.25", "\\frac{5}{4}", True),
    ("1.25", "1.250", True),
    ("0.1", "1/10", True),
    ("0.1", "1/100", False),
    ("1000000", "1000000.5", False),  # a decimal only gets a tolerance against values it cannot write exactly
    ("3/4", "0.7500001", False),
    ("2/7", "0.2857143", True),
    ("\\frac{1}{23}", "\\frac{12}{3}", False),
    ("x^{2}", "x^2", True),
    # \frac, \dfrac, \tfrac, mixed numbers
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\frac{1}{2}", "\\tfrac{1}{2}", True),
    ("\\frac{1}{2}", "\\frac12", True),
    ("\\frac{1}{2}", "\\frac 12", True),
    ("\\frac{3}{4}", "\\frac34", True),
    ("\\frac{3}{4}", "\\frac43", False),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("-\\frac{1}{2}", "\\frac{1}{2}", False),
    ("\\frac{10}{3}", "3\\frac{1}{3}", True),
    ("\\frac{7}{2}", "3\\frac{1}{2}", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\frac{a}{b}", "a/b", True),
    ("\\frac{a}{b}", "b/a", False),
    ("\\frac{\\frac{1}{2}}{3}", "\\frac{1}{6}", True),
    # roots
    ("\\sqrt{2}", "\\sqrt2", True),
    ("\\sqrt{2}", "2^{1/2}", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("2\\sqrt{2}", "\\sqrt{6}", False),
    ("\\sqrt{2}", "1.41421356", True),
    ("\\sqrt{2}", "1.414", False),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("\\sqrt[3]{8}", "2", True),
    ("\\sqrt[3]{-8}", "-2", True),
    ("\\sqrt{16}", "4", True),
    ("\\sqrt{16}", "-4", False),
    ("3\\sqrt{5}", "\\sqrt{45}", True),
    ("\\sqrt{5}", "5", False),
    # pi
    ("2\\pi", "2\\pi", True),
    ("2\\pi", "\\pi \\cdot 2", True),
    ("2\\pi", "6.283185307", True),
    ("2\\pi", "6.28", False),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("\\frac{\\pi}{2}", "0.5\\pi", True),
    ("\\frac{\\pi}{2}", "\\frac{\\pi}{3}", False),
    ("\\pi", "3.14", False),
    ("4\\pi", "4 \\pi", True),
    ("\\pi r^2", "r^2\\pi", True),
    # percentages
    ("50\\%", "50", True),
    ("50\\%", "50%", True),
    ("50\\%", "0.5", True),
    ("50", "50\\%", True),
    ("50", "0.5", False),
    ("25\\%", "0.52", False),
    ("12.5\\%", "12.5", True),
    ("12.5\\%", "\\frac{1}{8}", True),
    # scientific notation
    ("1500", "1.5e3", True),
    ("1500", "1.5 \\times 10^{3}", True),
    ("1500", "1.5 \\times 10^3", True),
    ("1500", "1.5E+3", True),
    ("0.0025", "2.5 \\times 10^{-3}", True),
    ("0.0025", "2.5e-3", True),
    ("1500", "1.5e4", False),
    ("3 \\times 10^{8}", "300000000", True),
    # units and words around numbers
    ("5", "5 apples", True),
    ("5", "5 \\text{ cm}", True),
    ("5", "5\\text{cm}", True),
    ("5", "5 cm", True),
    ("12", "12 \\text{ cm}^2", True),
    ("12", "12 \\mbox{ square units}", True),
    ("18", "\\$18", True),
    ("18", "18 dollars", True),
    ("18.50", "\\$18.50", True),
    ("30", "30^\\circ", True),
    ("30", "30^{\\circ}", True),
    ("30", "30\u00b0", True),
    ("5", "6 apples", False),
    ("5", "5 \\text{ and } 6", False),
    # \text{} answers
    ("\\text{Monday}", "Monday", True),
    ("\\text{Monday}", "\\text{monday}", True),
    ("\\text{Monday}", "Tuesday", False),
    ("\\text{(B)}", "B", True),
    ("\\text{(B)}", "(B)", True),
    ("\\text{(B)}", "C", False),
    ("\\text{even}", "\\textbf{even}", True),
    ("\\text{even}", "\\text{odd}", False),
    # x = 3 vs 3
    ("3", "x = 3", True),
    ("x = 3", "3", True),
    ("x=3", "x = 3", True),
    ("3", "x = 4", False),
    ("3", "k=3", True),
    ("y = 2x + 3", "y = 3 + 2x", True),
    ("y = 2x + 3", "2x+3", True),
    ("y = 2x + 3", "y = 2x - 3", False),
    ("2x + 3y = 6", "3y + 2x = 6", True),
    ("2x + 3y = 6", "6 = 2x + 3y", True),
    ("2x + 3y = 6", "2x + 3y = 7", False),
    # negatives
    ("-3", "x = -3", True),
    ("-2.5", "-\\frac{5}{2}", True),
    ("-2.5", "2.5", False),
    ("-(x+1)", "-x-1", True),
    # intervals
    ("[1, 5)", "[1,5)", True),
    ("[1, 5)", "(1, 5]", False),
    ("[1, 5)", "[1, 5]", False),
    ("(-\\infty, 3)", "(-\\infty,3)", True),
    ("(-\\infty, 3)", "x < 3", True),
    ("(-\\infty, 3]", "x \\le 3", True),
    ("(-\\infty, 3]", "x < 3", False),
    ("[2, \\infty)", "x \\geq 2", True),
    ("(3, \\infty)", "x > 3", True),
    ("(3, \\infty)", "\\left(3, \\infty\\right)", True),
    ("[1, 5)", "1 \\le x < 5", True),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(2,\\infty) \\cup (-\\infty, 1)", True),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(-\\infty, 1] \\cup (2, \\infty)", False),
    ("[\\frac{1}{2}, 3]", "[0.5, 3]", True),
    # tuples (ordered)
    ("(1, 2)", "(1,2)", True),
    ("(1, 2)", "(2, 1)", False),
    ("(1, 2)", "\\left( 1, 2 \\right)", True),
    ("(1, 2, 3)", "(1, 2)", False),
    ("(\\frac{1}{2}, -3)", "(0.5, -3)", True),
    ("(1, 2)", "1, 2", True),
    ("(3, -1)", "(3, 1)", False),
    ("(2, \\sqrt{2})", "(2, 2^{1/2})", True),
    # sets and lists (unordered)
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    ("\\{1, 2, 3\\}", "\\{3, 1, 2\\}", True),
    ("1, 2", "2, 1", True),
    ("1, 2", "1", False),
    ("1, -2", "-2, 1", True),
    ("1, 2", "x = 1 \\text{ or } x = 2", True),
    ("1, 2", "x=2, x=1", True),
    ("-1, 3", "3 and -1", True),
    ("\\{1, 2\\}", "(1, 2)", False),
    ("1, 2, 3", "1, 2, 2", False),
    ("1 \\pm \\sqrt{2}", "1 + \\sqrt{2}, 1 - \\sqrt{2}", True),
    ("1 \\pm \\sqrt{2}", "x = 1 \\pm \\sqrt{2}", True),
    ("1 \\pm \\sqrt{2}", "1 + \\sqrt{2}", False),
    ("\\pm 3", "3, -3", True),
    ("[2, 5]", "x \\in [2, 5]", True),
    # matrices
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}", False),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "(1, 2)", True),
    ("\\begin{pmatrix} \\frac{1}{2} & 0 \\\\ 0 & 1 \\end{pmatrix}",
     "\\begin{pmatrix} 0.5 & 0 \\\\ 0 & 1 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2&3&4\\end{pmatrix}", False),
    # symbolic equivalence
    ("(x+1)^2", "x^2 + 2x + 1", True),
    ("(x+1)^2", "x^2 + 1", False),
    ("x^2 - 1", "(x-1)(x+1)", True),
    ("x^2 - 1", "(x-1)(x-1)", False),
    ("2x", "x + x", True),
    ("2x", "x2", True),
    ("2x", "2y", False),
    ("\\frac{x^2-1}{x-1}", "x+1", True),
    ("a^2 b", "b a^2", True),
    ("3xy", "3yx", True),
    ("\\frac{1}{x} + \\frac{1}{y}", "\\frac{x+y}{xy}", True),
    ("\\frac{1}{x} + \\frac{1}{y}", "\\frac{1}{x+y}", False),
    ("\\sin^2 x + \\cos^2 x", "1", True),
    ("\\sin(2x)", "2\\sin x \\cos x", True),
    ("\\sin(2x)", "2\\sin x", False),
    ("e^{2x}", "(e^x)^2", True),
    ("\\ln(xy)", "\\ln x + \\ln y", True),
    ("\\log_2 8", "3", True),
    ("x^{-1}", "\\frac{1}{x}", True),
    ("\\frac{n(n+1)}{2}", "\\frac{n^2+n}{2}", True),
    ("\\frac{n(n+1)}{2}", "\\frac{n^2+1}{2}", False),
    ("2^{10}", "1024", True),
    ("2^{10}", "1000", False),
    ("5!", "120", True),
    ("\\binom{5}{2}", "10", True),
    ("|{-3}|", "3", True),
    ("3 + 4i", "4i + 3", True),
    ("3 + 4i", "3 - 4i", False),
    ("\\infty", "\\infty", True),
    ("\\infty", "-\\infty", False),
    # whole completions: extraction from <answer> and \boxed (nested braces)
    ("\\frac{1}{2}", "<think>\nhalf of it\n</think>\n<answer>\n\\frac{1}{2}\n</answer>", True),
    ("\\frac{1}{2}", "so \\boxed{\\frac{1}{2}}", True),
    ("\\frac{1}{2}", "first \\boxed{3} then, correcting myself, \\boxed{\\frac{1}{2}}", True),
    ("3", "first \\boxed{3} then, correcting myself, \\boxed{\\frac{1}{2}}", False),
    ("\\{1, 2\\}", "The roots form \\boxed{\\{1, 2\\}}.", True),
    ("\\frac{\\sqrt{3}}{2}", "thus $\\boxed{\\frac{\\sqrt{3}}{2}}$", True),
    ("42", "<answer>The answer is 42.</answer>", True),
    ("42", "<answer>\nx = \\boxed{42}\n</answer>", True),
    ("42", "I think the final answer is 42.", True),
    ("42", "We compute 6*7 = 42. Then subtract 2 to get 40.", False),
    ("40", "We compute 6*7 = 42. Then subtract 2 to get 40.", True),
    ("72", "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.", True),
    ("5", "\\boxed 5", True),
    # GSM8K-style gold
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\n#### 18", "\\boxed{18}", True),
    ("... so the total is 1,234 dollars.\n#### 1,234", "The answer is \\boxed{1234}", True),
    ("#### 1,234", "\\boxed{1,234}", True),
    ("#### 1,234", "\\boxed{1,243}", False),
    ("#### -7", "<answer>-7</answer>", True),
]


@pytest.mark.parametrize("gold,prediction,expected", TABLE, ids=[f"{i}" for i in range(len(TABLE))])
def test_verify_table(gold, prediction, expected):
    assert verify(gold, prediction) is expected, (gold, prediction)


def test_table_is_big_enough_and_has_negatives():
    assert len(TABLE) >= 150
    assert sum(1 for _, _, e in TABLE if not e) >= 50


def test_verify_is_symmetric_on_bare_answers():
    # Swapping gold and prediction changes nothing for bare answers without percent signs or equations.
    for gold, pred, expected in TABLE:
        if any(s in gold + pred for s in ("%", "=", "<", ">", "\\le", "\\ge", "####", "answer", "boxed", "or", "and")):
            continue
        if "\n" in pred or len(pred) > 60:
            continue
        assert answers_equal(pred, gold) is expected, (pred, gold)


def test_extract_gsm8k_gold():
    assert extract_gsm8k_gold("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert extract_gsm8k_gold("Total: 1,234 dollars\n#### 1,234") == "1234"
    assert extract_gsm8k_gold("#### -12.5") == "-12.5"
    assert extract_gsm8k_gold("#### $1,000,000.") == "1000000"
    assert extract_gsm8k_gold("first #### 3\nsecond #### 4") == "4"
    with pytest.raises(ValueError, match="no '####'"):
        extract_gsm8k_gold("The answer is 7")
    with pytest.raises(ValueError, match="nothing after"):
        extract_gsm8k_gold("The answer is #### ")


def test_extract_answer_and_boxed():
    assert last_boxed(r"\boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{1} and \boxed{\{2, 3\}}") == r"\{2, 3\}"
    assert last_boxed(r"\boxed{\boxed{7}}") == r"\boxed{7}"
    assert last_boxed(r"\boxed{2} then \boxed{3") == "2"  # the unclosed one does not count
    assert last_boxed("no box") is None
    assert extract_answer("<answer> 12 </answer>") == "12"
    assert extract_answer(r"<answer>so \boxed{12}</answer>") == "12"
    assert extract_answer("<answer> 12") is None  # unclosed tag, no box, no phrase
    assert extract_answer("The final answer is: 12.") == "12"
    assert extract_answer("just text 12") is None


def test_math_accuracy_reward():
    assert math_accuracy("<answer>7</answer>", "#### 7") == 1.0
    assert math_accuracy("<answer>8</answer>", "#### 7") == 0.0
    assert math_accuracy("<answer>8</answer>", "no marker here") == 0.0  # gold parsed as text
    assert math_accuracy("<answer>8</answer>", "") is None
    assert math_accuracy("<answer>8</answer>", "solution without a final line ####") is None


# Issue #17: one verdict table per category, both polarities; "false_positive_guards" must stay False.
CATEGORIES = {
    "several_answers": [
        ("2, 5", "\\boxed{2}, \\boxed{5}", True),
        ("2, 5", "\\boxed{5} and \\boxed{2}", True),
        ("(1,4),(4,1)", "\\boxed{(1, 4)} \\text{ and } \\boxed{(4, 1)}", True),
        ("(1,4),(4,1)", "\\boxed{(4, 1)}, \\boxed{(1, 4)}", True),
        ("2, 5", "x = 2 \\text{ or } x = 5", True),
        ("\\{-1, 3\\}", "$x=3$ or $x=-1$, so \\boxed{3}, \\boxed{-1}", True),
        ("2, 5", "\\boxed{2}, \\boxed{6}", False),
        ("2, 5", "\\boxed{2}", False),
        ("(1,4),(4,1)", "\\boxed{(1, 4)}", False),
        ("2, 5", "x = 2 \\text{ or } x = 6", False),
    ],
    "labelled": [
        ("x = 7", "7", True),
        ("7", "x = 7", True),
        ("a=3,b=1;a=5,b=1", "(3,1),(5,1)", True),
        ("a=3,b=1;a=5,b=1", "(5,1),(3,1)", True),
        ("S_1:S_2=5:9", "5:9", True),
        ("5:9", "\\frac{5}{9}", True),
        ("\\frac{AB}{BC}=\\frac{1}{\\sqrt 3}", "\\frac{1}{\\sqrt3}", True),
        ("7", "x = 3+4 = 7", True),
        ("x = 7", "x = 3 + 4 = 7", True),
        ("7", "x = 7 \\approx 6.9", True),
        ("x=1, y=2", "(1, 2)", True),
        ("x=1, y=2", "y=2, x=1", True),
        ("6.9", "x = 7 \\approx 6.9", False),
        ("a=3,b=1;a=5,b=1", "(1,3),(1,5)", False),
        ("S_1:S_2=5:9", "9:5", False),
        ("x=1, y=2", "(2, 1)", False),
        ("x=1, y=2", "x=2, y=1", False),
        ("8", "x = 3+4 = 7", False),
    ],
    "inequalities_intervals": [
        ("(0,2)", "0<y<2", True),
        ("0<y<2", "(0, 2)", True),
        ("[-3,-2]\\cup[2,3]", "2\\le|t|\\le 3", True),
        ("x<4", "-x>-4", True),
        ("(-2, 2)", "|x| < 2", True),
        ("(-\\infty, 1) \\cup (2, \\infty)", "x < 1 \\text{ or } x > 2", True),
        ("[1, 5)", "5 > x \\ge 1", True),
        ("(0,2)", "0 \\le y < 2", False),
        ("[-3,-2]\\cup[2,3]", "2<|t|\\le 3", False),
        ("x<4", "-x<-4", False),
        ("(-2, 2)", "|x| \\le 2", False),
        ("(-\\infty, 1) \\cup (2, \\infty)", "x < 1 \\text{ or } x > 3", False),
    ],
    "matrices": [
        ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\left(\\begin{array}{c}1\\\\2\\end{array}\\right)", True),
        ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1 & 2\\\\ 3 & 4\\end{bmatrix}", True),
        ("\\begin{pmatrix}1\\\\-2\\end{pmatrix}", "\\begin{pmatrix}1\\\\ -2\\end{pmatrix}", True),
        ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\left(\\begin{array}{c}2\\\\1\\end{array}\\right)", False),
        ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1 & 2\\\\ 4 & 3\\end{bmatrix}", False),
    ],
    "number_notation": [
        ("3.75", "3,75", True),
        ("3.75", "3{,}75", True),
        ("12000", "12,000", True),
        ("12000", "12{,}000", True),
        ("1500", "1.5e3", True),
        ("50\\%", "50", True),
        ("30", "30^\\circ", True),
        ("10", "10\\text{ m}", True),
        ("10\\text{ m}", "10", True),
        ("10\\text{ cm}", "10 \\text{cm}", True),
        ("3.75", "3,76", False),
        ("3, 75", "3,75", True),  # against a list, the comma separates
        ("3.75", "3, 75", False),
        ("2,5", "2.5", False),  # a gold `2,5` is two answers
        ("2,5", "\\boxed{5}, \\boxed{2}", True),
        ("12000", "12,001", False),
        ("1500", "1.5e4", False),
        ("30", "31^\\circ", False),
    ],
    "text_answers": [
        ("\\text{Monday}", "\\text{ monday }", True),
        ("\\text{yes}", "\\text{Yes}", True),
        ("1, 2", "1 \\text{ and } 2", True),
        ("\\text{Monday}", "\\text{Tuesday}", False),
        ("1, 2", "1 \\text{ and } 3", False),
    ],
    "latex_noise": [
        ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
        ("\\frac{1}{2}", "\\tfrac12", True),
        ("12345", "12\\!345", True),
        ("(1, 2)", "\\left(1,\\,2\\right)", True),
        ("\\frac{1}{2}", "\\left.\\frac{1}{2}\\right.", True),
        ("\\frac{1}{2}", "\\\\frac{1}{2}", True),
        ("\\sqrt{2}", "so $$\\\\boxed{\\\\sqrt{2}}$$", True),
        ("\\frac{1}{2}", "so $$\\boxed{\\frac{1}{2}}$$", True),
        ("7", "The answer is: **7**.", True),
        ("7", "so the answer is $7$.", True),
        ("7", "6 + 1 = 7\n#### 7", True),
        ("\\frac{1}{2}", "\\\\frac{1}{3}", False),
        ("7", "The answer is: **8**.", False),
        ("7", "6 + 2 = 8\n#### 8", False),
    ],
    "false_positive_guards": [
        ("(1, 2)", "(2, 1)", False),
        ("(1, 2, 3)", "(3, 2, 1)", False),
        ("\\sin x", "\\cos x", False),
        ("\\sin(2x)", "\\cos(2x)", False),
        ("[t, t+1]", "[t+1, t]", False),
        ("10\\text{ cm}", "10\\text{ m}", False),
        ("10 \\text{ kg}", "10 \\text{ g}", False),
        ("x^2 + y^2 = 1", "x^2 + y^2 = 2", False),
        ("y = 2x + 1", "y = 2x + 2", False),
        # Several boxes at the end are one answer with several parts: listing wrong alternatives beside the gold fails.
        ("2", "\\boxed{2}, \\boxed{3}", False),
        ("2", "\\boxed{2} or \\boxed{3}", False),
        ("2", "x = 2 \\text{ or } x = 3", False),
    ],
}
CATEGORY_ROWS = [(cat, *row) for cat, rows in CATEGORIES.items() for row in rows]


@pytest.mark.parametrize("category,gold,prediction,expected", CATEGORY_ROWS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(CATEGORY_ROWS)])
def test_verify_category_table(category, gold, prediction, expected):
    assert verify(gold, prediction) is expected, (category, gold, prediction)


def test_category_tables_have_both_polarities():
    for category, rows in CATEGORIES.items():
        verdicts = {expected for _, _, expected in rows}
        assert verdicts == ({False} if category == "false_positive_guards" else {True, False}), category


def test_decimal_comma_can_be_turned_off():
    assert math_accuracy("\\boxed{3,75}", "3.75") == 1.0
    assert math_accuracy("\\boxed{3,75}", "3.75", decimal_comma=False) == 0.0
    assert math_accuracy("\\boxed{3,75}", "3, 75", decimal_comma=False) == 1.0
    assert math_accuracy("\\boxed{12,000}", "12000", decimal_comma=False) == 1.0


def test_parse_trees_by_hand():
    from fractions import Fraction

    from thinkzero.rewards import math_parse as mp

    def num(v):
        return mp.Num("num", Fraction(v), False)

    x = mp.Name("sym", "x")
    # 2\frac{1}{2} is the mixed number 2 + 1/2; a label's subscript in braces is read whole.
    assert mp.parse(r"2\frac{1}{2}") == mp.Binary("add", num(2), mp.Binary("div", num(1), num(2)))
    assert mp.parse("S_{12} = 5") == mp.Rel("rel", ("=",), [mp.Name("sym", "S_12"), num(5)])
    # \lg is log base 10, \ln the natural log; the word `lg` is the product l*g, the word `sqrt` a root.
    assert mp.parse(r"\lg x") == mp.Func("func", "log10", x)
    assert mp.parse(r"\ln(x)") == mp.Func("func", "log", x)
    assert mp.parse("lg") == mp.Binary("mul", mp.Name("sym", "l"), mp.Name("sym", "g"))
    assert mp.parse("sqrt 2") == mp.Root("root", num(2), num(2))
    assert mp.parse(r"\log_2 8") == mp.Log("log", num(2), num(8))
    assert mp.parse("[1, 2)") == mp.Seq("seq", "[", ")", [num(1), num(2)])
    # The column spec of an array is skipped, nested braces and all.
    assert mp.parse(r"\begin{array}{c{c}} 1 & 2 \end{array}") == mp.Matrix("matrix", [[num(1), num(2)]])
    with pytest.raises(mp.ParseError, match="unclosed group"):
        mp.parse(r"\begin{array}{cc 1 & 2")
    with pytest.raises(mp.ParseError, match="unclosed subscript"):
        mp.parse("x_{1")
