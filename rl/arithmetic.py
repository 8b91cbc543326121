"""Multi-step integer arithmetic word problems: the toy reasoning task of the CPU demo and the tiny test recipe.

Each problem is a short story with a few operations on small integers; the gold answer is an integer and the worked
solution is written in the think/answer format used for cold-start SFT. Difficulty is the number of operations (a
range) and the size of the operands. `make_splits` draws disjoint train / test / cold-start sets: no question text
appears in two splits. Everything is deterministic from a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Ana", "Ben", "Cai", "Dee", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned", "Ola", "Pam"]
ITEMS = ["apples", "books", "coins", "eggs", "pens", "shells", "stamps", "cards", "beads", "nuts"]


@dataclass(frozen=True)
class Difficulty:
    num_ops: int = 2  # operations after the starting amount (the most, when min_ops is set)
    max_value: int = 20  # largest operand
    ops: str = "+-"  # allowed operations: '+', '-', '*'
    min_ops: int | None = None  # fewest operations; None = exactly num_ops

    def __post_init__(self):
        low = self.num_ops if self.min_ops is None else self.min_ops
        if not 1 <= low <= self.num_ops:
            raise ValueError(f"Difficulty needs 1 <= min_ops <= num_ops; got min_ops={self.min_ops}, "
                             f"num_ops={self.num_ops}")
        if self.max_value < 2:
            raise ValueError(f"Difficulty.max_value must be >= 2; got {self.max_value}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"Difficulty.ops must be a non-empty string of '+', '-', '*'; got {self.ops!r}")


def make_problem(rng: random.Random, difficulty: Difficulty) -> dict:
    """One problem: {'question', 'answer' (str of an int), 'solution' (worked think/answer text), 'num_ops'}."""
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    # Drawn only for a range, so fixed-length problems keep the stream they always had.
    num_ops = difficulty.num_ops if difficulty.min_ops is None else rng.randint(difficulty.min_ops, difficulty.num_ops)
    value = rng.randint(1, difficulty.max_value)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(num_ops):
        op = rng.choice(difficulty.ops)
        if op == "-" and value <= 1:
            op = "+"
        if op == "+":
            n = rng.randint(1, difficulty.max_value)
            sentences.append(f"{name} gets {n} more.")
            steps.append(f"{value}+{n}={value + n}")
            value += n
        elif op == "-":
            n = rng.randint(1, min(value - 1, difficulty.max_value))
            sentences.append(f"{name} gives away {n}.")
            steps.append(f"{value}-{n}={value - n}")
            value -= n
        else:
            n = rng.randint(2, 3)
            sentences.append(f"{name} ends up with {n} times as many.")
            steps.append(f"{value}*{n}={value * n}")
            value *= n
    question = " ".join(sentences) + f" How many {item} does {name} have?"
    solution = "<think>\n" + "\n".join(steps) + "\n</think>\n<answer>\n" + str(value) + "\n</answer>"
    return {"question": question, "answer": str(value), "solution": solution, "num_ops": num_ops}


DIRECT_THINK = "at once"


def direct_solution(problem: dict) -> str:
    """The same answer without the worked steps: a think block that skips the reasoning."""
    return f"<think>\n{DIRECT_THINK}\n</think>\n<answer>\n{problem['answer']}\n</answer>"


def mix_styles(rows: list[dict], direct_fraction: float, seed: int) -> list[dict]:
    """Copies of `rows` where a random `direct_fraction` of them answer directly (solution = direct_solution) and the
    rest keep their worked solution; each row gets a 'style' column ('worked' | 'direct').

    A cold-start set in both styles gives a policy that sometimes reasons step by step and sometimes answers at once,
    the situation in which RL with an answer reward learns to reason (and its completions grow longer)."""
    if not 0.0 <= direct_fraction <= 1.0:
        raise ValueError(f"direct_fraction must be in [0, 1]; got {direct_fraction}")
    rng = random.Random(seed)
    direct = set(rng.sample(range(len(rows)), round(direct_fraction * len(rows))))
    return [{**row, "solution": direct_solution(row) if i in direct else row["solution"],
             "style": "direct" if i in direct else "worked"} for i, row in enumerate(rows)]


def make_problems(n: int, seed: int, difficulty: Difficulty = Difficulty()) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, difficulty) for _ in range(n)]


def make_splits(sizes: dict[str, int], seed: int, difficulty: Difficulty = Difficulty(),
                max_tries_per_row: int = 50) -> dict[str, list[dict]]:
    """Disjoint splits, e.g. {'train': 2000, 'test': 200, 'sft': 64} -> {'train': [...], 'test': [...], ...}.

    Problems are drawn from one stream and a question already used by an earlier split is redrawn, so a held-out
    question never appears in training. Splits are filled in the order given.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        rows: list[dict] = []
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > max_tries_per_row * max(n, 1):
                raise ValueError(f"could not draw {n} distinct problems for split {split!r} at {difficulty} "
                                 f"(only {len(rows)} new ones); ask for fewer or make the task harder")
            problem = make_problem(rng, difficulty)
            if problem["question"] in seen:
                continue
            seen.add(problem["question"])
            rows.append(problem)
        out[split] = rows
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path

