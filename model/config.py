"""DeepSeek-V2 / DeepSeek-V3 model config, read from and written to a Hugging Face `config.json`.

Field names are Hugging Face's. Every key of a config.json is either a field below, a known piece of metadata
we can ignore safely (KNOWN_METADATA), or an error that names it: a setting we do not implement is never
dropped silently. Both the legacy DeepSeek form (`rope_theta` + `rope_scaling`, as in the released
checkpoints) and the transformers-5 form (`rope_parameters`) are read; `to_dict` writes the legacy form, which
every transformers version reads.
"""

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
YARN_KEYS = {
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
}

# Keys with no effect on the maths of this implementation: bookkeeping, transformers' generic PretrainedConfig
# fields (written out in full by `to_dict()`), and generation defaults that older configs carry.
KNOWN_METADATA = {
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "use_cache",
    "output_router_logits",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "ep_size",
    "id2label",
    "label2id",
    "chunk_size_feed_forward",
    "problem_type",
    "torchscript",
    "tokenizer_class",
    "task_specific_params",
    "finetuning_task",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "tf_legacy_loss",
    "use_bfloat16",
    "is_decoder",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
}
# Keys that are fine only at the value that means "nothing special": key -> (accepted values, why).
NEUTRAL_ONLY = {
    "attention_dropout": ((0, 0.0, None), "attention dropout is not implemented"),
    "mlp_bias": ((False, None), "MLP biases are not implemented"),
    "pretraining_tp": ((1, None), "tensor-parallel pretraining emulation is not implemented"),
    "quantization_config": (
        (None,),
        "quantised (e.g. fp8) checkpoints are not supported; dequantise to bf16 first",
    ),
    "use_sliding_window": ((False, None), "sliding-window attention is not implemented"),
    "is_encoder_decoder": ((False, None), "encoder-decoder models are not supported"),
    "add_cross_attention": ((False, None), "cross-attention is not supported"),
    "pruned_heads": (({}, None), "pruned attention heads are not supported"),
}


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = (
        None  # MLA expands every head from the latent: must equal the head count
    )
    # Multi-head latent attention
    q_lora_rank: int | None = 1536  # None: a full-rank q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # Mixture of experts (None experts: every layer dense)
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str | None = None  # default by model type: v2 'greedy', v3 'noaux_tc'
    scoring_func: str | None = None  # default by model type: v2 'softmax', v3 'sigmoid'
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    num_nextn_predict_layers: int = 0  # multi-token-prediction heads: kept in config.json, not built here
    # Positions, norms, embeddings
    rope_theta: float = 10000.0
    rope_scaling: dict | None = (
        None  # None or YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    )
    rope_interleave: bool = True  # rotary pairs are (x0, x1), (x2, x3), ... as in DeepSeek's checkpoints
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # metadata from config.json, kept

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; expected one of {MODEL_TYPES}"
            )
        v3 = self.model_type == "deepseek_v3"
        if self.scoring_func is None:
            self.scoring_func = "sigmoid" if v3 else "softmax"
        if self.topk_method is None:
            self.topk_method = "noaux_tc" if v3 else "greedy"
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        """DeepSeek's rule: experts from layer first_k_dense_replace on, in every moe_layer_freq-th layer."""
        return (
            self.n_routed_experts is not None
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    def validate(self) -> None:
        errors = []
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                errors.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.qk_nope_head_dim, int) or self.qk_nope_head_dim < 0:
            errors.append(f"qk_nope_head_dim must be a non-negative integer, got {self.qk_nope_head_dim!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            errors.append(f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            errors.append(f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.num_key_value_heads != self.num_attention_heads:
            errors.append(
                f"num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads="
                f"{self.num_attention_heads}: MLA derives every head's key and value from the shared latent"
            )
        if self.hidden_act != "silu":
            errors.append(f"hidden_act={self.hidden_act!r} is not supported; only 'silu' (SwiGLU)")
        if not self.rope_interleave and self.model_type == "deepseek_v2":
            errors.append(
                "rope_interleave=false is only defined for deepseek_v3 (DeepSeek-V2 always interleaves)"
            )
        if self.moe_layer_freq < 1 or self.first_k_dense_replace < 0:
            errors.append(
                f"need moe_layer_freq >= 1 and first_k_dense_replace >= 0, got {self.moe_layer_freq}, "
                f"{self.first_k_dense_replace}"
            )
        if self.n_routed_experts is not None:
            if not self.moe_intermediate_size:
                errors.append("n_routed_experts is set, so moe_intermediate_size must be too")
            errors += router_errors(self.n_routed_experts, self.num_experts_per_tok, self.scoring_func,
                                    self.topk_method, self.n_group, self.topk_group)
        if self.rope_scaling is not None:
            errors += _rope_scaling_errors(self.rope_scaling)
        if errors:
            raise ValueError("invalid DeepSeek config:\n  " + "\n  ".join(errors))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d.pop("extra", None)
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra, problems = {}, {}, []

        # transformers 5 writes rope_theta and rope_scaling folded into one `rope_parameters` dict.
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters:
            rp = dict(rope_parameters)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            rope_type = rp.get("rope_type", rp.get("type", "default"))
            if rope_type != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = rp
        # Derived sizes transformers writes out: accept them when they agree with the fields they come from.
        derived = {"qk_head_dim": ("qk_nope_head_dim", "qk_rope_head_dim"), "head_dim": ("qk_rope_head_dim",)}
        for key, parts in derived.items():
            if key in d:
                value = d.pop(key)
                expected = sum(d.get(p, getattr(cls, p)) for p in parts)
                if value is not None and value != expected:
                    problems.append(f"{key}={value} disagrees with {' + '.join(parts)} = {expected}")
        if "num_mtp_layers" in d:  # transformers' alias
            d.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))

        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key in KNOWN_METADATA:
                extra[key] = value
            elif key in NEUTRAL_ONLY:
                accepted, why = NEUTRAL_ONLY[key]
                if value in accepted:
                    extra[key] = value
                else:
                    problems.append(f"{key}={value!r}: {why}")
            else:
                close = difflib.get_close_matches(
                    key, sorted(fields | KNOWN_METADATA | set(NEUTRAL_ONLY)), n=1
                )
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown field {key!r}{hint}")
        if problems:
            raise ValueError("unsupported DeepSeek config fields:\n  " + "\n  ".join(problems))
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads `path` (a config.json, or a model directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            d = json.load(f)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that this class and transformers' DeepseekV2/V3ForCausalLM both read."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out = {k: v for k, v in self.extra.items() if k not in ("architectures", "auto_map", "_name_or_path")}
        out.update(d)
        out["architectures"] = [ARCHITECTURES[self.model_type]]
        if self.rope_scaling is not None:
            # Both spellings of the type key: DeepSeek's code reads "type", transformers reads "rope_type".
            out["rope_scaling"] = {**self.rope_scaling, "type": self.rope_scaling["rope_type"]}
        out["qk_head_dim"] = self.qk_head_dim
        out["head_dim"] = self.qk_rope_head_dim
        return dict(sorted(out.items()))


def router_errors(n_routed_experts: int, num_experts_per_tok: int | None, scoring_func: str, topk_method: str,
                  n_group: int | None, topk_group: int | None) -> list[str]:
    """What is wrong with a router's settings (empty when nothing is). The one statement of the rules: validate
    reports them with the rest of a config, and MoEGate refuses to build on them, so a config that validates
    builds."""
    E, k = n_routed_experts, num_experts_per_tok
    errors = []
    if not k:
        errors.append("n_routed_experts is set, so num_experts_per_tok must be too")
    elif not 0 < k <= E:
        errors.append(f"num_experts_per_tok={k} must be in [1, n_routed_experts={E}]")
    if scoring_func not in SCORING_FUNCS:
        errors.append(f"scoring_func={scoring_func!r} is not supported; expected one of {SCORING_FUNCS}")
    if topk_method not in TOPK_METHODS:
        errors.append(f"topk_method={topk_method!r} is not supported; expected one of {TOPK_METHODS}")
    elif topk_method != "greedy":  # the experts come in n_group groups, of which the best topk_group are kept
        if not n_group or not topk_group or E % n_group or topk_group > n_group:
            errors.append(
                f"topk_method={topk_method!r} needs n_group dividing n_routed_experts and 1 <= topk_group <= "
                f"n_group; got n_group={n_group}, topk_group={topk_group}, n_routed_experts={E}"
            )
        elif k and topk_group * (E // n_group) < k:
            errors.append(f"topk_group={topk_group} groups of {E // n_group} experts cannot hold "
                          f"num_experts_per_tok={k} experts")
        elif topk_method == "noaux_tc" and E // n_group < 2:
            errors.append("topk_method='noaux_tc' scores groups by their top-2 experts: need >= 2 per group")
    return errors


def _normalise_rope_scaling(rope_scaling: dict) -> dict | None:
    rs = dict(rope_scaling)
    rope_type = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    rs.pop("rope_theta", None)
    if rope_type == "default" and not rs:
        return None
    return {"rope_type": rope_type, **rs}


def _rope_scaling_errors(rs: dict) -> list[str]:
    rope_type = rs["rope_type"]
    if rope_type not in ("yarn", "default"):
        return [f"rope_scaling type {rope_type!r} is not supported; expected 'yarn' (or no rope_scaling)"]
    unknown = sorted(set(rs) - YARN_KEYS - {"rope_type"})
    if rope_type == "default":
        return [f"rope_scaling of type 'default' takes no parameters, got {unknown}"] if unknown else []
    errors = [f"unknown rope_scaling key {k!r}; YaRN takes {sorted(YARN_KEYS)}" for k in unknown]
    factor = rs.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        errors.append(f"rope_scaling.factor must be a number >= 1, got {factor!r}")
    return errors
