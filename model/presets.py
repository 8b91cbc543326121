"""Named model shapes for random-init models (tests, demos, benchmarks). Values use Hugging Face config.json names.

`w1` is the benchmark model used across the project (about 9M parameters); `tiny` is for fast tests; `demo` is the
CPU demo's policy (about 0.8M parameters: small enough to train in minutes on two cores, big enough to learn it).
`tiny_mla576` and `w1_mla576` are `tiny` and `w1` with DeepSeek's real latent dims (kv_lora_rank 512 +
qk_rope_head_dim 64 = 576), the only MLA head size vLLM's CPU kernel takes: the vLLM engine's tests and benchmarks.
All use a character vocabulary whose special tokens come first: <pad>=0, <bos>=1, <eos>=2, <unk>=3.
"""

import copy

# What every preset shares: the DeepSeek-V3 layout (sigmoid router with a correction bias, first layer dense, one
# shared expert), YaRN off, and the character tokenizer's special-token ids.
_COMMON = dict(
    model_type="deepseek_v3",
    n_shared_experts=1,
    topk_method="noaux_tc",
    scoring_func="sigmoid",
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    hidden_act="silu",
    attention_bias=False,
    rope_theta=10000.0,
    rope_scaling=None,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        max_position_embeddings=1024,
        **_COMMON,
    ),
    "demo": dict(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        max_position_embeddings=512,
        **_COMMON,
    ),
    "w1": dict(
        vocab_size=300,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        max_position_embeddings=4096,
        **_COMMON,
    ),
}
# vLLM's CPU MLA decode kernel takes only a 576-wide latent (kv_lora_rank 512 + qk_rope_head_dim 64).
_MLA576 = dict(kv_lora_rank=512, qk_rope_head_dim=64)
PRESETS["tiny_mla576"] = {**PRESETS["tiny"], **_MLA576}
PRESETS["w1_mla576"] = {**PRESETS["w1"], **_MLA576}


def preset(name: str) -> dict:
    """A fresh copy of a preset's config dict (safe to modify)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def write_random_model(name: str, out_dir, seed: int = 0, model_type: str | None = None):
    """Writes a random-init model directory (config.json, safetensors, character tokenizer) of a preset and returns
    the model. Loads with load_model / load_tokenizer and with transformers' from_pretrained."""
    import torch

    from .checkpoint import save_model
    from .config import ModelConfig
    from .tokenizer import build_char_tokenizer
    from .transformer import DeepseekForCausalLM

    fields = preset(name)
    if model_type is not None and model_type != fields["model_type"]:
        fields["model_type"] = model_type
        if model_type == "deepseek_v2":
            fields.update(V2_ROUTER)
    cfg = ModelConfig.from_dict(fields)
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg)
    tokenizer = build_char_tokenizer(vocab_size=cfg.vocab_size)
    # Tokenizer first: save_model writes config.json last, so a directory with a config.json is complete even if
    # the process was killed while writing it (the trainer's init_preset rewrites a directory without one).
    tokenizer.save(out_dir)
    save_model(model, out_dir)
    return model


# What changes when a preset is written as DeepSeek-V2 instead: softmax router, no bias, V2's group rule.
V2_ROUTER = dict(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False)
