"""Seconds per GRPO step: our trainer vs TRL's GRPOTrainer (default), or our trainer on its two rollout engines
(`--compare vllm`: rollout.engine thinkzero vs vllm), same weights (preset w1 by default; w1_mla576 with vLLM, whose
CPU MLA kernel takes only the 576-wide latent), same workload. `--model-type qwen2` benchmarks a transformers policy
instead: random-init preset w1_qwen2 (rl/hf_policy.py: w1's vocabulary, width, depth and heads as a dense Qwen2),
which our trainer runs as rl/hf_policy.py's HFCausalLM (model.policy auto) and samples with rollout.engine
transformers, since our engine samples DeepSeek models only. Both sides then sample with transformers' generate, so
that comparison is the rest of the step plus how each drives generate.

Workload: 4 prompts x G=8 completions of exactly 128 tokens (EOS cannot end a completion: we set rollout.ignore_eos,
TRL gets min_new_tokens=128), temperature 1.0, dapo loss, beta 0.04 (k3 KL against a frozen reference copy),
one optimizer step per rollout (num_iterations 1, no mini-batching), lr 1e-5 constant, AdamW (0.9, 0.999),
grad-norm clipping 1.0, fp32, the same cheap reward function scored in-process. Each framework runs in its own
subprocess with the same torch thread count: `--warmup` untimed steps, then `--steps` timed ones; the figure is the
median. For TRL a step is the time between consecutive `on_step_end` callbacks (its step includes generation).

Prints one line per framework (wall and process-CPU medians), our rollout / reward / reference log-probs / weight
sync / update split (the trainer's own timing metrics, wall clock; weight sync is timed around the engine's
sync_weights and taken out of the update), the ratio, and last `speedup=X.XX` (the other side's seconds per step
over ours). On a shared CPU machine use `--threads 1 --clock cpu`: with more threads than free cores,
OpenMP workers wait for each other on every small op and a decode step can take 10-30x longer. Needs the `bench`
extra (trl).
Usage: python scripts/bench_step.py [--compare trl|vllm] [--model-type deepseek_v3|qwen2] [--preset w1 | --model DIR]
       [--threads N] [--clock wall|cpu] [--warmup 2] [--steps 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS_PER_STEP, NUM_GENERATIONS, COMPLETION_TOKENS = 4, 8, 128
LR, BETA = 1e-5, 0.04
SPLIT = ("rollout", "reward", "logprobs", "update")  # the trainer's timing/<name>_s metrics
PARTS = ("rollout", "reward", "logprobs", "sync", "update", "other")  # what a step's wall time is split into
# Both sides draw 4 prompts per step; 16 distinct ones of the same length, so every step does the same work.
PROMPTS = [f"Question {i:02d}: what is {3 * i + 7} plus {5 * i + 11}? Answer:" for i in range(16)]


def digit_fraction(completion: str) -> float:
    """The benchmark reward (both frameworks): fraction of characters that are digits. Cheap, deterministic, and it
    varies between random completions, so groups have non-zero advantages and the update does real work."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


# ------------------------------------------------------------------------------------------------------------------
# The two frameworks: each returns (seconds per step list, extra info dict).


def run_ours(model_dir: str, work: Path, num_steps: int, engine: str = "thinkzero") -> tuple[list[float], dict]:
    from thinkzero.rl.config import load_config
    from thinkzero.rl.hf_policy import policy_kind
    from thinkzero.rl.trainer import Trainer

    if engine == "thinkzero" and policy_kind(model_dir) == "transformers":
        engine = "transformers"  # our engine samples DeepSeek models only

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    recipe = {
        "model": {"name_or_path": model_dir, "dtype": "float32"},
        "data": {"source": str(data), "prompt_column": "prompt", "answer_column": None, "template": "{prompt}",
                 "shuffle": False},
        "rollout": {"num_generations": NUM_GENERATIONS, "prompts_per_step": PROMPTS_PER_STEP,
                    "max_new_tokens": COMPLETION_TOKENS, "temperature": 1.0, "stop_strings": [], "ignore_eos": True,
                    "engine": engine},
        "algorithm": {"loss_type": "dapo", "beta": BETA, "num_iterations": 1},
        "rewards": {"functions": [{"name": f"{Path(__file__).resolve()}:digit_fraction"}], "num_workers": 0},
        "optim": {"lr": LR, "betas": [0.9, 0.999], "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"max_steps": num_steps, "output_dir": str(work / "out"), "save_every": 0, "seed": 0},
        "logging": {"mode": "disabled", "console": False, "completions_every": 0},
    }
    path = work / "recipe.json"  # JSON is YAML
    path.write_text(json.dumps(recipe))
    trainer = Trainer(load_config(path))
    sync_s = _time_calls(trainer.engine, "sync_weights")
    times, splits = [], []
    try:
        for _ in range(num_steps):
            sync_s.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = trainer.train_step()
            times.append((time.perf_counter() - t0, time.process_time() - c0))
            trainer.step += 1
            assert metrics["completions/mean_length"] == COMPLETION_TOKENS, metrics["completions/mean_length"]
            split = {k: metrics[f"timing/{k}_s"] for k in SPLIT}
            split["sync"] = sum(sync_s)
            split["update"] -= split["sync"]  # the trainer syncs inside its update
            split["other"] = times[-1][0] - sum(split.values())
            splits.append(split)
    finally:
        trainer.tracker.close()
        trainer.scorer.close()
        trainer.engine.close()
    prompt_tokens = len(trainer.examples[0]["prompt_ids"])
    return times, {"splits": splits, "prompt_tokens": prompt_tokens, "engine": engine}


def _time_calls(obj, method: str) -> list[float]:
    """Wraps obj.method so each call's wall seconds are appended to the returned list."""
    inner, seconds = getattr(obj, method), []

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t0)

    setattr(obj, method, timed)
    return seconds


