"""Where the time of one decode step goes: the anatomy behind bench_rollout's figure.

For the rollout workload's decode step (B rows, one new token each, on the absorbed MLA path with a latent cache of
`--context` tokens) it prints:
  - the step's median wall time, and how many aten ops it dispatches (of them matrix products);
  - the same matrix products replayed alone, with the same inputs: the step's floor if every other op were free;
  - the weight bytes one step reads (every parameter but the embedding table; with B*k >> experts, every expert is
    hit at every MoE layer);
  - each part timed on its own at the same shapes: attention per layer (and its projections / attention proper),
    the MoE layer (router, routed experts, shared expert), the dense MLP, norm + output layer, sampling.
Parts timed alone keep their weights in cache, so they add up to less than the step.
Usage: python scripts/profile_decode.py [--preset w1] [--batch 32] [--context 100] [--threads N] [--device cpu]
       [--dtype float32|bfloat16]
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import median_time  # this script's folder is on sys.path

from thinkzero.model.cache import LatentCache
from thinkzero.model.config import ModelConfig
from thinkzero.model.generate import sample_next
from thinkzero.model.mla import absorbed_bias
from thinkzero.model.presets import preset
from thinkzero.model.transformer import DeepseekForCausalLM

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default,
           torch.ops.aten.addmm.default, torch.ops.aten.linear.default, torch.ops.aten._grouped_mm.default}


class Recorder(TorchDispatchMode):
    """Counts every aten op dispatched and keeps a copy of each matrix product's inputs for replay."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.matmuls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func] += 1
        if func in MATMULS:
            copied = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.matmuls.append((func, copied, {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def timer_us(device: torch.device, repeats: int):
    """fn -> median microseconds per call (bench_model's timing), the device synchronised after each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return lambda fn: median_time(lambda: (fn(), sync()), repeats, warmup=max(3, repeats // 10)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="w1")
    ap.add_argument("--batch", type=int, default=32, help="rows decoding together (4 prompts x G=8 in the bench)")
    ap.add_argument("--context", type=int, default=100, help="tokens already in the cache")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16 (default on CUDA)")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    cfg = ModelConfig.from_dict(preset(args.preset))
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    B, S = args.batch, args.context
    time_us = timer_us(device, args.repeats)

    with torch.inference_mode():
        cache = LatentCache.for_model(cfg, B, S + 1, dtype, device)
        model(torch.randint(4, cfg.vocab_size, (B, S), device=device), cache=cache)
        tok = torch.randint(4, cfg.vocab_size, (B, 1), device=device)

        def step():
            cache.length = S  # rewrite the same cache column every time
            return model(tok, cache=cache).logits

        recorder = Recorder()
        with recorder:
            step()
        full = time_us(step)
        matmuls = recorder.matmuls
        floor = time_us(lambda: [f(*a, **k) for f, a, k in matmuls])
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
        print(f"model={args.preset} batch={B} context={S} device={device} threads={args.threads} "
              f"dtype={next(model.parameters()).dtype} torch={torch.__version__}")
        print(f"decode step         {full:8.0f} us   {B / full * 1e6:8.0f} tokens/s   "
              f"{sum(recorder.ops.values())} aten ops, {len(matmuls)} of them matrix products")
        print(f"  matmuls alone     {floor:8.0f} us   {B / floor * 1e6:8.0f} tokens/s   ({floor / full:.0%} of the step)")
        print(f"  weights read      {weight_bytes / 2**20:8.1f} MiB  ({weight_bytes / full / 1e3:.1f} GB/s over the step)")

        # The parts, each alone at the step's shapes (layer 0 is dense, the first MoE layer stands for all).
        dense = model.model.layers[0]
        moe_layer = next((layer for layer in model.model.layers if layer.is_moe), None)
        h = torch.randn(B, 1, cfg.hidden_size, device=device, dtype=dtype)
        cos, sin = (t.unsqueeze(2) for t in model.rotary(torch.full((B, 1), S, device=device)))
        bias = absorbed_bias(torch.ones(B, 1, S + 1, dtype=torch.bool, device=device), cfg.num_attention_heads,
                             h.dtype)
        attn = dense.self_attn
        x = dense.input_layernorm(h)
        q_nope, q_pe, kv, k_pe = attn._project(x, cos, sin)
        latent = torch.cat((cache.buffer[0, :, :S], torch.cat((kv, k_pe), -1)), dim=1)
        parts = {
            "attention, per layer": lambda: (setattr(cache, "length", S), attn(x, cos, sin, bias, cache, 0, True)),
            "  projections + rope": lambda: attn._project(x, cos, sin),
            "  attend on latent": lambda: attn._absorbed(q_nope, q_pe, latent, bias),
            "RMSNorm": lambda: dense.input_layernorm(h),
            "dense MLP": lambda: dense.mlp(x),
        }
        if moe_layer is not None:
            moe = moe_layer.mlp
            idx, w, _ = moe.gate(x)
            flat = x.reshape(B, -1)
            parts["MoE, per layer"] = lambda: moe(x)
            parts["  router"] = lambda: moe.gate(x)
            parts["  routed experts"] = lambda: moe.dispatch(flat, idx.reshape(B, -1), w.reshape(B, -1))
            if moe.shared_experts is not None:
                parts["  shared expert"] = lambda: moe.shared_experts(x)
        parts["norm + output layer"] = lambda: model.lm_head(model.model.norm(h))
        logits = torch.randn(B, cfg.vocab_size, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        parts["sampling"] = lambda: sample_next(logits, 1.0, generator=gen)
        n_moe = len(model.moe_layers)
        print(f"parts alone ({cfg.num_hidden_layers} layers, {n_moe} MoE):")
        for name, fn in parts.items():
            print(f"  {name:22s} {time_us(fn):8.0f} us")
        print("most dispatched ops: " + ", ".join(f"{f.__name__} {n}" for f, n in recorder.ops.most_common(8)))


if __name__ == "__main__":
    main()
