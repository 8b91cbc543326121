"""R1 in miniature on a CPU: cold-start SFT on a few worked examples, then GRPO with rule-based rewards, evaluated on
held-out problems before and after RL.

    python scripts/demo.py [--out runs/demo] [--seed 0] [--threads 1] [--quick]

Stages (each writes under --out): data/ (train, held-out test and cold-start jsonl), sft/ (recipes/demo/sft.yaml),
eval_sft.json, grpo/ (recipes/demo/grpo.yaml; metrics.jsonl, checkpoints, W&B offline run), eval_grpo.json,
curves.png, summary.json. Prints the before/after table. `--quick` shrinks everything to a smoke test (seconds, not
minutes; the numbers mean nothing). W&B runs offline unless WANDB_API_KEY is configured.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

import thinkzero.model as tzmodel
from thinkzero.rl.arithmetic import Difficulty, make_splits, mix_styles, write_jsonl
from thinkzero.rl.config import load_config
from thinkzero.rl.data import load_rows, prepare_examples
from thinkzero.rl.evaluation import evaluate_policy
from thinkzero.rl.sft import load_sft_config, train_sft

SFT_RECIPE = ROOT / "recipes" / "demo" / "sft.yaml"
GRPO_RECIPE = ROOT / "recipes" / "demo" / "grpo.yaml"

# The task: two additions/subtractions of numbers up to 9. Held-out test problems never appear in train or SFT.
DIFFICULTY = Difficulty(num_ops=2, max_value=9, ops="+-")
SIZES = {"test": 200, "train": 2000, "sft": 2000}
# Half of the cold-start examples answer without working (rl.arithmetic.mix_styles), so the SFT policy reasons only
# some of the time; GRPO, rewarded for correct answers only, has to find out that working it through pays.
DIRECT_FRACTION = 0.5
EVAL_SAMPLES = 8
WORKED_STEP = re.compile(r"\d[+-]\d+=\d")

# Smoke-test sizes (--quick): a tiny model, a few steps of each stage.
QUICK_SIZES = {"test": 8, "train": 32, "sft": 16}
QUICK_SFT = ["model.init_preset=tiny", "train.max_steps=4", "train.batch_size=4", "logging.mode=disabled"]
QUICK_GRPO = ["train.max_steps=2", "rollout.num_generations=2", "rollout.prompts_per_step=2",
              "rollout.max_new_tokens=16", "train.eval_every=1", "data.eval_max_examples=4", "logging.mode=disabled"]
QUICK_SAMPLES = 2


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evaluate(model_dir: Path, test_file: Path, grpo_cfg, num_samples: int, out: Path, seed: int):
    """Greedy + sampled evaluation of a model directory on the held-out file, with the GRPO recipe's template and
    rollout settings (what the policy saw in training); writes summary + completions to `out` and returns both."""
    d, r = grpo_cfg.data, grpo_cfg.rollout
    tokenizer = tzmodel.load_tokenizer(model_dir)
    policy = tzmodel.load_model(model_dir, dtype=torch.float32)
    examples, _ = prepare_examples(load_rows(str(test_file)), tokenizer, prompt_column=d.prompt_column,
                                   answer_column=d.answer_column, template=d.template,
                                   max_prompt_length=d.max_prompt_length)
    t0 = time.perf_counter()
    summary, records = evaluate_policy(policy, tokenizer, examples, num_samples=num_samples,
                                       temperature=r.temperature or 1.0, max_new_tokens=r.max_new_tokens,
                                       stop_strings=r.stop_strings, batch_size=64, seed=seed)
    # Demo-specific: how often the policy works the problem through (writes a step like 5+3=8) before answering.
    summary["greedy/worked"] = sum(bool(WORKED_STEP.search(rec["greedy"]["text"])) for rec in records) / len(records)
    out.write_text(json.dumps({"model": str(model_dir), "data": str(test_file), "summary": summary,
                               "seconds": time.perf_counter() - t0, "records": records}, indent=1) + "\n")
    return summary, records


ROWS = [("held-out accuracy (greedy pass@1)", "greedy/pass@1", "pct"),
        ("sampled pass@1", "sampled/pass@1", "pct"),
        ("maj@{k}", "maj@{k}", "pct"),
        ("pass@{k}", "pass@{k}", "pct"),
        ("format rate (greedy)", "greedy/format", "pct"),
        ("works it through (greedy)", "greedy/worked", "pct"),
        ("mean length (greedy, tokens)", "greedy/mean_length", "num")]


def table(before: dict, after: dict, k: int) -> str:
    lines = [f"{'':34} {'SFT':>8} {'SFT+GRPO':>9} {'change':>8}"]
    for label, key, kind in ROWS:
        label, key = label.format(k=k), key.format(k=k)
        b, a = before[key], after[key]
        if kind == "pct":
            lines.append(f"{label:34} {100 * b:>7.1f}% {100 * a:>8.1f}% {100 * (a - b):>+7.1f}")
        else:
            lines.append(f"{label:34} {b:>8.1f} {a:>9.1f} {a - b:>+8.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory (replaced stage by stage)")
    p.add_argument("--seed", type=int, default=0, help="training seed: model init, SFT order, sampling")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated problems")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the model is tiny: one thread wastes least on a busy machine)")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (for the test suite)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    times = {}

    log(f"1/6 data -> {out / 'data'}")
    t = time.perf_counter()
    splits = make_splits(QUICK_SIZES if args.quick else SIZES, args.data_seed, DIFFICULTY)
    splits["sft"] = mix_styles(splits["sft"], DIRECT_FRACTION, args.data_seed)
    files = {name: write_jsonl(rows, out / "data" / f"{name}.jsonl") for name, rows in splits.items()}
    times["data"] = time.perf_counter() - t

    log(f"2/6 cold-start SFT on {len(splits['sft'])} examples ({100 * DIRECT_FRACTION:.0f}% answered at once, the "
        f"rest worked step by step) -> {out / 'sft'}")
    t = time.perf_counter()
    sft_cfg = load_sft_config(SFT_RECIPE, [
        f"model.name_or_path={out / 'init'}", f"data.source={files['sft']}", f"train.output_dir={out / 'sft'}",
        f"train.seed={args.seed}", *(QUICK_SFT if args.quick else [])])
    sft_dir = train_sft(sft_cfg)
    times["sft"] = time.perf_counter() - t

    grpo_overrides = [f"model.name_or_path={sft_dir}", f"data.source={files['train']}",
                      f"data.eval_source={files['test']}", f"train.output_dir={out / 'grpo'}",
                      f"train.seed={args.seed}", *(QUICK_GRPO if args.quick else [])]
    grpo_cfg = load_config(GRPO_RECIPE, grpo_overrides)
    samples = QUICK_SAMPLES if args.quick else EVAL_SAMPLES

    log(f"3/6 evaluate the SFT model on {len(load_rows(str(files['test'])))} held-out problems")
    t = time.perf_counter()
    before, before_records = evaluate(sft_dir, files["test"], grpo_cfg, samples, out / "eval_sft.json", args.seed)
    times["eval_sft"] = time.perf_counter() - t
    log(f"   greedy accuracy {100 * before['greedy/pass@1']:.1f}%, format {100 * before['greedy/format']:.1f}%")

    log(f"4/6 GRPO for {grpo_cfg.train.max_steps} steps -> {out / 'grpo'}")
    t = time.perf_counter()
    from thinkzero.rl.trainer import train  # imports accelerate; only needed here

    trainer = train(grpo_cfg)
    final = out / "grpo" / f"checkpoint-{trainer.step:06d}"
    times["grpo"] = time.perf_counter() - t

    log(f"5/6 evaluate the GRPO model ({final.name})")
    t = time.perf_counter()
    after, _ = evaluate(final, files["test"], grpo_cfg, samples, out / "eval_grpo.json", args.seed)
    times["eval_grpo"] = time.perf_counter() - t

    log("6/6 plot")
    t = time.perf_counter()
    png = out / "curves.png"
    try:
        from thinkzero.rl.plotting import plot, read_metrics

        # The SFT model's greedy accuracy on the problems the trainer evaluates, as the curve's step-0 point.
        n_eval = grpo_cfg.data.eval_max_examples or len(before_records)
        start = sum(r["greedy"]["correct"] for r in before_records[:n_eval]) / len(before_records[:n_eval])
        plot(read_metrics(out / "grpo"), png, title=f"GRPO on the cold-start SFT model (seed {args.seed})",
             extra_points={"eval/math_accuracy/mean": [(0, start)]})
    except ImportError:
        png = None
        log("   matplotlib is not installed (pip install -e '.[plot]'); no plot")
    times["plot"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start

    (out / "summary.json").write_text(json.dumps({
        "seed": args.seed, "data_seed": args.data_seed, "quick": args.quick, "sft": before, "grpo": after,
        "seconds": times, "plot": str(png) if png else None}, indent=1) + "\n")
    print()
    print(f"Held-out results ({int(before['num_problems'])} problems, {samples} samples per problem for the sampled "
          f"metrics), seed {args.seed}:")
    print(table(before, after, samples))
    print()
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    if png:
        print(f"plot: {png}")
    print(f"details: {out / 'summary.json'}, {out / 'eval_sft.json'}, {out / 'eval_grpo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
