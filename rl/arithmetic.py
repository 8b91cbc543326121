"""Multi-step integer arithmetic word problems: the toy reasoning task of the CPU demo and the tiny test recipe.

Each problem is a short story with `num_ops` operations on small integers; the gold answer is an integer and the
worked solution is written in the think/answer format used for cold-start SFT. Everything is deterministic from a seed.
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
    num_ops: int = 2  # operations after the starting amount
    max_value: int = 20  # largest operand
    ops: str = "+-"  # allowed operations: '+', '-', '*'


def make_problem(rng: random.Random, difficulty: Difficulty) -> dict:
    """One problem: {'question', 'answer' (str of an int), 'solution' (worked think/answer text), 'num_ops'}."""
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = rng.randint(1, difficulty.max_value)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(difficulty.num_ops):
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
    return {"question": question, "answer": str(value), "solution": solution, "num_ops": difficulty.num_ops}


def make_problems(n: int, seed: int, difficulty: Difficulty = Difficulty()) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, difficulty) for _ in range(n)]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
