"""Faults: half-written checkpoints are never resumed from, non-finite updates are skipped and counted and stop the
run after too many in a row (with the state saved), and SIGKILL at any point resumes exactly (scripts/chaos.py)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_recipes import arithmetic_recipe, write_recipe

from thinkzero.rl import checkpoint as ckpt
from thinkzero.rl import faults
from thinkzero.rl import trainer as rl_trainer
from thinkzero.rl.config import load_config
from thinkzero.rl.trainer import TrainingStopped, train

ROOT = Path(__file__).resolve().parents[2]
REWARDS = Path(__file__).with_name("rewards_for_tests.py")


# --- checkpoint directories --------------------------------------------------------------------------------------

def _fake_checkpoint(out: Path, step: int) -> Path:
    tmp = ckpt.begin(out, step)
    (tmp / "model.safetensors").write_bytes(b"weights")
    ckpt.write_state(tmp, {"step": step}, {"train": {}})
    return ckpt.commit(tmp, out, step, keep_last=None)


def test_half_written_checkpoints_are_never_resumed_from_and_cleaned_on_the_next_save(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    # A kill while writing step 4: the temporary directory has everything but the COMPLETE marker.
    tmp = ckpt.begin(tmp_path, 4)
    (tmp / "model.safetensors").write_bytes(b"half")
    # A renamed directory without the marker (e.g. copied by hand) is not complete either.
    (tmp_path / "checkpoint-000006").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000002"
    assert ckpt.read_state(tmp_path / "checkpoint-000002")["step"] == 2
    with pytest.raises(FileNotFoundError, match="not a complete thinkzero checkpoint"):
        ckpt.read_state(tmp_path / "checkpoint-000006")

    _fake_checkpoint(tmp_path, 3)  # the next save, at another step, removes the leftover
    assert not list(tmp_path.glob(".tmp-*"))
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-000003"


def test_pruned_and_replaced_checkpoints_lose_their_marker_first(tmp_path, monkeypatch):
    for step in (1, 2):
        _fake_checkpoint(tmp_path, step)
    seen = []
    real_rmtree = ckpt.shutil.rmtree

    def rmtree(path, *args, **kwargs):  # what a kill in the middle of the deletion would leave behind
        seen.append((Path(path).name, (Path(path) / ckpt.COMPLETE).exists()))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    tmp = ckpt.begin(tmp_path, 2)
    ckpt.write_state(tmp, {"step": 2}, {})
    ckpt.commit(tmp, tmp_path, 2, keep_last=1)  # the same step again (replaced), then step 1 pruned
    # The replaced one was renamed aside before the new one went in, and deleted only then.
    assert (".replaced-checkpoint-000002", False) in seen and ("checkpoint-000001", False) in seen
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000002"]


def test_kill_point_spec():
    assert faults.parse("checkpoint:4") == ("checkpoint", 4)
    for bad in ("update", "update:x", "backward:1"):
        with pytest.raises(ValueError, match="must look like <phase>:<step> with phase one of rollout, scoring"):
            faults.parse(bad)


# --- non-finite updates ------------------------------------------------------------------------------------------

def _recipe(tmp_path: Path, **sections) -> Path:
    recipe = arithmetic_recipe(
        tmp_path, 32, "d.jsonl",
        rollout={"num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 6},
        rewards={"functions": [{"name": f"{REWARDS}:digit_fraction"}], "num_workers": 0},  # varies: real gradients
        algorithm={"beta": 0.0},
        optim={"lr": 1e-3, "max_consecutive_skips": 2},
        train={"max_steps": 3, "output_dir": str(tmp_path / "out"), "save_every": 0, "seed": 1},
        logging={"mode": "disabled", "console": False, "completions_every": 0},
    )
    for key, value in sections.items():
        recipe[key].update(value)
    return write_recipe(recipe, tmp_path / "recipe.json")


def _poison_loss(monkeypatch, poisoned_calls):
    """The policy loss of the given (1-based) calls becomes NaN — one call per step with these batch sizes — so the
    backward pass fills the gradients with NaN, as an overflow would."""
    real = rl_trainer.policy_loss
    calls = []

    def policy_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) in poisoned_calls else loss), metrics

    monkeypatch.setattr(rl_trainer, "policy_loss", policy_loss)


def test_a_non_finite_update_is_skipped_counted_and_training_goes_on(tmp_path, monkeypatch, capsys):
    _poison_loss(monkeypatch, {2})
    train(load_config(_recipe(tmp_path)))
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in records] == [0.0, 1.0, 1.0]
    assert records[1]["grad_norm"] is None and records[2]["grad_norm"] > 0  # NaN is written as null
    assert "step 2: non-finite gradient norm, update skipped (1 in a row)" in capsys.readouterr().out
    state = ckpt.read_state(out / "checkpoint-000003")
    assert state["skipped_updates"] == 1 and state["consecutive_skips"] == 0


def test_too_many_non_finite_updates_stop_the_run_with_the_state_saved(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, {1, 2, 3})
    with pytest.raises(TrainingStopped, match="2 consecutive updates had non-finite gradients; stopped at step 1"):
        train(load_config(_recipe(tmp_path)))
    out = tmp_path / "out"
    saved = ckpt.latest_checkpoint(out)
    assert saved == out / "checkpoint-000001"
    state = ckpt.read_state(saved)
    assert state["skipped_updates"] == 2 and state["consecutive_skips"] == 2
    start, end = load_file(str(tmp_path / "model" / "model.safetensors")), load_file(str(saved / "model.safetensors"))
    assert all(torch.equal(start[k], end[k]) for k in start), "a skipped update changed the weights"
    assert all(v.abs().sum() == 0 for s in state["optimizer"]["state"].values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0), "a skipped update reached the optimizer moments"


# --- kill -9 and resume ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path, capsys):
    """A small scripts/chaos.py: a kill with the checkpoint half-written and one at a random time, each resumed."""
    spec = importlib.util.spec_from_file_location("thinkzero_chaos_script", ROOT / "scripts" / "chaos.py")
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    code = chaos.main(["--runs", "2", "--phase-kills", "1", "--steps", "2", "--save-every", "1",
                       "--max-new-tokens", "4", "--reward-workers", "0", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == "exact_resumes=2/2", out
    assert code == 0
    assert "run 0: kill phase checkpoint:1: killed; complete checkpoints none; half-written .tmp-checkpoint-000001" \
        in out, out
