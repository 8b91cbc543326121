"""Tracker: W&B offline run directory, metrics/completions JSONL, resume truncation, rank-0 only, no secrets."""

import json

import pytest
import torch

from thinkzero.rl.tracking import Tracker, has_wandb_api_key, resolve_wandb_mode


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_run_writes_wandb_dir_and_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = {"train": {"max_steps": 2}, "logging": {"project": "p", "wandb_api_key": "SECRET-123"}}
    with Tracker(tmp_path, is_main=True, config=config, project="thinkzero-test", run_name="t", tags=["ci"],
                 total_steps=2) as tracker:
        assert tracker.wandb_mode == "offline"
        tracker.log({"reward": torch.tensor(0.5), "kl": 0.01, "completions/mean_length": 12.0, "hf_token": "x",
                     "policy_loss": float("nan")}, step=1)
        tracker.log_completions([{"prompt": "1+1", "completion": "2", "rewards/math_accuracy": 1.0,
                                  "advantage": torch.tensor(0.7)}], step=1)
        tracker.log({"reward": 0.75, "kl": 0.02}, step=2)
        tracker.log_completions([{"prompt": "2+2", "completion": "5", "rewards/math_accuracy": 0.0,
                                  "advantage": -0.7}], step=2)
        run_dir = tracker.wandb_run_dir
    assert run_dir is not None and run_dir.name.startswith("offline-run-") and run_dir.parent == tmp_path / "wandb"
    assert run_dir.is_dir() and any(run_dir.glob("*.wandb"))
    metrics = _read(tmp_path / "metrics.jsonl")
    assert metrics == [
        {"step": 1, "reward": 0.5, "kl": 0.01, "completions/mean_length": 12.0, "policy_loss": None},
        {"step": 2, "reward": 0.75, "kl": 0.02},
    ]
    completions = _read(tmp_path / "completions.jsonl")
    assert [c["step"] for c in completions] == [1, 2]  # appended, not overwritten
    assert completions[0]["advantage"] == pytest.approx(0.7)
    # secrets reach neither the files nor the W&B run's stored config
    for path in [*tmp_path.glob("*.jsonl"), *run_dir.rglob("*.yaml"), *run_dir.rglob("*.wandb")]:
        assert b"SECRET-123" not in path.read_bytes(), path


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    with Tracker(tmp_path, is_main=True, mode="disabled", console=False) as tracker:
        for step in range(1, 5):
            tracker.log({"reward": float(step)}, step=step)
            tracker.log_completions([{"completion": str(step)}], step=step)
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 5, "rew')  # a line cut short by a kill
    with Tracker(tmp_path, is_main=True, mode="disabled", console=False, start_step=2) as tracker:
        tracker.log({"reward": 30.0}, step=3)
    assert [(m["step"], m["reward"]) for m in _read(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [c["step"] for c in _read(tmp_path / "completions.jsonl")] == [1, 2]
    assert not list(tmp_path.glob("wandb"))  # disabled: no W&B directory at all


def test_non_main_process_writes_nothing(tmp_path):
    out = tmp_path / "out"
    tracker = Tracker(out, is_main=False, mode="offline")
    tracker.log({"reward": 1.0}, step=1)
    tracker.log_completions([{"completion": "x"}], step=1)
    tracker.write("hello")
    tracker.close()
    assert not out.exists()


def test_console_bar_shows_reward_kl_length_and_step_time(tmp_path, capsys):
    with Tracker(tmp_path, is_main=True, mode="disabled", total_steps=3) as tracker:
        tracker.log({"reward": 0.25, "kl": 0.001, "completions/mean_length": 40.0, "timing/step_s": 1.5}, step=1)
        tracker.write("dropped 3 prompts longer than 512 tokens")
    captured = capsys.readouterr()
    bar = captured.err
    assert "reward=0.25" in bar and "kl=0.001" in bar and "len=40" in bar and "s/step=1.5" in bar
    assert "dropped 3 prompts" in captured.out


def test_mode_resolution(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "missing")}
    assert resolve_wandb_mode("online", no_netrc) == "offline"  # no key -> offline automatically
    assert resolve_wandb_mode("online", {**no_netrc, "WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode("disabled", {"WANDB_API_KEY": "k"}) == "disabled"
    assert resolve_wandb_mode("online", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"
    with pytest.raises(ValueError, match="online, offline or disabled"):
        resolve_wandb_mode("quiet", {})
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    netrc_file.chmod(0o600)
    assert has_wandb_api_key({"NETRC": str(netrc_file)})
    assert not has_wandb_api_key({"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example.com"})
