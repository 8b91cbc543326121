"""Kill-and-resume chaos test: SIGKILL, SIGTERM or SIGINT a tiny CPU training run at random points, resume it, and
check that it ends exactly where an uninterrupted run ends.

    python scripts/chaos.py [--runs 10] [--phase-kills 6] [--steps 4] [--save-every 2] [--processes 1|2]
                            [--workdir DIR] [--seed 0]

One uninterrupted reference run first. Then, per run: start `scripts/train.py` in a fresh output dir and stop it
either after a random wall-clock delay — cycling through SIGKILL (the trainer only, as the OOM killer would), SIGTERM
(the trainer, as a scheduler's preemption notice) and SIGINT (the whole process group, as Ctrl-C) — or, for the first
`--phase-kills` runs, at a named phase via THINKZERO_CHAOS_KILL_AT (SIGKILL with the checkpoint half-written, before
the optimizer step, after scoring, after sampling; SIGTERM during the update; SIGINT during the rollout). A SIGTERM or
SIGINT must end the run with exit 4 and a checkpoint of the last finished step. Then check that every complete
checkpoint left behind still loads, and rerun with `train.resume=auto` to the end. `--processes 2` runs everything
under `accelerate launch` with DeepSpeed ZeRO-2 on two CPU processes (signals from outside go to the launcher's
process group, SIGKILL to all of it). A run counts as an exact resume when its final weights are bitwise equal to the
reference's, metrics.jsonl / completions.jsonl hold each step once with the reference's values, and no half-written
checkpoint is left. The last line printed is `exact_resumes=K/N`.

The recipe is built here (a `tiny` random model, arithmetic prompts), so the script needs nothing but the repo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from safetensors.torch import load_file

from thinkzero.rl import checkpoint as ckpt
from thinkzero.rl.faults import ENV as KILL_ENV

# Phase-targeted kills, used in this order (then repeated): the checkpoint window first, where atomicity matters.
PHASE_KILLS = ("checkpoint:{save}", "update:{mid}", "scoring:{last}", "rollout:{save_plus}", "update:{mid}:TERM",
               "rollout:{save_plus}:INT")
RANDOM_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)  # cycled through by the wall-clock kills
SIGNAL_STOP = 4  # scripts/train.py's exit status after a signal and a saved checkpoint
# Metrics that measure time, not training; they differ between any two runs.
UNTIMED = ("timing/", "throughput/")


def write_setup(workdir: Path, steps: int, save_every: int, seed: int, max_new_tokens: int = 12,
                reward_workers: int = 1) -> Path:
    """Data, a tiny random model and the recipe (JSON is YAML) under workdir; returns the recipe path."""
    from thinkzero.model.presets import write_random_model
    from thinkzero.rl.arithmetic import Difficulty, make_problems, write_jsonl

    data = write_jsonl(make_problems(64, seed=seed, difficulty=Difficulty(num_ops=1, max_value=9)),
                       workdir / "train.jsonl")
    write_random_model("tiny", workdir / "model", seed=seed)
    # A user reward file, loaded by path in the reward worker. Random completions differ in it, so every group
    # carries signal and the weights really move (a resume that got the state wrong cannot match by accident).
    rewards = workdir / "chaos_rewards.py"
    rewards.write_text("def letter_fraction(completion: str) -> float:\n"
                       "    return sum(c.isascii() and c.isalpha() for c in completion) / max(1, len(completion))\n")
    recipe = {
        "model": {"name_or_path": str(workdir / "model"), "dtype": "float32"},
        "data": {"source": str(data), "prompt_column": "question", "answer_column": "answer",
                 "template": "{prompt}\n", "max_prompt_length": 128},
        "rollout": {"num_generations": 4, "prompts_per_step": 2, "max_new_tokens": max_new_tokens},
        "rewards": {"functions": [{"name": f"{rewards}:letter_fraction"}, {"name": "math_accuracy"}],
                    "num_workers": reward_workers, "timeout_s": 30},
        "algorithm": {"loss_type": "dapo", "beta": 0.04},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": steps, "save_every": save_every, "keep_last": 1, "seed": seed, "resume": "auto"},
        "logging": {"mode": "disabled", "console": False, "completions_every": 1, "completions_rows": 4},
    }
    path = workdir / "recipe.json"
    path.write_text(json.dumps(recipe, indent=2))
    return path


def snapshot_code(workdir: Path) -> Path:
    """A copy of the packages and scripts the runs execute. Every run of one chaos session then uses the same code,
    even while the working tree changes under it (a reference run and a resumed run of different code cannot match)."""
    code = workdir / "code"
    for name in ("model", "rewards", "rl", "scripts", "recipes/accelerate"):
        shutil.copytree(ROOT / name, code / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return code


def launch(recipe: Path, out: Path, kill_at: str | None, log, processes: int = 1) -> subprocess.Popen:
    code = recipe.parent / "code"
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, "WORLD_SIZE")}
    env["WANDB_MODE"] = "disabled"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # DeepSpeed's JIT-built ops, cached
    if kill_at:
        env[KILL_ENV] = kill_at
    cmd = [sys.executable, str(code / "scripts" / "train.py"), str(recipe), f"train.output_dir={out}"]
    if processes > 1:
        cmd[1:1] = ["-m", "accelerate.commands.launch", "--config_file",
                    str(code / "recipes" / "accelerate" / "zero2-cpu.yaml"), "--num_processes", str(processes),
                    "--main_process_port", str(free_port())]
    # A session of its own, so whatever the trainer leaves behind (reward workers) can be found and cleaned up.
    # The working directory is the code snapshot, where the accelerate config's relative DeepSpeed json is.
    return subprocess.Popen(cmd, env=env, cwd=code, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(proc: subprocess.Popen, sig: int, processes: int) -> None:
    """SIGINT goes to the whole process group (a Ctrl-C); SIGTERM and SIGKILL to the trainer. Under a launcher, SIGINT
    and SIGTERM go to its group (it forwards them to the trainers), SIGKILL to it and to each trainer, which the
    launcher starts in sessions of their own (as a node's OOM killer or a preemption would leave nothing running)."""
    if processes > 1 and sig == signal.SIGKILL:
        trainers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], check=False, capture_output=True,
                                  text=True).stdout.split()
        for pid in trainers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid), sig)  # the trainer and its reward workers
    if sig == signal.SIGINT or processes > 1:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)


