"""SIGTERM and SIGINT stop a run at a step boundary with a checkpoint of the last finished step, and resume=auto then
ends bitwise where a straight run ends; a second signal exits at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_recipes import arithmetic_recipe, write_recipe

from thinkzero.rl import checkpoint as ckpt
from thinkzero.rl import faults
from thinkzero.rl.config import load_config
from thinkzero.rl.signals import StopRequest
from thinkzero.rl.trainer import SignalStop, train

ROOT = Path(__file__).resolve().parents[2]
REWARDS = Path(__file__).with_name("rewards_for_tests.py")


def _recipe(tmp_path: Path) -> Path:
    recipe = arithmetic_recipe(
        tmp_path, 32, "d.jsonl",
        rollout={"num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 6},
        rewards={"functions": [{"name": f"{REWARDS}:digit_fraction"}], "num_workers": 1},  # varies: real gradients
        algorithm={"beta": 0.04},
        optim={"lr": 1e-3},
        train={"max_steps": 4, "save_every": 1000, "seed": 1, "resume": "auto"},
        logging={"mode": "disabled", "console": False, "completions_every": 0},
    )
    return write_recipe(recipe, tmp_path / "recipe.json")


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.checkpoint_dir(out, step) / "model.safetensors"))


@pytest.mark.parametrize("kill_at, saved_step", [
    ("update:2:TERM", 2),  # during the update: step 2 is finished, then saved
    ("rollout:3:INT", 2),  # during the rollout: step 3 is abandoned, step 2 saved
])
def test_a_signal_saves_the_last_finished_step_and_resume_is_exact(tmp_path, monkeypatch, kill_at, saved_step):
    recipe = _recipe(tmp_path)
    straight = tmp_path / "straight"
    train(load_config(recipe, [f"train.output_dir={straight}"]))

    out = tmp_path / "stopped"
    monkeypatch.setenv(faults.ENV, kill_at)
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    with pytest.raises(SignalStop, match=f"saved .*checkpoint-00000{saved_step} at step {saved_step}; continue "
                                         "with train.resume=auto"):
        train(load_config(recipe, [f"train.output_dir={out}"]))
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers  # put back
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-00000{saved_step}"]
    assert ckpt.read_state(ckpt.latest_checkpoint(out))["step"] == saved_step

    monkeypatch.delenv(faults.ENV)
    train(load_config(recipe, [f"train.output_dir={out}"]))
    a, b = _weights(out, 4), _weights(straight, 4)
    assert all(torch.equal(a[k], b[k]) for k in b), "the resumed run's weights differ from the straight run's"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the abandoned step is logged once, by the resumed run


def test_scripts_train_exits_4_on_sigterm_with_a_checkpoint(tmp_path):
    """The issue's reproduction: a long run with a large save_every, SIGTERM from outside after a few steps."""
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), str(_recipe(tmp_path)),
                             "train.max_steps=400", f"train.output_dir={out}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 4, stderr
    logged = len(metrics.read_text().splitlines())
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-{logged:06d}"]
    assert stderr.strip().splitlines()[-1] == (f"stopped: SIGTERM: saved {out}/checkpoint-{logged:06d} at step "
                                               f"{logged}; continue with train.resume=auto")
    assert "Traceback" not in stderr


def test_a_second_signal_exits_at_once():
    code = ("import os, signal, time\n"
            "from thinkzero.rl.signals import StopRequest\n"
            "with StopRequest(same_request_s=0.0) as stop:\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)\n"
            "    assert stop.signal_name == 'SIGINT'\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
            "print('survived')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGINT and "survived" not in proc.stdout, proc.stderr
    assert "SIGINT received: finishing this step, saving a checkpoint, then exiting" in proc.stderr


def test_signals_forwarded_together_count_once():
    with StopRequest(same_request_s=60.0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. from the process group and again from the launcher
        time.sleep(0.05)
        assert stop.signal_name == "SIGTERM"


def test_reward_workers_ignore_ctrl_c_and_sigterm_from_their_first_instruction():
    """Ctrl-C reaches the whole process group; the workers leave the shutdown to the trainer (no traceback of theirs,
    no sample lost mid-score). The disposition is inherited, so it holds while a worker still imports."""
    import thinkzero.rewards as tzrewards

    scorer = tzrewards.Scorer([{"name": f"{REWARDS}:digit_fraction"}], num_workers=1, timeout_s=30)
    try:
        pid = scorer._pool.workers[0].process.pid
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        assert scorer.score(["a1", "22"]).total == [0.5, 1.0]
        assert scorer._pool.workers[0].process.pid == pid  # the same worker, not a replacement
    finally:
        scorer.close()
