"""ModelConfig: reads real DeepSeek config.json files, round-trips, names every field it will not handle."""

import itertools
import json

import pytest

from thinkzero.model.config import SCORING_FUNCS, TOPK_METHODS, ModelConfig
from thinkzero.model.moe import MoEGate

# The released DeepSeek-V3 config.json (quantization_config left out: fp8 weights are rejected, see below).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
# DeepSeek-V2-Lite: full-rank queries, softmax greedy routing.
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}
SMALL = dict(
    model_type="deepseek_v3",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
)


def test_reads_released_deepseek_v3_config():
    cfg = ModelConfig.from_dict(DEEPSEEK_V3)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim) == (1536, 512, 192)
    assert (cfg.scoring_func, cfg.topk_method, cfg.n_group, cfg.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
    assert cfg.rope_scaling == {
        "rope_type": "yarn",
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
    }
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert cfg.extra["torch_dtype"] == "bfloat16"


def test_reads_deepseek_v2_lite_config():
    cfg = ModelConfig.from_dict(DEEPSEEK_V2_LITE)
    assert cfg.q_lora_rank is None and cfg.scoring_func == "softmax" and cfg.topk_method == "greedy"
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]


def test_round_trip_through_json(tmp_path):
    cfg = ModelConfig.from_dict(DEEPSEEK_V3)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))  # what save_model writes
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["architectures"] == ["DeepseekV3ForCausalLM"] and d["model_type"] == "deepseek_v3"
    assert d["rope_scaling"]["type"] == d["rope_scaling"]["rope_type"] == "yarn"
    assert d["rope_theta"] == 10000 and d["qk_head_dim"] == 192
    again = ModelConfig.from_json(tmp_path)  # a directory holding config.json works too
    assert again == cfg


def test_transformers5_rope_parameters_form():
    d = {k: v for k, v in DEEPSEEK_V3.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**DEEPSEEK_V3["rope_scaling"], "rope_type": "yarn", "rope_theta": 50000.0}
    d.update(head_dim=64, qk_head_dim=192, dtype="bfloat16", rope_interleave=True)
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling["factor"] == 40
    plain = ModelConfig.from_dict({**SMALL, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})
    assert plain.rope_theta == 500.0 and plain.rope_scaling is None


def test_defaults_follow_model_type():
    v2 = ModelConfig.from_dict({**SMALL, "model_type": "deepseek_v2", "n_group": None, "topk_group": None})
    assert (v2.scoring_func, v2.topk_method) == ("softmax", "greedy")
    v3 = ModelConfig.from_dict(SMALL)
    assert (v3.scoring_func, v3.topk_method) == ("sigmoid", "noaux_tc")


def test_moe_layer_placement():
    cfg = ModelConfig.from_dict({**SMALL, "first_k_dense_replace": 1, "moe_layer_freq": 2})
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, False, True, False]
    dense = ModelConfig.from_dict({**SMALL, "n_routed_experts": None})
    assert not any(dense.is_moe_layer(i) for i in range(4))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_routed_expert": 4}, r"unknown field 'n_routed_expert' \(did you mean 'n_routed_experts'\?\)"),
        ({"sliding_window": 128}, "unknown field 'sliding_window'"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config=.*fp8.*not supported"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1: attention dropout is not implemented"),
        ({"pretraining_tp": 2}, "pretraining_tp=2"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear' is not supported"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0, "alpha": 1}}, "unknown rope_scaling key 'alpha'"),
        ({"num_key_value_heads": 2}, "num_key_value_heads=2 must equal num_attention_heads=4"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"model_type": "llama"}, "model_type='llama' is not supported"),
        ({"scoring_func": "tanh"}, "scoring_func='tanh' is not supported"),
        ({"topk_method": "noaux_tc", "n_group": 3}, "needs n_group dividing n_routed_experts"),
        ({"head_dim": 16}, "head_dim=16 disagrees with qk_rope_head_dim = 8"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim must be even"),
        ({"model_type": "deepseek_v2", "rope_interleave": False}, "rope_interleave=false is only defined"),
    ],
)
def test_unsupported_fields_are_errors_that_name_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**SMALL, **overrides})


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dict({**SMALL, "foo": 1, "bar": 2})
    assert "'foo'" in str(info.value) and "'bar'" in str(info.value)


def test_from_json_error_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SMALL, "use_mtp": True}))
    with pytest.raises(ValueError, match=f"(?s){path}.*unknown field 'use_mtp'"):
        ModelConfig.from_json(path)


def test_a_router_validates_exactly_when_it_builds_and_fails_with_the_same_message():
    """Over a grid of router settings: ModelConfig.validate accepts exactly what MoEGate builds, and each reason
    the gate refuses is in validate's message (a config must not validate and then fail at build time)."""
    outcomes = {"built": 0, "refused": 0}
    for E, k, scoring, method, n_group, topk_group in itertools.product(
        (4, 6, 8), (0, 1, 3, 5), SCORING_FUNCS + ("tanh",), TOPK_METHODS + ("random",), (None, 1, 2, 3, 4),
        (None, 1, 2, 3),
    ):
        gate_args = {"scoring_func": scoring, "topk_method": method, "n_group": n_group, "topk_group": topk_group}
        router = {"n_routed_experts": E, "num_experts_per_tok": k, **gate_args}
        try:
            MoEGate(4, E, k, **gate_args)
            build_error = None
        except ValueError as e:
            build_error = str(e)
        try:
            ModelConfig.from_dict({**SMALL, **router})
            config_error = None
        except ValueError as e:
            config_error = str(e)
        if build_error is None:
            assert config_error is None, router
            outcomes["built"] += 1
        else:
            reasons = [line.strip() for line in build_error.splitlines()[1:]]
            assert reasons and config_error is not None and all(r in config_error for r in reasons), router
            outcomes["refused"] += 1
    assert min(outcomes.values()) > 100, outcomes