def leftovers(proc: subprocess.Popen, wait_s: float = 10.0) -> int:
    """Processes of the killed trainer's session still running after `wait_s` (then killed); 0 when nothing
    outlived it. Reward workers exit on their own once their pipe to the trainer closes; exited children not yet
    reaped by init (zombies) do not count."""
    deadline = time.monotonic() + wait_s
    while True:
        table = subprocess.run(["ps", "-o", "stat=", "-s", str(proc.pid)], check=False, capture_output=True,
                               text=True).stdout
        alive = [stat for stat in table.split() if not stat.startswith("Z")]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    return len(alive)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith(UNTIMED)}


def check_checkpoints(out: Path) -> list[str]:
    """Every complete checkpoint must load (weights + trainer state); returns the problems found."""
    from thinkzero.model import load_model

    problems = []
    for path in ckpt.list_checkpoints(out):
        try:
            load_model(path)
            ckpt.read_state(path)
        except Exception as e:  # noqa: BLE001 -- any failure to load is what we are looking for
            problems.append(f"{path.name} is marked complete but does not load: {type(e).__name__}: {e}")
    return problems


def compare(out: Path, ref: Path, steps: int) -> list[str]:
    """Differences between a resumed run and the reference (empty = exact)."""
    problems = []
    final = ckpt.checkpoint_dir(out, steps)
    if not (final / ckpt.COMPLETE).is_file():
        return [f"no complete {final.name}"]
    a = load_file(str(final / "model.safetensors"))
    b = load_file(str(ckpt.checkpoint_dir(ref, steps) / "model.safetensors"))
    differ = [name for name in b if name not in a or not torch.equal(a[name], b[name])]
    if differ:
        problems.append(f"{len(differ)} tensors differ from the reference, e.g. {differ[0]}")
    for name in ("metrics.jsonl", "completions.jsonl"):
        mine, theirs = read_jsonl(out / name), read_jsonl(ref / name)
        if [r["step"] for r in mine] != [r["step"] for r in theirs]:
            problems.append(f"{name} steps {[r['step'] for r in mine]} != reference {[r['step'] for r in theirs]}")
        elif [untimed(r) for r in mine] != [untimed(r) for r in theirs]:
            problems.append(f"{name} values differ from the reference")
    stale = sorted(p.name for p in out.glob(".tmp-*"))
    if stale:
        problems.append(f"half-written checkpoints left behind: {stale}")
    return problems


