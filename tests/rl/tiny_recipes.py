"""What the trainer tests' recipes share: the tiny preset (written to <root>/model on first use) trained on generated
one-step word problems. Each test adds the sections it is about."""

import json
from pathlib import Path

from thinkzero.rl.arithmetic import Difficulty, make_problems, write_jsonl


def arithmetic_recipe(root: Path, num_problems: int, data_file: str = "train.jsonl", **sections) -> dict:
    """A recipe dict with `model` and `data` filled in; `sections` are added as given (and replace those two)."""
    problems = make_problems(num_problems, seed=0, difficulty=Difficulty(num_ops=1, max_value=9))
    data = write_jsonl(problems, root / data_file)
    return {
        "model": {"name_or_path": str(root / "model"), "init_preset": "tiny", "dtype": "float32"},
        "data": {"source": str(data), "prompt_column": "question", "answer_column": "answer",
                 "template": "{prompt}\n", "max_prompt_length": 128},
        **sections,
    }


def write_recipe(recipe: dict, path: Path) -> Path:
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path
