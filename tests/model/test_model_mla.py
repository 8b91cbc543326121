"""MLA and the latent cache: absorbed == plain, cached decoding == full forward, left padding, cache size."""

import pytest
import torch

from thinkzero.model.cache import LatentCache
from thinkzero.model.mla import absorbed_bias

# Variants of conftest's small V3 model.
VARIANTS = {
    "v3": {},
    "v2_no_qlora": dict(
        model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax", topk_method="greedy"
    ),
    "yarn": dict(
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 8,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        }
    ),
}


@pytest.fixture
def make_model(small_model):
    """make_model(variant="v3", seed=0, **fields); weights large enough that attention is far from uniform."""
    return lambda variant="v3", seed=0, **fields: small_model(seed, 0.15, 0.3, **{**VARIANTS[variant], **fields})


def ids(B, T, seed=0, vocab=70):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_absorbed_equals_plain(make_model, variant):
    model = make_model(variant)
    x = ids(2, 20)
    with torch.no_grad():
        plain = model(x, absorb=False).logits
        absorbed = model(x, absorb=True).logits
    assert plain.abs().std() > 0.5
    assert max_diff(absorbed, plain) < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_by_token_cached_decode_equals_full_forward(make_model, variant):
    model = make_model(variant)
    x = ids(3, 18)
    with torch.no_grad():
        full = model(x).logits
        cache = LatentCache.for_model(model.config, 3, 32)
        steps = [model(x[:, t : t + 1], cache=cache).logits for t in range(18)]
    assert cache.length == 18
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5


def test_prefill_then_chunks_both_paths(make_model):
    """Plain prefill into the cache, then a multi-token chunk on each path, then single steps."""
    model = make_model("yarn")
    x = ids(2, 16)
    with torch.no_grad():
        full = model(x).logits
        for absorb in (False, True):
            cache = LatentCache.for_model(model.config, 2, 16)
            parts = [
                model(x[:, :7], cache=cache, absorb=False).logits,
                model(x[:, 7:12], cache=cache, absorb=absorb).logits,
            ]
            parts += [model(x[:, t : t + 1], cache=cache, absorb=not absorb).logits for t in range(12, 16)]
            assert max_diff(torch.cat(parts, dim=1), full) < 1e-5


def test_left_padded_batch_equals_each_sequence_alone(make_model):
    model = make_model("yarn")
    lengths = [9, 5, 12]
    seqs = [ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    batch = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, T - len(s) :] = s
        mask[i, T - len(s) :] = 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        assert torch.isfinite(padded).all()  # padding rows stay finite (they see themselves)
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            assert max_diff(padded[i, T - len(s) :], alone) < 1e-5


def test_left_padded_decode_with_cache_equals_each_sequence_alone(make_model):
    """Prefill left-padded prompts, then decode with a growing mask: each row matches its own full forward."""
    model = make_model("v3")
    prompts = [ids(1, n, seed=10 + i)[0] for i, n in enumerate([4, 7])]
    new = ids(2, 5, seed=99)  # tokens fed after the prompts
    Tp = 7
    batch = torch.zeros(2, Tp, dtype=torch.long)
    mask = torch.zeros(2, Tp + 5, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, Tp - len(p) :] = p
        mask[i, Tp - len(p) :] = 1
    with torch.no_grad():
        cache = LatentCache.for_model(model.config, 2, Tp + 5)
        out = [model(batch, attention_mask=mask[:, :Tp], cache=cache).logits[:, -1:]]
        for t in range(5):
            out.append(model(new[:, t : t + 1], attention_mask=mask[:, : Tp + t + 1], cache=cache).logits)
        got = torch.cat(out, dim=1)  # (2, 6, V): last prompt position + 5 decoded positions
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, new[i]])[None]).logits[0, len(p) - 1 :]
            assert max_diff(got[i], alone) < 1e-5


def test_cache_holds_only_latent_and_rope_key(make_model):
    model = make_model("v3")
    cfg = model.config
    L, B, cap = cfg.num_hidden_layers, 2, 24
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cache = LatentCache.for_model(cfg, B, cap, dtype=torch.float32)
    assert len(cache.kv) == len(cache.k_pe) == L
    for kv, k_pe in zip(cache.kv, cache.k_pe):
        assert kv.shape == (B, cap, C) and k_pe.shape == (B, cap, R)
    # Exactly (kv_lora_rank + qk_rope_head_dim) values per token per layer, nothing per head.
    assert cache.nbytes() == L * B * cap * (C + R) * 4
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in (*cache.kv, *cache.k_pe))
    x = ids(B, 6)
    with torch.no_grad():
        model(x, cache=cache)
        # What is stored is the normalised latent (kv_a_layernorm output) of the first layer's input.
        layer = model.model.layers[0]
        h = layer.input_layernorm(model.model.embed_tokens(x))
        latent = layer.self_attn.kv_a_proj_with_mqa(h)[..., :C]
        assert max_diff(cache.kv[0][:, :6], layer.self_attn.kv_a_layernorm(latent)) < 1e-6
        assert cache.kv[0][:, 6:].abs().sum() == 0
    bf16 = LatentCache.for_model(cfg, B, cap, dtype=torch.bfloat16)
    assert bf16.nbytes() == L * B * cap * (C + R) * 2