def check_graceful(log: Path, out: Path, rc: int, processes: int) -> list[str]:
    """After a SIGTERM / SIGINT that the trainer caught: exit 4 (in one process; a launcher reports its own status)
    and a checkpoint of the last finished step, the one the stop line names. Empty when the run was not stopped so."""
    stops = [line for line in log.read_text().splitlines() if line.startswith("stopped: SIG")]
    if not stops:
        return []
    problems = [] if processes > 1 or rc == SIGNAL_STOP else [f"exit {rc} after {stops[-1]!r}, not {SIGNAL_STOP}"]
    finished = len(read_jsonl(out / "metrics.jsonl"))
    latest = ckpt.latest_checkpoint(out)
    if latest != ckpt.checkpoint_dir(out, finished):
        problems.append(f"stopped after step {finished} but the newest checkpoint is {latest}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="kill-and-resume runs")
    parser.add_argument("--phase-kills", type=int, default=len(PHASE_KILLS),
                        help="how many of the runs kill at a named phase (the rest at random wall-clock times)")
    parser.add_argument("--phase-offset", type=int, default=0,
                        help=f"start the phase kills at this entry of {', '.join(PHASE_KILLS)} (4 = the signals)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--reward-workers", type=int, default=1, help="0 = score in the trainer process")
    parser.add_argument("--seed", type=int, default=0, help="seeds the training runs and the kill times")
    parser.add_argument("--processes", type=int, default=1, help="2 = accelerate launch, DeepSpeed ZeRO-2 on CPU")
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards; default: a temp dir, removed")
    args = parser.parse_args(argv)
    if args.steps < 2 or not 1 <= args.save_every < args.steps:
        parser.error("need --steps >= 2 and 1 <= --save-every < --steps (something to resume from)")

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="thinkzero-chaos-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    try:
        snapshot_code(workdir)
        recipe = write_setup(workdir, args.steps, args.save_every, args.seed, args.max_new_tokens,
                             args.reward_workers)
        ref = workdir / "reference"
        t0 = time.monotonic()
        with open(workdir / "reference.log", "w") as log:
            rc = launch(recipe, ref, None, log, args.processes).wait()
        ref_s = time.monotonic() - t0
        if rc != 0:
            print((workdir / "reference.log").read_text()[-3000:])
            print(f"reference run failed (exit {rc})\nexact_resumes=0/{args.runs}")
            return 1
        first = load_file(str(workdir / "model" / "model.safetensors"))
        last = load_file(str(ckpt.checkpoint_dir(ref, args.steps) / "model.safetensors"))
        moved = sum(not torch.equal(first[k], last[k]) for k in first)
        print(f"reference: {args.steps} steps in {ref_s:.1f}s, {moved}/{len(first)} tensors changed by training")

        fills = {"save": args.save_every, "mid": max(1, args.save_every + 1), "last": args.steps,
                 "save_plus": min(args.steps, args.save_every + 1)}
        exact = 0
        for i in range(args.runs):
            out = workdir / f"run{i:02d}"
            kill_at = PHASE_KILLS[(i + args.phase_offset) % len(PHASE_KILLS)].format(**fills) if i < args.phase_kills else None
            delay = None if kill_at else rng.uniform(0.15, 0.95) * ref_s
            sig = RANDOM_SIGNALS[(i - args.phase_kills) % len(RANDOM_SIGNALS)] if delay is not None else None
            with open(workdir / f"run{i:02d}.log", "w") as log:
                proc = launch(recipe, out, kill_at, log, args.processes)
                try:
                    rc = proc.wait(timeout=delay if delay is not None else 3 * ref_s + 60)
                except subprocess.TimeoutExpired:
                    send(proc, sig or signal.SIGKILL, args.processes)
                    rc = proc.wait(timeout=3 * ref_s + 60)
                orphans = leftovers(proc)
                killed = rc == -signal.SIGKILL
                on_disk = [p.name for p in ckpt.list_checkpoints(out)]
                half = sorted(p.name for p in out.glob(".tmp-*")) if out.exists() else []
                problems = check_checkpoints(out)
                log.flush()
                problems += check_graceful(workdir / f"run{i:02d}.log", out, rc, args.processes)
                proc = launch(recipe, out, None, log, args.processes)
                rc2 = proc.wait(timeout=3 * ref_s + 60)
                leftovers(proc)
            text = (workdir / f"run{i:02d}.log").read_text()
            resumed = [line for line in text.splitlines() if line.startswith("resumed from")]
            if rc2 != 0:
                problems.append(f"resumed run exited {rc2}")
            else:
                problems += compare(out, ref, args.steps)
            ok = not problems
            exact += ok
            how = f"phase {kill_at}" if kill_at else f"{signal.Signals(sig).name} after {delay:.1f}s"
            print(f"run {i}: kill {how}: {'killed' if killed else f'exit {rc}'}; complete "
                  f"checkpoints {on_disk or 'none'}{'; half-written ' + ','.join(half) if half else ''}; "
                  f"{resumed[-1].split(' at ')[-1] if resumed else 'started over'}; orphans {orphans}; "
                  f"{'EXACT' if ok else 'NOT EXACT: ' + '; '.join(problems)}", flush=True)
        print(f"exact_resumes={exact}/{args.runs}")
        return 0 if exact == args.runs else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
