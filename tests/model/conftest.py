"""Fixtures shared by the model tests: the small configs they run on and factories for randomly initialised models.

Each factory seeds torch, builds the model in eval mode and gives it weights large enough that parity tests can
fail (see randomize.py); keyword arguments other than the seed and scales override config fields.
"""

import pytest
import torch
from randomize import randomize_

from thinkzero.model.config import ModelConfig
from thinkzero.model.presets import preset
from thinkzero.model.transformer import DeepseekForCausalLM

# A small DeepSeek-V3: three layers (the first dense), sigmoid routing over 8 experts in 4 groups, a low-rank
# query, values narrower than the query/key heads (8 < 8 + 8).
SMALL_V3 = {
    "model_type": "deepseek_v3",
    "vocab_size": 70,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 64,
}


def _random_model(fields: dict, seed: int, scale: float, norm_scale: float, bias_scale: float | None):
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(ModelConfig.from_dict(fields)).eval()
    return randomize_(model, scale, norm_scale, bias_scale)


@pytest.fixture
def small_config() -> dict:
    """SMALL_V3's config.json fields (a fresh copy)."""
    return dict(SMALL_V3)


@pytest.fixture
def small_model():
    """small_model(seed=0, scale=0.2, norm_scale=0.2, bias_scale=None, **fields) -> SMALL_V3 with random weights."""

    def make(seed: int = 0, scale: float = 0.2, norm_scale: float = 0.2, bias_scale: float | None = None, **fields):
        return _random_model({**SMALL_V3, **fields}, seed, scale, norm_scale, bias_scale)

    return make


@pytest.fixture
def tiny_model():
    """tiny_model(seed=0, scale=0.2, norm_scale=0.2, bias_scale=None, **fields) -> the "tiny" preset (2 layers, the
    second MoE; vocabulary 128) with random weights."""

    def make(seed: int = 0, scale: float = 0.2, norm_scale: float = 0.2, bias_scale: float | None = None, **fields):
        return _random_model({**preset("tiny"), **fields}, seed, scale, norm_scale, bias_scale)

    return make
