"""Evaluate a checkpoint on a dataset with gold answers: greedy pass@1, sampled pass@1, maj@k, pass@k, format rate,
mean completion length. Prints a table and writes JSON (summary + every completion the numbers came from).

    python scripts/evaluate.py MODEL_DIR --data FILE_OR_HUB_NAME [--split test] [--prompt-column question] ...
    python scripts/evaluate.py MODEL_DIR --recipe recipes/demo/grpo.yaml [--max-examples 100] [--num-samples 8]

MODEL_DIR is any model directory (an SFT output, a GRPO checkpoint-*, a DeepSeek model on disk). With --recipe the
data options (source, template, columns; the eval split when the recipe has one) and the rollout's max_new_tokens,
temperature and stop strings come from the recipe; flags given here override them.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import thinkzero.model as tzmodel
from thinkzero.model.checkpoint import DTYPES
from thinkzero.rl.cli import SETUP_ERRORS, USER_ERRORS, fail
from thinkzero.rl.config import ConfigError, load_config
from thinkzero.rl.data import load_rows, prepare_examples
from thinkzero.rl.evaluation import evaluate_policy


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="model directory (config.json + safetensors + tokenizer)")
    p.add_argument("--recipe", help="GRPO recipe to take data and rollout settings from")
    p.add_argument("--data", help="dataset: hub name, local .jsonl/.json/.parquet/.csv, or save_to_disk directory")
    p.add_argument("--config-name", help="hub dataset config (e.g. main for openai/gsm8k)")
    p.add_argument("--split", help="split (hub / save_to_disk datasets; default: the recipe's eval split, else test)")
    p.add_argument("--prompt-column")
    p.add_argument("--answer-column")
    p.add_argument("--template", help="r1_zero | chat | a string containing {prompt}")
    p.add_argument("--system-prompt")
    p.add_argument("--max-prompt-length", type=int)
    p.add_argument("--max-examples", type=int, help="evaluate the first N problems")
    p.add_argument("--num-samples", type=int, default=8, help="sampled completions per problem (k); 0 = greedy only")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable; default </answer>)")
    p.add_argument("--batch-size", type=int, default=64, help="problems per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="JSON output path (default: <model>/eval.json, or ./eval-<model name>.json when the "
                                 "model directory is not writable)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def resolve(args) -> dict:
    """Settings from the recipe (if any) with the command-line flags on top."""
    s = {"source": None, "config_name": None, "split": "test", "prompt_column": "prompt", "answer_column": "answer",
         "template": "r1_zero", "system_prompt": None, "max_prompt_length": 512, "max_new_tokens": 256,
         "temperature": 1.0, "top_p": 1.0, "stop": ["</answer>"]}
    if args.recipe:
        cfg = load_config(args.recipe, check_paths=False)
        d, r = cfg.data, cfg.rollout
        s.update(source=d.eval_source or d.source, config_name=d.config_name, split=d.eval_split or d.split,
                 prompt_column=d.prompt_column, answer_column=d.answer_column, template=d.template,
                 system_prompt=d.system_prompt, max_prompt_length=d.max_prompt_length,
                 max_new_tokens=r.max_new_tokens, temperature=r.temperature or 1.0, top_p=r.top_p,
                 stop=list(r.stop_strings))
    flags = {"source": args.data, "config_name": args.config_name, "split": args.split,
             "prompt_column": args.prompt_column, "answer_column": args.answer_column, "template": args.template,
             "system_prompt": args.system_prompt, "max_prompt_length": args.max_prompt_length,
             "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
             "stop": args.stop}
    s.update({k: v for k, v in flags.items() if v is not None})
    if not s["source"]:
        raise ConfigError("no dataset: give --data (or --recipe)")
    if not s["answer_column"]:
        raise ConfigError("evaluation needs gold answers: set --answer-column")
    return s


def output_path(out: str | None, model_dir: str) -> Path:
    """Where the JSON goes: --out, else next to the model when that directory is writable, else the current
    directory (said on stderr). Checked by writing, so a read-only mount or directory fails here, not after hours."""
    if out:
        path = Path(out)
        if not _writable(path.parent):
            raise ConfigError(f"--out {out}: cannot write into {path.parent}; give a writable path")
        return path
    beside = Path(model_dir) / "eval.json"
    if _writable(beside.parent):
        return beside
    fallback = Path.cwd() / f"eval-{Path(model_dir).resolve().name}.json"
    if not _writable(fallback.parent):
        raise ConfigError(f"neither the model directory {model_dir} nor the current directory is writable; "
                          "give --out PATH")
    print(f"note: {model_dir} is not writable; results will go to {fallback}", file=sys.stderr)
    return fallback


def _writable(directory: Path) -> bool:
    """True when a file can be created in `directory` (or in the nearest existing parent, which mkdir will extend)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def format_table(summary: dict, title: str = "") -> str:
    rows = [(k, f"{v:.3f}" if not k.endswith("length") and k != "num_problems" else f"{v:.1f}")
            for k, v in summary.items()]
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v:>8}" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        s = resolve(args)
        out = output_path(args.out, args.model)  # before evaluating: a run must not end unable to save its results
        tokenizer = tzmodel.load_tokenizer(args.model)
        policy = tzmodel.load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
        rows = load_rows(s["source"], s["config_name"], s["split"])
        examples, dropped = prepare_examples(
            rows, tokenizer, prompt_column=s["prompt_column"], answer_column=s["answer_column"],
            template=s["template"], system_prompt=s["system_prompt"], max_prompt_length=s["max_prompt_length"])
    except (*USER_ERRORS, *SETUP_ERRORS) as e:
        return fail(e)
    examples = examples[:args.max_examples]
    t0 = time.perf_counter()

    def progress(done, total):
        if not args.quiet:
            print(f"\r  {done}/{total} problems", end="", file=sys.stderr, flush=True)

    summary, records = evaluate_policy(
        policy, tokenizer, examples, num_samples=args.num_samples, temperature=s["temperature"], top_p=s["top_p"],
        max_new_tokens=s["max_new_tokens"], stop_strings=s["stop"], batch_size=args.batch_size, seed=args.seed,
        progress=progress)
    if not args.quiet:
        print(file=sys.stderr)
    elapsed = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(args.model), "settings": {**s, "num_samples": args.num_samples,
                                                                       "seed": args.seed, "dropped": dropped},
                               "summary": summary, "seconds": elapsed, "records": records}, indent=1) + "\n")
    print(format_table(summary, f"{args.model} on {s['source']} ({len(examples)} problems, {elapsed:.0f}s)"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
