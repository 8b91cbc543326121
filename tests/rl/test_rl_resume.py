"""Resuming and reusing an output directory: a planted pickle in a checkpoint runs nothing, a fresh run does not
overwrite another run's work, a finished run is not re-saved, a full disk and a corrupt checkpoint get clear messages,
and a changed recipe is applied or refused per field (rl/checkpoint.py).

The runs go through scripts/train.py's main(), as a user does, on the tiny preset (about a second a step)."""

import importlib.util
import os
import resource
from pathlib import Path

import pytest
import torch
from tiny_recipes import arithmetic_recipe, write_recipe

from thinkzero.rl import checkpoint as ckpt
from thinkzero.rl.config import ConfigError, load_config
from thinkzero.rl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
REWARDS = Path(__file__).with_name("rewards_for_tests.py")


def _script():
    spec = importlib.util.spec_from_file_location("thinkzero_train_script", ROOT / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


TRAIN = _script()


class Planted:
    """Pickles as a call to os.system: what an attacker plants in a shared checkpoint."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def plant(file: Path, marker: Path) -> None:
    torch.save({"x": Planted(f"touch {marker}")}, file)


def _recipe(tmp_path: Path, **train) -> Path:
    return write_recipe(arithmetic_recipe(
        tmp_path, 16, "d.jsonl",
        rollout={"num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 4},
        rewards={"functions": [{"name": f"{REWARDS}:digit_fraction"}], "num_workers": 0},
        algorithm={"beta": 0.0},
        optim={"lr": 1e-3},
        train={"max_steps": 1, "output_dir": str(tmp_path / "out"), "save_every": 1, "keep_last": 3, "seed": 1,
               **train},
        logging={"mode": "disabled", "console": False, "completions_every": 0},
    ), tmp_path / "recipe.json")


def run(recipe: Path, capfd, *overrides: str) -> tuple[int, str]:
    code = TRAIN.main([str(recipe), *overrides])
    out = capfd.readouterr()
    return code, out.out + out.err


# --- 14.1: no code runs from a checkpoint ------------------------------------------------------------------------

def test_a_planted_pickle_in_any_file_a_resume_reads_runs_nothing(tmp_path, capfd):
    recipe = _recipe(tmp_path)
    assert run(recipe, capfd)[0] == 0
    saved = tmp_path / "out" / "checkpoint-000001"
    marker = tmp_path / "PWNED"
    for name in (ckpt.STATE_FILE, "rng_rank0.pt"):
        file = saved / name
        genuine = file.read_bytes()
        plant(file, marker)
        code, out = run(recipe, capfd, "train.resume=auto", "train.max_steps=2")
        file.write_bytes(genuine)
        assert not marker.exists(), f"a pickle planted in {name} ran"
        assert code == 2, out
        assert f"error: refused to load {file}: it holds Python objects that are not tensors" in out, out
        assert "posix.system is not allowed" in out and "Traceback" not in out, out


# --- 14.3: a fresh run into another run's output_dir -------------------------------------------------------------

def test_a_fresh_run_into_a_used_output_dir_is_refused_unless_overwriting(tmp_path, capfd):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    assert run(recipe, capfd, "train.max_steps=3")[0] == 0
    metrics = (out / "metrics.jsonl").read_text()
    code, text = run(recipe, capfd, "train.max_steps=2")
    assert code == 2, text
    assert "already holds another run (checkpoint-000003); continue it with train.resume=auto, replace it with " \
           "train.overwrite_output_dir=true" in text, text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-000001", "checkpoint-000002",
                                                            "checkpoint-000003"]
    assert (out / "metrics.jsonl").read_text() == metrics

    code, text = run(recipe, capfd, "train.max_steps=2", "train.overwrite_output_dir=true")
    assert code == 0, text
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-000001", "checkpoint-000002"]
    assert f"saved {out / 'checkpoint-000002'}" in text
    assert ckpt.read_state(out / "checkpoint-000002")["step"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


# --- 14.5: checkpoint writing under faults -----------------------------------------------------------------------

def test_resuming_a_finished_run_leaves_its_checkpoint_untouched(tmp_path, capfd):
    recipe = _recipe(tmp_path)
    assert run(recipe, capfd)[0] == 0
    final = tmp_path / "out" / "checkpoint-000001"
    before = final.stat().st_ino
    code, text = run(recipe, capfd, "train.resume=auto")
    assert code == 0, text
    assert "saved" not in text and final.stat().st_ino == before


def test_an_interrupted_replacement_is_put_back_and_stale_temporaries_removed(tmp_path):
    tmp = ckpt.begin(tmp_path, 2)
    ckpt.write_state(tmp, {"step": 2}, {})
    ckpt.commit(tmp, tmp_path, 2, keep_last=None)
    # A kill after commit() renamed the old step-2 checkpoint aside and before the new one went in:
    (tmp_path / "checkpoint-000002").rename(tmp_path / ".replaced-checkpoint-000002")
    (tmp_path / ".tmp-checkpoint-000002").mkdir()
    notes = ckpt.recover(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000002"
    assert ckpt.read_state(tmp_path / "checkpoint-000002")["step"] == 2
    assert not list(tmp_path.glob(".*"))
    assert notes == [f"removed {tmp_path / '.tmp-checkpoint-000002'}, a checkpoint write that never finished",
                     f"restored {tmp_path / 'checkpoint-000002'}: its replacement was interrupted"]


def test_a_full_disk_while_saving_gets_its_own_exit_code_and_the_next_start_cleans_up(tmp_path, capfd):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    assert run(recipe, capfd)[0] == 0
    # Writes past 100 kB fail as on a full disk (EFBIG instead of ENOSPC; Python ignores SIGXFSZ): the metrics and
    # config files still fit, the model's 0.5 MB safetensors does not.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        code, text = run(recipe, capfd, "train.resume=auto", "train.max_steps=2")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 3, text
    assert f"error: could not write the step-2 checkpoint in {out} (" in text, text
    assert f"the previous checkpoint {out / 'checkpoint-000001'} is intact" in text and "Traceback" not in text
    assert not list(out.glob(".tmp-*")) and ckpt.latest_checkpoint(out) == out / "checkpoint-000001"

    # A temporary a kill left behind (here by hand) is removed at start-up, before anything else is written.
    (out / ".tmp-checkpoint-000002").mkdir()
    (out / ".tmp-checkpoint-000002" / "model.safetensors").write_bytes(b"half")
    trainer = Trainer(load_config(recipe, ["train.resume=auto", "train.max_steps=2"]))
    trainer.tracker.close()
    trainer.scorer.close()
    assert not list(out.glob(".tmp-*"))
    assert f"removed {out / '.tmp-checkpoint-000002'}, a checkpoint write that never finished" in trainer.start_notes


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, capfd):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    assert run(recipe, capfd, "train.max_steps=2")[0] == 0
    state = out / "checkpoint-000002" / ckpt.STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a full disk or bad copy
    code, text = run(recipe, capfd, "train.resume=auto", "train.max_steps=2")
    assert code == 0, text
    assert f"warning: skipped checkpoint-000002 for resume: cannot read {state} (" in text, text
    assert f"resumed from {out / 'checkpoint-000001'} at step 1" in text
    assert ckpt.read_state(out / "checkpoint-000002")["step"] == 2  # trained again and replaced


def test_a_changed_recipe_is_applied_with_a_warning_or_refused_per_field(tmp_path, capfd):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    assert run(recipe, capfd)[0] == 0
    trainer = Trainer(load_config(recipe, ["train.resume=auto", "train.max_steps=2", "optim.lr=0.002",
                                           "optim.weight_decay=0.1"]))
    trainer.tracker.close()
    trainer.scorer.close()
    assert [(g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups] == [(0.002, 0.1)]
    assert "warning: resuming with a changed recipe, applied: optim.lr: 0.001 -> 0.002; " \
           "optim.weight_decay: 0.0 -> 0.1" in trainer.start_notes
    assert "lr: 0.002" in (out / "config.yaml").read_text()  # config.yaml says what runs

    config_yaml = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"cannot resume from .*checkpoint-000001 with a recipe that changes "
                                          r"rollout.batch_size: 4 -> 8; rollout.num_generations: 2 -> 4 \(the checkpoint"):
        Trainer(load_config(recipe, ["train.resume=auto", "rollout.num_generations=4"]))
    assert (out / "config.yaml").read_text() == config_yaml


def test_a_failed_start_leaves_the_runs_config_yaml_alone(tmp_path, capfd):
    recipe = _recipe(tmp_path)
    assert run(recipe, capfd)[0] == 0
    config_yaml = (tmp_path / "out" / "config.yaml").read_text()
    code, text = run(recipe, capfd, "train.resume=auto", "train.max_steps=2", "rewards.modules=[no_such_module_x]")
    assert code == 2, text
    assert (tmp_path / "out" / "config.yaml").read_text() == config_yaml