def run_ours_vllm(model_dir: str, work: Path, num_steps: int) -> tuple[list[float], dict]:
    return run_ours(model_dir, work, num_steps, engine="vllm")


def run_trl(model_dir: str, work: Path, num_steps: int) -> tuple[list[float], dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.times, self.last = [], (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            now = (time.perf_counter(), time.process_time())
            self.times.append((now[0] - self.last[0], now[1] - self.last[1]))
            self.last = now

    def reward_fn(completions, **kwargs):
        return [digit_fraction(c) for c in completions]

    reward_fn.__name__ = "digit_fraction"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, fp16=False, seed=0,
        model_init_kwargs={"dtype": torch.float32},
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=NUM_GENERATIONS, num_iterations=1,
        max_completion_length=COMPLETION_TOKENS, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": COMPLETION_TOKENS},  # EOS is never sampled: always 128 tokens
        loss_type="dapo", beta=BETA, scale_rewards="group", use_vllm=False,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, max_steps=num_steps,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, shuffle_dataset=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[reward_fn], args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log]
    assert lengths and all(x == COMPLETION_TOKENS for x in lengths), lengths
    prompt_tokens = len(tokenizer(PROMPTS[0])["input_ids"])
    return timer.times, {"prompt_tokens": prompt_tokens}


RUNNERS = {"ours": run_ours, "trl": run_trl, "ours-vllm": run_ours_vllm}


def child(args) -> None:
    """Runs one framework and prints one JSON line."""
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        times, info = RUNNERS[args.child](args.model, Path(tmp), args.warmup + args.steps)
    print(json.dumps({"framework": args.child, "times": times, **info}))


def measure(args, framework: str) -> dict:
    cmd = [sys.executable, __file__, "--child", framework, "--model", args.model, "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        sys.exit(f"{framework} failed:\n{res.stdout[-2000:]}\n{res.stderr[-6000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", choices=("trl", "vllm"), default="trl",
                    help="trl: TRL's GRPOTrainer vs ours; vllm: our trainer on the vllm engine vs on ours")
    ap.add_argument("--model-type", choices=("deepseek_v3", "qwen2"), default="deepseek_v3",
                    help="which default preset: deepseek_v3 (w1, or w1_mla576 with --compare vllm; our own model and "
                         "engine) or qwen2 (w1_qwen2: a transformers policy, sampled with transformers' generate)")
    ap.add_argument("--preset", default=None, help="model preset to build with random weights (ignored with "
                                                  "--model): model/presets.py's or rl/hf_policy.py's HF_PRESETS; "
                                                  "default from --model-type")
    ap.add_argument("--model", default=None, help="a model directory (config.json + safetensors + tokenizer)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, same for both")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="which median feeds the ratio: wall-clock, or process CPU time (steadier on a busy machine "
                         "with --threads 1)")
    ap.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    other = "trl" if args.compare == "trl" else "ours-vllm"
    if args.preset is None:
        args.preset = {"qwen2": "w1_qwen2", "deepseek_v3": "w1" if args.compare == "trl" else "w1_mla576"}[
            args.model_type]

    with tempfile.TemporaryDirectory() as tmp:
        from thinkzero.rl.hf_policy import policy_kind, write_random_policy

        if args.model is None:
            args.model = tmp
            write_random_policy(args.preset, tmp, seed=0)
        if args.compare == "vllm" and policy_kind(args.model) == "transformers":
            sys.exit("--compare vllm measures vLLM against our engine, which samples DeepSeek models only")
        print(f"model={args.preset if args.model == tmp else args.model} threads={args.threads} "
              f"loadavg={os.getloadavg()[0]:.1f}/{os.cpu_count()} cores "
              f"torch={torch.__version__} workload: {PROMPTS_PER_STEP} prompts x G={NUM_GENERATIONS}, "
              f"{COMPLETION_TOKENS} completion tokens, dapo, beta={BETA}, fp32, {args.warmup} warm-up + "
              f"{args.steps} timed steps")
        if policy_kind(args.model) == "transformers":
            print("  a transformers policy: ours runs it with rollout.engine transformers, so both sides sample with "
                  "transformers' generate; the ratio compares the rest of the step plus how each drives generate")
        res = {f: measure(args, f) for f in (other, "ours")}

    median = {}
    for f in (other, "ours"):
        timed = res[f]["times"][args.warmup:]  # (wall s, process CPU s) per step
        wall, cpu = statistics.median(t[0] for t in timed), statistics.median(t[1] for t in timed)
        median[f] = wall if args.clock == "wall" else cpu
        steps_s = " ".join(f"{t[0]:.2f}" for t in timed)
        engine = f"rollout.engine {res[f]['engine']}; " if "engine" in res[f] else ""
        print(f"  {f:<9} {wall:7.2f} s/step wall, {cpu:7.2f} s/step CPU  (timed steps, wall: {steps_s}; "
              f"{engine}prompt {res[f]['prompt_tokens']} tokens)")
    for f in ("ours", "ours-vllm"):
        if f in res:
            splits = res[f]["splits"][args.warmup:]
            parts = {k: statistics.median(s[k] for s in splits) for k in PARTS}
            total = sum(parts.values())
            print(f"  {f} split (median, wall): " + "  ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)"
                                                             for k, v in parts.items()))
    print("    (logprobs = reference-model forward; sync = weights into the rollout engine; update = policy forward "
          "+ backward + optimizer step)")
    speedup = median[other] / median["ours"]
    print(f"  {other} / ours = {speedup:.2f}x ({args.clock} clock)")
    print(f"speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
