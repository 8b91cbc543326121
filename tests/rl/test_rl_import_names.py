"""The installed packages are thinkzero.model, thinkzero.rewards and thinkzero.rl, so a user's own rewards.py,
model.py or rl.py beside their recipe cannot shadow them: the README's reward snippet, saved as the user's rewards.py,
works, and scripts/train.py trains with it from that folder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_recipes import arithmetic_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[2]
SHADOW = "raise ImportError('the user file {name} was imported in place of the framework')\n"


def _readme_reward_snippet() -> str:
    section = (ROOT / "README.md").read_text().split("## Rewards", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _user_folder(tmp_path: Path) -> Path:
    user = tmp_path / "user"
    user.mkdir()
    (user / "rewards.py").write_text(_readme_reward_snippet())
    for name in ("model", "rl"):
        (user / f"{name}.py").write_text(SHADOW.format(name=f"{name}.py"))
    return user


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def test_readme_snippet_imports_the_framework_beside_user_files(tmp_path):
    user = _user_folder(tmp_path)
    check = ("import rewards, thinkzero.rl.trainer, thinkzero.model\n"
             "from thinkzero.rewards.registry import get\n"
             "print(rewards.__file__, get('short_answer').fn('x', answer='1'))\n")
    proc = subprocess.run([sys.executable, "-c", check], cwd=user, env=_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path, value = proc.stdout.split()
    assert Path(path) == user / "rewards.py" and value == "1.0"  # the user's module and the framework side by side


@pytest.mark.slow
def test_train_script_runs_from_a_folder_with_user_files(tmp_path):
    user = _user_folder(tmp_path)
    recipe = arithmetic_recipe(
        tmp_path, 16, rollout={"num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 8},
        rewards={"functions": [{"name": "rewards.py:short_answer"}, {"name": "math_accuracy"}], "num_workers": 1},
        train={"max_steps": 1, "output_dir": str(tmp_path / "out")}, logging={"mode": "disabled"})
    path = write_recipe(recipe, user / "recipe.json")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), str(path)], cwd=user, env=_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and record["rewards/short_answer/mean"] == 1.0
