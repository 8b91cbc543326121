"""Rollout throughput: our sampling engine vs transformers' `generate` (default) or vLLM (`--engine vllm`, through
rl.vllm_engine as the trainer samples), same weights (preset w1 by default; w1_mla576 with vLLM, whose CPU MLA
kernel takes only the 576-wide latent).

Workload 1: 4 prompts x G=8 completions, 128 new tokens forced (no EOS), temperature 1.0, no top-k/top-p.
Workload 2: 4 prompts x G=16, 512 new tokens, same settings.
Each (engine, workload) runs in its own subprocess, so peak memory and thread pools do not leak between them:
one untimed warm-up call, then `--runs` timed calls; tokens/s is the median. Peak memory is the rise of the
process's peak RSS over its RSS before the first timed call (CPU), or torch's peak allocated bytes (CUDA).

Prints one line per measurement; the last line is `speedup=X.XX` (ours over the other engine, workload 1 tokens/s).
Needs the `bench` extra (transformers), or vllm for `--engine vllm` (vLLM's CPU build pins its own OpenMP threads,
one per core but one, whatever --threads says: on a 2-core machine it decodes on one pinned core, and a busy machine
can stall it badly; run it twice).
Usage: python scripts/bench_rollout.py [--engine transformers|vllm] [--preset w1 | --model DIR] [--device cpu|cuda]
       [--threads N] [--runs 5]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOADS = {1: dict(num_generations=8, max_new_tokens=128), 2: dict(num_generations=16, max_new_tokens=512)}
PROMPT_LENGTHS = (24, 32, 40, 48)  # four prompts of different lengths, so left padding is exercised


def make_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Ids from 4 up: 0-3 are the presets' special tokens (pad, bos, eos, unk).
    return [torch.randint(4, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


# ------------------------------------------------------------------------------------------------------------------
# Memory: peak RSS on CPU (reset through /proc/self/clear_refs), torch's allocator statistics on CUDA.


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_reset(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    return _proc_status_kb("VmRSS") * 1024


def memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_kb("VmHWM") * 1024


# ------------------------------------------------------------------------------------------------------------------
# The two engines: each returns a callable (max_new_tokens) -> number of generated tokens.


def ours_runner(model_dir, prompts, num_generations, device, dtype, seed):
    from thinkzero.model.checkpoint import load_model
    from thinkzero.model.generate import SamplingParams, generate

    model = load_model(model_dir, dtype=dtype, device=device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)

    def run(max_new_tokens: int) -> int:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, eos_token_ids=(), pad_token_id=0)
        out = generate(model, prompts, num_generations, params, generator=gen)
        n = int(out.completion_mask.sum())
        assert n == len(prompts) * num_generations * max_new_tokens, n
        return n

    return run


def transformers_runner(model_dir, prompts, num_generations, device, dtype, seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    Tp = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (Tp - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (Tp - len(p)) + [1] * len(p) for p in prompts], device=device)
    torch.manual_seed(seed)

    def run(max_new_tokens: int) -> int:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, num_return_sequences=num_generations,
            pad_token_id=0, eos_token_id=None,
        )
        n = (out.shape[1] - Tp) * out.shape[0]
        assert n == len(prompts) * num_generations * max_new_tokens, n
        return n

    return run


def vllm_runner(model_dir, prompts, num_generations, device, dtype, seed):
    from thinkzero.model.checkpoint import load_model
    from thinkzero.model.generate import SamplingParams
    from thinkzero.rl.config import Config
    from thinkzero.rl.vllm_engine import VLLMEngine

    cfg = Config()
    cfg.data.max_prompt_length = max(PROMPT_LENGTHS)  # vLLM's max_model_len: the longest prompt + completion
    cfg.rollout.max_new_tokens = max(w["max_new_tokens"] for w in WORKLOADS.values())
    engine = VLLMEngine.from_config(cfg, load_model(model_dir, dtype=dtype, device=device), None, device)
    seeds = [seed + p for p in range(len(prompts))]

    def run(max_new_tokens: int) -> int:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, eos_token_ids=(), pad_token_id=0)
        n = int(engine.sample(prompts, num_generations, params, seeds).completion_mask.sum())
        assert n == len(prompts) * num_generations * max_new_tokens, n
        return n

    return run


RUNNERS = {"ours": ours_runner, "transformers": transformers_runner, "vllm": vllm_runner}


def child(args) -> None:
    """Runs one (engine, workload) and prints one JSON line."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    w = WORKLOADS[args.workload]
    with open(Path(args.model) / "config.json") as f:
        vocab_size = json.load(f)["vocab_size"]
    run = RUNNERS[args.child](args.model, make_prompts(vocab_size), w["num_generations"], device, dtype, seed=0)
    with torch.inference_mode():
        run(8)  # warm-up: first-call allocations, lazy init, kernel selection
    base = memory_reset(device)
    rates = []
    for _ in range(args.runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = run(w["max_new_tokens"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    peak = memory_peak(device) - base
    print(json.dumps(dict(engine=args.child, workload=args.workload, tokens_per_s=statistics.median(rates),
                          all_tokens_per_s=rates, peak_mem_bytes=peak)))


def make_model_dir(preset_name: str, out_dir: str, seed: int = 0) -> None:
    from thinkzero.model.checkpoint import save_model
    from thinkzero.model.config import ModelConfig
    from thinkzero.model.presets import preset
    from thinkzero.model.transformer import DeepseekForCausalLM

    torch.manual_seed(seed)
    save_model(DeepseekForCausalLM(ModelConfig.from_dict(preset(preset_name))), out_dir)


def measure(args, engine: str, workload: int, runs: int) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--workload", str(workload), "--model", args.model,
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--runs", str(runs)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{engine} workload {workload} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                    help="the engine ours is compared with")
    ap.add_argument("--preset", default=None,
                    help="model preset to build with random weights (ignored with --model); default w1, "
                         "w1_mla576 with --engine vllm")
    ap.add_argument("--model", default=None, help="a model directory (config.json + safetensors) instead of a preset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default on CUDA)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, same for both")
    ap.add_argument("--runs", type=int, default=5, help="timed runs of workload 1 (median reported)")
    ap.add_argument("--runs2", type=int, default=1, help="timed runs of workload 2; 0 skips it")
    ap.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--workload", type=int, choices=sorted(WORKLOADS), default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.child:
        return child(args)
    if args.preset is None:
        args.preset = "w1_mla576" if args.engine == "vllm" else "w1"

    other = args.engine
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = tmp
            make_model_dir(args.preset, tmp)
        print(f"model={args.preset if args.model == tmp else args.model} device={args.device} dtype={args.dtype} "
              f"threads={args.threads} torch={torch.__version__}")
        plan = [(1, args.runs)] + ([(2, args.runs2)] if args.runs2 > 0 else [])
        speedup = None
        for workload, runs in plan:
            w = WORKLOADS[workload]
            res = {e: measure(args, e, workload, runs) for e in (other, "ours")}
            ratio = res["ours"]["tokens_per_s"] / res[other]["tokens_per_s"]
            desc = f"workload {workload}: {len(PROMPT_LENGTHS)} prompts x G={w['num_generations']}, " \
                   f"{w['max_new_tokens']} new tokens, median of {runs}"
            print(desc)
            for e in (other, "ours"):
                r = res[e]
                runs_s = " ".join(f"{x:.0f}" for x in r["all_tokens_per_s"])
                print(f"  {e:<12} {r['tokens_per_s']:9.1f} tokens/s  (runs: {runs_s})  "
                      f"peak memory +{r['peak_mem_bytes'] / 2**20:.1f} MiB")
            print(f"  ours / {other} = {ratio:.2f}x")
            if workload == 1:
                speedup = ratio
        print(f"speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
