"""Seconds per GRPO step with 1 process vs 2 processes (DDP, DeepSpeed ZeRO-2, ZeRO-3), and the share of the step the
processes spend in collectives.

Workload (the w1 workload of scripts/bench_step.py): preset w1 (random init), 4 prompts x G=8 completions of exactly
128 tokens per step (EOS ignored), dapo, beta 0.04 against a reference copy, one optimizer step per step, fp32. The same
global batch in every configuration: with 2 processes each samples and trains on 2 prompts. `--warmup` untimed steps,
then `--steps` timed ones; the figure is the median of the slowest rank.

Communication: in worker processes every torch.distributed collective (and the wait on its async handle) is timed.
That covers DeepSpeed's all-gathers / reduce-scatters and our metric reductions, and includes time spent waiting for
the slower rank. DDP's gradient all-reduce runs inside its C++ reducer, out of reach of that timer, so for DDP we add
the measured time of one all-reduce of all gradients (what the reducer sends once per optimizer step).

    python scripts/bench_distributed.py [--configs single,ddp,zero2,zero3] [--warmup 1] [--steps 3]
On CPU the configs in recipes/accelerate/*-cpu.yaml are used; on a GPU machine pass --gpu (ddp.yaml, zero2.yaml,
zero3.yaml with --num_processes 2).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS_PER_STEP, NUM_GENERATIONS, COMPLETION_TOKENS = 4, 8, 128
PROMPTS = [f"Question {i:02d}: what is {3 * i + 7} plus {5 * i + 11}? Answer:" for i in range(16)]
CPU_CONFIGS = {"ddp": "ddp-cpu.yaml", "zero2": "zero2-cpu.yaml", "zero3": "zero3-cpu.yaml"}
GPU_CONFIGS = {"ddp": "ddp.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}


def digit_fraction(completion: str) -> float:
    """The benchmark reward: cheap, deterministic, varies between random completions (non-zero advantages)."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


# ------------------------------------------------------------------------------------------------------------------
# Worker: one process of a run.

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all_single",
               "all_gather_object", "broadcast_object_list", "barrier")


class _TimedWork:
    """An async collective's handle whose wait() is timed too."""

    def __init__(self, work, clock):
        self._work, self._clock = work, clock

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._clock[0] += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._work, name)


def time_collectives() -> list[float]:
    """Wraps torch.distributed's collectives (before DeepSpeed / accelerate keep references to them)."""
    import torch.distributed as dist

    clock = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                clock[0] += time.perf_counter() - t0
            return _TimedWork(out, clock) if kwargs.get("async_op") and out is not None else out

        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, timed(getattr(dist, name)))
    return clock


def worker(recipe: str, result: str, steps: int, warmup: int) -> None:
    clock = time_collectives() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else [0.0]
    import torch

    from thinkzero.rl.config import load_config
    from thinkzero.rl.trainer import Trainer

    trainer = Trainer(load_config(recipe))
    rows = []
    try:
        for i in range(warmup + steps):
            c0, t0 = clock[0], time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            if i >= warmup:
                rows.append({"step_s": time.perf_counter() - t0, "comm_s": clock[0] - c0,
                             **{k: metrics[f"timing/{k}_s"] for k in ("rollout", "reward", "logprobs", "update")}})
        ddp_allreduce_s = 0.0
        if trainer.world_size > 1 and not trainer.is_deepspeed:
            import torch.distributed as dist

            flat = torch.zeros(sum(p.numel() for p in trainer.policy.parameters()), device=trainer.device)
            samples = []
            for _ in range(5):
                t0 = time.perf_counter()
                dist.all_reduce(flat)
                samples.append(time.perf_counter() - t0)
            ddp_allreduce_s = statistics.median(samples)
    finally:
        trainer.tracker.close()
        trainer.scorer.close()
    Path(f"{result}.rank{trainer.rank}").write_text(json.dumps({"rows": rows, "ddp_allreduce_s": ddp_allreduce_s}))


# ------------------------------------------------------------------------------------------------------------------
# Driver.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_workload(work: Path, preset: str, max_steps: int) -> Path:
    from thinkzero.model.presets import write_random_model

    write_random_model(preset, work / "model", seed=0)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    recipe = {
        "model": {"name_or_path": str(work / "model"), "dtype": "float32"},
        "data": {"source": str(data), "prompt_column": "prompt", "answer_column": None, "template": "{prompt}",
                 "shuffle": False},
        "rollout": {"num_generations": NUM_GENERATIONS, "prompts_per_step": PROMPTS_PER_STEP,
                    "max_new_tokens": COMPLETION_TOKENS, "temperature": 1.0, "stop_strings": [], "ignore_eos": True},
        "algorithm": {"loss_type": "dapo", "beta": 0.04, "num_iterations": 1},
        "rewards": {"functions": [{"name": f"{Path(__file__).resolve()}:digit_fraction"}], "num_workers": 0},
        "optim": {"lr": 1e-5, "max_grad_norm": 1.0},
        "train": {"max_steps": max_steps, "output_dir": str(work / "out"), "save_every": 0, "seed": 0},
        "logging": {"mode": "disabled", "console": False, "completions_every": 0},
    }
    path = work / "recipe.json"  # JSON is YAML
    path.write_text(json.dumps(recipe))
    return path


def run_config(name: str, config: str | None, recipe: Path, work: Path, args) -> dict:
    result = work / f"result-{name}"
    script = [str(Path(__file__).resolve()), "--worker", str(recipe), "--result", str(result),
              "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if config is None:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / config), "--main_process_port", str(_free_port())]
        if args.gpu:
            cmd += ["--num_processes", "2"]
        cmd += script
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(work.glob(f"result-{name}.rank*"))]
    steps = list(zip(*(r["rows"] for r in ranks)))  # per step, one row per rank
    slowest = [max(step, key=lambda row: row["step_s"]) for step in steps]
    step_s = statistics.median(row["step_s"] for row in slowest)
    comm_s = statistics.median(statistics.mean(row["comm_s"] for row in step) for step in steps)
    comm_s += max(r["ddp_allreduce_s"] for r in ranks)
    split = {k: statistics.median(row[k] for row in slowest) for k in ("rollout", "reward", "logprobs", "update")}
    return {"name": name, "processes": len(ranks), "step_s": step_s, "comm_s": comm_s, **split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="single,ddp,zero2,zero3")
    parser.add_argument("--preset", default="w1")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="use the GPU accelerate configs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    parser.add_argument("--worker", metavar="RECIPE", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.result, args.steps, args.warmup)
        return
    configs = GPU_CONFIGS if args.gpu else CPU_CONFIGS
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = write_workload(work, args.preset, args.warmup + args.steps)
        results = []
        for name in args.configs.split(","):
            results.append(run_config(name, None if name == "single" else configs[name], recipe, work, args))
            r = results[-1]
            print(f"{r['name']:>6}  {r['processes']} proc  step {r['step_s']:7.2f} s  "
                  f"(rollout {r['rollout']:.2f}, reward {r['reward']:.2f}, logprobs {r['logprobs']:.2f}, "
                  f"update {r['update']:.2f})  collectives {r['comm_s']:6.2f} s = "
                  f"{100 * r['comm_s'] / r['step_s']:4.1f}% of the step", flush=True)
    base = next((r for r in results if r["name"] == "single"), None)
    if base:
        for r in results:
            if r is not base:
                print(f"speedup {r['name']} vs single: {base['step_s'] / r['step_s']:.2f}x")


if __name__ == "__main__":
    main()
