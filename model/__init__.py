"""thinkzero's policy: DeepSeek-V2/V3 (MLA + MoE) in plain PyTorch, Hugging Face checkpoint compatible."""

from .cache import LatentCache
from .checkpoint import CheckpointError, load_model, save_model
from .config import ModelConfig
from .generate import GenerationOutput, SamplingParams, generate
from .mla import MLA
from .moe import MLP, MoE, MoEGate, MoEStats, update_bias
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope
from .tokenizer import Tokenizer, build_char_tokenizer, load_tokenizer
from .transformer import CausalLMOutput, DecoderLayer, DeepseekForCausalLM

__all__ = [
    "MLA",
    "MLP",
    "CausalLMOutput",
    "CheckpointError",
    "DecoderLayer",
    "DeepseekForCausalLM",
    "GenerationOutput",
    "LatentCache",
    "MoE",
    "MoEGate",
    "MoEStats",
    "ModelConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "SamplingParams",
    "Tokenizer",
    "apply_rope",
    "build_char_tokenizer",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_model",
    "update_bias",
]
