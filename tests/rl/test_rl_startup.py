"""Multi-process start-up (issue 19): ranks that see the file system differently still issue the same collectives,
and a collective that the ranks do not all reach ends the run with an error within train.dist_timeout_s.

The two ranks are started by hand with the environment torchrun / `accelerate launch` give each process (RANK,
WORLD_SIZE, MASTER_ADDR, ...), so each can run in a directory of its own. The recipe names the model by the relative
path `model`, so each rank looks for it in its own working directory: rank 0 finds nothing and writes the preset,
rank 1 finds a complete copy already there (the same preset and seed, so the same weights). That is the timing of the
reported deadlock (rank 0 writes config.json before rank 1 checks), made certain instead of likely.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_recipes import arithmetic_recipe, write_recipe

from thinkzero.model.presets import write_random_model

ROOT = Path(__file__).resolve().parents[2]
REWARDS = Path(__file__).with_name("rewards_for_tests.py")
SEED = 5
DIST_TIMEOUT_S = 30  # a mismatched collective must fail within this, not hang
LAUNCH_TIMEOUT_S = 150  # start-up of two processes on two shared cores plus one step, with a wide margin

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(root: Path) -> Path:
    recipe = arithmetic_recipe(
        root, 16,
        # relative on purpose: resolved in each rank's working directory (nothing named `model` next to the recipe)
        model={"name_or_path": "model", "init_preset": "tiny", "dtype": "float32"},
        rollout={"num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 4},
        algorithm={"loss_type": "dapo", "beta": 0.0},
        rewards={"functions": [{"name": f"{REWARDS}:digit_fraction"}], "num_workers": 0},
        train={"max_steps": 1, "save_every": 0, "seed": SEED, "output_dir": str(root / "out"),
               "dist_timeout_s": DIST_TIMEOUT_S},
        logging={"mode": "disabled", "completions_every": 0, "console": False},
    )
    return write_recipe(recipe, root / "recipe.json")


def _launch(recipe: Path, cwds: list[Path], overrides: list[list[str]], timeout_s: float) -> list[tuple[int, str]]:
    """Runs scripts/train.py as ranks 0..n-1, rank i in cwds[i] with overrides[i]; (exit status, stderr) per rank.
    A rank still running after timeout_s is killed (with its process group) and reported as None."""
    port = _free_port()
    procs = []
    for rank, (cwd, extra) in enumerate(zip(cwds, overrides)):
        env = {**os.environ, "WANDB_MODE": "disabled", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(len(cwds)), "LOCAL_WORLD_SIZE": str(len(cwds)), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        log = open(cwd / f"stderr-rank{rank}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe), *extra],
                                       cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                       start_new_session=True), log))
    deadline = time.monotonic() + timeout_s
    results = []
    for rank, (proc, log) in enumerate(procs):
        try:
            rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        log.close()
        results.append((rc, (cwds[rank] / f"stderr-rank{rank}.txt").read_text()))
    return results


def _rank_dirs(root: Path) -> list[Path]:
    dirs = [root / "rank0", root / "rank1"]
    for d in dirs:
        d.mkdir()
    # Rank 1 sees a complete model directory: what rank 0 writes (same preset, same seed) is already there.
    write_random_model("tiny", dirs[1] / "model", seed=SEED)
    return dirs


def test_start_up_finishes_when_rank1_sees_the_model_rank0_writes(tmp_path):
    """Fails on the code before the fix (the barrier inside `if init_preset and no config.json`): rank 0 waits in
    that barrier, rank 1 skipped it and waits in the next collective, until the process-group timeout."""
    recipe = _recipe(tmp_path)
    cwds = _rank_dirs(tmp_path)
    started = time.monotonic()
    results = _launch(recipe, cwds, [[], []], LAUNCH_TIMEOUT_S)
    for rank, (rc, stderr) in enumerate(results):
        assert rc == 0, f"rank {rank} exit {rc} after {time.monotonic() - started:.0f} s:\n{stderr[-4000:]}"
    assert (cwds[0] / "model" / "config.json").is_file()  # rank 0 did write the preset: the case under test
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert (tmp_path / "out" / "checkpoint-000001" / "COMPLETE").is_file()


def test_a_collective_only_one_rank_reaches_fails_within_the_timeout(tmp_path):
    """Rank 1 is told to stop after step 1, rank 0 after step 2: rank 1 waits in its final checkpoint's collectives
    while rank 0 waits in step 2's first one. Both processes stay alive, so nothing but the process-group timeout
    can end the wait; both must exit with an error instead of hanging (issue 19). Fails with the default 1800 s
    timeout, or if train.dist_timeout_s does not reach the process group."""
    recipe = _recipe(tmp_path)
    cwds = _rank_dirs(tmp_path)
    started = time.monotonic()
    results = _launch(recipe, cwds, [["train.max_steps=2"], ["train.max_steps=1"]], LAUNCH_TIMEOUT_S)
    elapsed = time.monotonic() - started
    for rank, (rc, stderr) in enumerate(results):
        assert rc is not None, f"rank {rank} still waiting after {elapsed:.0f} s: the collective hung\n{stderr[-3000:]}"
        assert rc != 0, stderr[-3000:]
    assert "timed out" in results[0][1].lower(), results[0][1][-3000:]
    # Rank 0 waits in step 2's first collective; its one-line error says so (and is not a traceback).
    last = results[0][1].strip().splitlines()[-1]
    assert last.startswith("error: the processes stopped meeting at the same collective at step 2 while "), last