def test_cache_repeat_interleave_and_index_select(make_model):
    model = make_model("v2_no_qlora")
    prompts = ids(2, 5)
    with torch.no_grad():
        cache = LatentCache.for_model(model.config, 2, 8)
        model(prompts, cache=cache)
        big = cache.repeat_interleave(3)  # rows 0,0,0,1,1,1
        assert big.batch_size == 6 and big.length == 5
        nxt = ids(6, 1, seed=5)
        step = model(nxt, cache=big).logits[:, 0]
        for r in range(6):
            alone = model(torch.cat([prompts[r // 3], nxt[r]])[None]).logits[0, -1]
            assert max_diff(step[r], alone) < 1e-5
        keep = torch.tensor([4, 1])
        small = big.index_select(keep)
        assert small.batch_size == 2 and small.length == 6
        nxt2 = ids(2, 1, seed=6)
        step2 = model(nxt2, cache=small).logits[:, 0]
        for j, r in enumerate(keep.tolist()):
            alone = model(torch.cat([prompts[r // 3], nxt[r], nxt2[j]])[None]).logits[0, -1]
            assert max_diff(step2[j], alone) < 1e-5


def test_cache_overflow_is_an_error(make_model):
    model = make_model("v3")
    cache = LatentCache.for_model(model.config, 1, 4)
    with torch.no_grad():
        model(ids(1, 3), cache=cache)
        with pytest.raises(ValueError, match="capacity 4"):
            model(ids(1, 2), cache=cache)


def test_mask_must_cover_cached_and_new_tokens(make_model):
    model = make_model("v3")
    cache = LatentCache.for_model(model.config, 1, 8)
    with torch.no_grad():
        model(ids(1, 3), cache=cache)
        with pytest.raises(ValueError, match=r"cached \+ new tokens: expected \(1, 4\)"):
            model(ids(1, 1), attention_mask=torch.ones(1, 1, dtype=torch.long), cache=cache)


def test_bf16_autocast_runs_both_paths(make_model):
    """Under bf16 autocast both attention paths stay close to fp32 (with the fp32 routing replayed)."""
    model = make_model("v3")
    x = ids(2, 10)
    with torch.no_grad():
        ref = model(x, return_routing=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(x, routing=ref.routing).logits.float()
            cache = LatentCache.for_model(model.config, 2, 10, dtype=torch.bfloat16)
            model(x[:, :6], cache=cache, routing=[r[:, :6] for r in ref.routing])
            steps = [
                model(x[:, t : t + 1], cache=cache, routing=[r[:, t : t + 1] for r in ref.routing]).logits
                for t in range(6, 10)
            ]
    scale = ref.logits.abs().max().item()
    assert max_diff(plain, ref.logits) < 0.05 * scale
    assert max_diff(torch.cat(steps, dim=1).float(), ref.logits[:, 6:]) < 0.05 * scale


def test_absorbed_bias_by_hand():
    low = torch.finfo(torch.float32).min
    # One new token (decoding): one row per sequence, broadcast over the heads.
    allowed = torch.tensor([[[True, False, True]], [[False, True, True]]])  # (B=2, T=1, S=3)
    bias = absorbed_bias(allowed, num_heads=4, dtype=torch.float32)
    assert bias.shape == (2, 1, 3)
    assert bias.tolist() == [[[0.0, low, 0.0]], [[low, 0.0, 0.0]]]
    # Two new tokens, 2 heads: rows follow the scores' (t, h) order: t0h0, t0h1, t1h0, t1h1.
    allowed = torch.tensor([[[True, True, False], [True, True, True]]])  # (B=1, T=2, S=3), causal
    bias = absorbed_bias(allowed, num_heads=2, dtype=torch.bfloat16)
    low = torch.finfo(torch.bfloat16).min
    assert bias.dtype == torch.bfloat16 and bias.shape == (1, 4, 3)
    assert bias.tolist() == [[[0.0, 0.0, low], [0.0, 0.0, low], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
