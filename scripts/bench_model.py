"""Benchmark our DeepSeek policy against transformers' on the same weights (preset w1 by default).

(a) KV-cache bytes per token after generating N tokens: our LatentCache vs transformers' DynamicCache.
(b) decode-step latency: absorbed MLA path vs plain path, both with our latent cache.
(c) one MoE layer, forward + backward: our sort-and-slice dispatch vs transformers' DeepseekV3MoE block.

Prints one line per measurement and ratios; the last line is `speedup=X.XX` for (c) (transformers' time / ours).
Needs the `bench` extra (transformers). Usage: python scripts/bench_model.py [--preset w1] [--tokens 2048]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.moe import MoE  # noqa: E402
from model.presets import preset  # noqa: E402


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_config(cfg: dict):
    from transformers import DeepseekV2Config, DeepseekV3Config

    cls = DeepseekV3Config if cfg["model_type"] == "deepseek_v3" else DeepseekV2Config
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "rope_theta", "rope_scaling", "moe_layer_freq",
                                                        "scoring_func", "topk_method")}
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    if cls is DeepseekV2Config:
        fields["topk_method"] = cfg["topk_method"]
    return cls(**fields)


def hf_moe_block(cfg: dict, ours: MoE):
    """transformers' MoE block of the first MoE layer, as its model builds it, loaded with our weights."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    cls = DeepseekV3ForCausalLM if cfg["model_type"] == "deepseek_v3" else DeepseekV2ForCausalLM
    hf = cls(hf_config(cfg))
    block = hf.model.layers[cfg["first_k_dense_replace"]].mlp
    with torch.no_grad():
        block.gate.weight.copy_(ours.gate.weight)
        if ours.gate.e_score_correction_bias is not None:
            block.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        block.experts.gate_up_proj.copy_(
            torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in ours.experts])
        )
        block.experts.down_proj.copy_(torch.stack([e.down_proj.weight for e in ours.experts]))
        block.shared_experts.load_state_dict(ours.shared_experts.state_dict())
    return block, hf.config._experts_implementation


def bench_moe(cfg: dict, batch: int, seq: int, repeats: int) -> float:
    torch.manual_seed(0)
    ours = MoE(SimpleNamespace(**cfg))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
        ours.gate.e_score_correction_bias.normal_(0, 0.01)
    theirs, impl = hf_moe_block(cfg, ours)
    x = torch.randn(batch, seq, cfg["hidden_size"])
    grad = torch.randn_like(x)

    y_ours = ours(x)[0]
    y_theirs = theirs(x)
    max_diff = (y_ours - y_theirs).abs().max().item()

    def step(module, returns_stats):
        def run():
            xi = x.detach().requires_grad_(True)
            y = module(xi)
            y = y[0] if returns_stats else y
            y.backward(grad)
            module.zero_grad(set_to_none=True)
        return run

    t_ours = median_time(step(ours, True), repeats)
    t_theirs = median_time(step(theirs, False), repeats)
    print(f"(c) MoE layer fwd+bwd, {batch}x{seq} tokens, {cfg['n_routed_experts']} experts top-"
          f"{cfg['num_experts_per_tok']}, {torch.get_num_threads()} threads: ours {t_ours * 1e3:.1f} ms, "
          f"transformers ({impl}) {t_theirs * 1e3:.1f} ms, max |output diff| {max_diff:.2e}")
    return t_theirs / t_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="w1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cfg = preset(args.preset)
    speedup = bench_moe(cfg, args.batch, args.seq, args.repeats)
    print(f"speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
