"""Parity with transformers' DeepseekV2/V3ForCausalLM (the reference implementation) on random tiny configs.

The transformers model gets random, deliberately non-trivial weights (non-unit norms, non-zero router bias),
its state dict is copied into ours, and the logits must agree in float32 to 1e-4.
"""

import pytest
import torch
from randomize import randomize_

from thinkzero.model.config import ModelConfig
from thinkzero.model.transformer import DeepseekForCausalLM

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}

CONFIGS = {
    "v3_sigmoid_grouped_qlora": dict(
        model_type="deepseek_v3",
        q_lora_rank=20,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
    "v2_softmax_no_qlora": dict(
        model_type="deepseek_v2",
        q_lora_rank=None,
        scoring_func="softmax",
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_shared_experts=2,
    ),
    "v3_yarn": dict(
        model_type="deepseek_v3",
        q_lora_rank=20,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
        rope_scaling=YARN,
    ),
    "v2_yarn_group_limited": dict(
        model_type="deepseek_v2",
        q_lora_rank=20,
        scoring_func="softmax",
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        norm_topk_prob=False,
        routed_scaling_factor=2.0,
        rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    "v3_not_interleaved_tied": dict(
        model_type="deepseek_v3",
        q_lora_rank=None,
        n_group=1,
        topk_group=1,
        rope_interleave=False,
        tie_word_embeddings=True,
    ),
}


def make_configs(name: str) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **CONFIGS[name]})


def hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers' model from our config.json dict, with random non-trivial weights."""
    d = cfg.to_dict()
    if cfg.model_type == "deepseek_v3":
        hf_cfg, cls = transformers.DeepseekV3Config.from_dict(d), transformers.DeepseekV3ForCausalLM
    else:
        hf_cfg, cls = transformers.DeepseekV2Config.from_dict(d), transformers.DeepseekV2ForCausalLM
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(cls(hf_cfg).eval(), 0.15, 0.3, bias_scale=0.2)


def ours_from_hf(cfg: ModelConfig, hf) -> DeepseekForCausalLM:
    ours = DeepseekForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # both stack experts the same way in memory
    return ours


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    cfg = make_configs(name)
    hf = hf_model(cfg)
    ours = ours_from_hf(cfg, hf)
    ids = torch.randint(
        0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)
    )  # 40 > 16: YaRN
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    assert ref.abs().std() > 0.5  # the comparison is not between two near-constant outputs
    assert max_diff(got, ref) < 1e-4
    # The routers were exercised: several experts got tokens, and the bias changed some choice.
    counts = ours(ids).expert_counts
    assert all((c > 0).sum() >= 3 for c in counts)


def test_router_bias_matters_for_parity():
    """If we dropped e_score_correction_bias the outputs would differ: the parity test above can fail."""
    cfg = make_configs("v3_sigmoid_grouped_qlora")
    hf = hf_model(cfg)
    ours = ours_from_hf(cfg, hf)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        for moe in ours.moe_layers:
            moe.gate.e_score_correction_bias.zero_()
        assert max_diff(ours(ids).logits, ref) > 1e-3


@pytest.mark.parametrize("name", ["v3_yarn", "v2_softmax_no_qlora"])
def test_cached_decode_matches_transformers(name):
    """Our absorbed cached decode against transformers' own full forward, step by step."""
    cfg = make_configs(name)
    hf = hf_model(cfg)
    ours = ours_from_hf(cfg, hf)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    from thinkzero.model.cache import LatentCache

    with torch.no_grad():
        ref = hf(ids).logits
        cache = LatentCache.for_model(cfg, 2, 24)
        prefill = ours(ids[:, :8], cache=cache).logits
        steps = [ours(ids[:, t : t + 1], cache=cache).logits for t in range(8, 24)]
    assert max_diff(torch.cat([prefill, *steps], dim=1), ref) < 1e-4


def test_config_dict_loads_in_transformers_with_same_values():
    cfg = make_configs("v3_yarn")
    hf_cfg = transformers.DeepseekV3Config.from_dict(cfg.to_dict())
    for key in (
        "q_lora_rank",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "n_group",
        "topk_group",
        "routed_scaling_factor",
        "first_k_dense_replace",
        "norm_topk_prob",
        "num_hidden_layers",
    ):
        assert getattr(hf_cfg, key) == getattr(cfg, key), key
    assert hf_cfg.rope_parameters["rope_type"] == "yarn"
    assert hf_cfg.rope_parameters["factor"] == 4.0
    # And back: transformers' own config.json (rope_parameters, head_dim, dtype, ...) reads into ours as is.
    again = ModelConfig.from_dict(hf_cfg.to_dict())
    assert again.rope_scaling == cfg.rope_scaling and again.rope_theta == cfg.rope_theta
    assert again.q_lora_rank == cfg.q_lora_rank and again.n_group == cfg.n_group


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_directory_loads_with_load_model(name, tmp_path):
    """transformers' save_pretrained directory -> our load_model -> same logits."""
    from thinkzero.model.checkpoint import load_model

    cfg = make_configs(name)
    hf = hf_model(cfg, seed=3)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_diff(ours(ids).logits, hf(ids).logits) < 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_model_directory_loads_in_transformers(name, tmp_path):
    """our save_model directory -> transformers' from_pretrained -> same logits (router bias included)."""
    from thinkzero.model.checkpoint import save_model

    cfg = make_configs(name)
    ours = ours_from_hf(cfg, hf_model(cfg, seed=5))
    save_model(ours, tmp_path, max_shard_bytes=50_000)  # several shards + index
    cls = (
        transformers.DeepseekV3ForCausalLM
        if cfg.model_type == "deepseek_v3"
        else transformers.DeepseekV2ForCausalLM
    )
    hf = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert max_diff(hf(ids).logits, ours(ids).logits) < 1e-4
