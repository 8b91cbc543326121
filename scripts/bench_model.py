"""Benchmark our DeepSeek policy against transformers' on the same weights (preset w1 by default).

(a) KV-cache bytes per token after generating N tokens: our LatentCache vs transformers' DynamicCache.
(b) decode-step latency: absorbed MLA path vs plain path, both with our latent cache.
(c) one MoE layer, forward + backward: our sort-and-slice dispatch vs transformers' DeepseekV3MoE block.

Prints one line per measurement and ratios; the last line is `speedup=X.XX` for (c) (transformers' time / ours).
Needs the `bench` extra (transformers). Usage: python scripts/bench_model.py [--preset w1] [--batch 8 --seq 256]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkzero.model.cache import LatentCache
from thinkzero.model.checkpoint import save_model
from thinkzero.model.config import ModelConfig
from thinkzero.model.moe import MoE
from thinkzero.model.presets import preset
from thinkzero.model.transformer import DeepseekForCausalLM


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    return median_times([fn], repeats, warmup)[0]


def median_times(fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds per call of each fn. Calls are interleaved, so load from other processes hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


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
        # Same names and layouts (router, bias, stacked experts, shared experts): one strict load.
        block.load_state_dict(ours.state_dict(), strict=True)
    return block, hf.config._experts_implementation


def same_weight_models(cfg: dict):
    """Our model with random weights, and transformers' model loaded from the directory save_model wrote."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = DeepseekForCausalLM(ModelConfig.from_dict(cfg)).eval()
    with torch.no_grad():
        for moe in ours.moe_layers:
            moe.gate.e_score_correction_bias.normal_(0, 0.01)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    return ours, theirs


@torch.no_grad()
def bench_cache_bytes(ours, theirs, prompt_len: int, new_tokens: int) -> None:
    cfg = ours.config
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len))
    cache = LatentCache.for_model(cfg, 1, prompt_len + new_tokens)
    tokens, ids = [], prompt
    for _ in range(new_tokens):  # greedy
        ids = ours(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(ids)
    ours_tokens = torch.cat(tokens, dim=1)
    ours_per_token = cache.nbytes() / cache.capacity  # preallocated for prompt + new tokens; same per position

    out = theirs.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=cfg.pad_token_id)
    kv = out.cache
    their_bytes = sum(t.numel() * t.element_size() for layer in kv.layers for t in (layer.keys, layer.values))
    theirs_per_token = their_bytes / kv.get_seq_length()
    same = (out.sequences[0, prompt_len:] == ours_tokens[0]).float().mean().item()
    print(f"(a) KV cache after {prompt_len} prompt + {new_tokens} generated tokens: ours (LatentCache) "
          f"{ours_per_token:.0f} B/token, transformers ({type(kv).__name__}) {theirs_per_token:.0f} B/token, "
          f"ratio {theirs_per_token / ours_per_token:.2f}x smaller; greedy tokens identical: {same:.0%}")
    # For scale: a cache of per-head keys and values (what MLA would need without the latent trick).
    expanded = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    print(f"    per-head K/V cache would be {expanded} B/token ({expanded / ours_per_token:.1f}x ours)")


@torch.no_grad()
def bench_decode_step(ours, theirs, batch: int, context: int, repeats: int) -> None:
    from transformers import DynamicCache

    cfg = ours.config
    prompt = torch.randint(3, cfg.vocab_size, (batch, context))
    cache = LatentCache.for_model(cfg, batch, context + 1)
    ours(prompt, cache=cache)  # prefill
    step = torch.randint(3, cfg.vocab_size, (batch, 1))
    logits = {}

    def run(absorb):
        logits[absorb] = ours(step, cache=cache, absorb=absorb).logits
        cache.length -= 1  # rewind: every repeat decodes the same position

    hf_cache = DynamicCache(config=theirs.config)
    theirs(prompt, cache=hf_cache, use_cache=True)

    def run_theirs():
        theirs(step, cache=hf_cache, use_cache=True)
        hf_cache.crop(-1)

    t_absorbed, t_plain, t_theirs = median_times([lambda: run(True), lambda: run(False), run_theirs], repeats)
    diff = (logits[True] - logits[False]).abs().max().item()
    print(f"(b) decode step, batch {batch}, {context} cached tokens: absorbed {t_absorbed * 1e3:.2f} ms, "
          f"plain {t_plain * 1e3:.2f} ms, plain/absorbed {t_plain / t_absorbed:.2f}x, "
          f"max |logit diff| {diff:.1e} (transformers {t_theirs * 1e3:.2f} ms)")


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

    t_ours, t_theirs = median_times([step(ours, True), step(theirs, False)], repeats)
    print(f"(c) MoE layer fwd+bwd, {batch}x{seq} tokens, {cfg['n_routed_experts']} experts top-"
          f"{cfg['num_experts_per_tok']}, {torch.get_num_threads()} threads: ours {t_ours * 1e3:.1f} ms, "
          f"transformers ({impl}) {t_theirs * 1e3:.1f} ms, max |output diff| {max_diff:.2e}")
    return t_theirs / t_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="w1")
    parser.add_argument("--parts", default="abc", help="which measurements to run; (c) always runs last")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    if "a" in args.parts or "b" in args.parts:
        ours, theirs = same_weight_models(cfg)
        if "a" in args.parts:
            bench_cache_bytes(ours, theirs, args.prompt_len, args.new_tokens)
        if "b" in args.parts:
            bench_decode_step(ours, theirs, args.decode_batch, args.context, args.repeats * 3)
    speedup = bench_moe(cfg, args.batch, args.seq, args.repeats)
    print(f"speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
