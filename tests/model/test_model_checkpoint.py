"""Checkpoint I/O: round trips (single file, shards, tied embeddings, dtypes) and clear errors for bad directories."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from thinkzero.model.checkpoint import CheckpointError, hf_views, load_model, save_model
from thinkzero.model.config import ModelConfig
from thinkzero.model.presets import preset


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 17, 42, 3, 99, 7]])


@pytest.fixture
def saved(tiny_model, tmp_path):
    model = tiny_model()  # random weights, the router bias too: a non-default buffer must survive
    save_model(model, tmp_path)
    return model, tmp_path


def test_round_trip_single_file(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(path)
    assert_same_weights(model, loaded)
    assert torch.equal(logits(model, IDS), logits(loaded, IDS))
    assert not loaded.training
    keys = set(load_file(path / "model.safetensors"))
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert json.loads((path / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]


def test_sharded_round_trip_and_stale_files_removed(tiny_model, tmp_path):
    model = tiny_model()
    save_model(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(hf_views(model.state_dict()))  # one tensor per expert on disk
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert not (tmp_path / "model.safetensors").exists()
    assert_same_weights(model, load_model(tmp_path))
    # Saving again unsharded leaves no shards or index behind to confuse a loader.
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_tied_embeddings(tiny_model, tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_model(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(model, IDS), logits(loaded, IDS))


def test_dtype_default_from_config_and_override(tiny_model, tmp_path):
    model = tiny_model().to(torch.bfloat16)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path).lm_head.weight.dtype == torch.bfloat16
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.float())


def test_unwraps_ddp_like_wrappers(tiny_model, tmp_path):
    class Wrapper(nn.Module):  # DDP and DeepSpeed engines keep the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model()
    save_model(Wrapper(Wrapper(model)), tmp_path)
    assert_same_weights(model, load_model(tmp_path))


def rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_reported_together(saved):
    _, path = saved

    def edit(t):
        del t["model.layers.0.self_attn.o_proj.weight"]
        t["model.layers.0.mlp.bias"] = torch.zeros(3)
        t["model.norm.weight"] = torch.ones(65)

    rewrite(path, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "1 missing tensor(s):\n    model.layers.0.self_attn.o_proj.weight" in msg
    assert "1 unexpected tensor(s):\n    model.layers.0.mlp.bias" in msg
    assert "model.norm.weight: checkpoint [65] vs model [64]" in msg


def test_missing_expert_is_an_error_not_a_random_init(saved):
    _, path = saved
    rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\):\n    model.layers.1.mlp.experts.3.up_proj"):
        load_model(path)


def test_corrupted_header_names_the_file(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32  # garbage inside the JSON header
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read this safetensors file .*corrupted"):
        load_model(path)


def test_truncated_file_names_the_file(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*corrupted or truncated"):
        load_model(path)


def test_truncated_shard_names_the_shard(tiny_model, tmp_path):
    save_model(tiny_model(), tmp_path, max_shard_bytes=100_000)
    shard = next(tmp_path.glob("model-00002-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path)


def test_index_naming_a_missing_shard(tiny_model, tmp_path):
    save_model(tiny_model(), tmp_path, max_shard_bytes=100_000)
    victim = max(tmp_path.glob("model-*.safetensors"))
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard files that do not exist: \\['{victim.name}'\\]"):
        load_model(tmp_path)


def test_no_weights_or_no_config(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    save_model(tiny_model(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)


def test_mtp_layers_skipped_only_when_declared(saved):
    model, path = saved  # 2 layers: layer 2 is where DeepSeek-V3 keeps its multi-token-prediction module
    rewrite(path, lambda t: t.update({"model.layers.2.eh_proj.weight": torch.zeros(64, 128),
                                      "model.layers.2.shared_head.norm.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*\n    model.layers.2.eh_proj.weight"):
        load_model(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    assert_same_weights(model, load_model(path))


def test_fused_expert_tensors_are_unfused(saved):
    model, path = saved

    def fuse(t):
        prefix, E = "model.layers.1.mlp.experts", 8
        gate_up = [torch.cat([t.pop(f"{prefix}.{j}.gate_proj.weight"), t.pop(f"{prefix}.{j}.up_proj.weight")])
                   for j in range(E)]
        t[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, D)
        t[f"{prefix}.down_proj"] = torch.stack([t.pop(f"{prefix}.{j}.down_proj.weight") for j in range(E)])

    rewrite(path, fuse)
    assert_same_weights(model, load_model(path))


def test_loads_transformers_save_pretrained_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.from_dict(preset("tiny"))
    hf_cfg = transformers.DeepseekV3Config.from_dict(cfg.to_dict())
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)  # strict: every name and shape matched
    hf_state = hf.state_dict()
    assert torch.equal(ours.state_dict()["model.layers.1.mlp.gate.weight"], hf_state["model.layers.1.mlp.gate.weight"])
    # Both stack the experts in memory the same way, so the state dicts match name for name.
    assert ours.state_dict().keys() == hf_state.keys()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, hf_state[name]), name


def test_make_model_script_writes_a_loadable_directory(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from thinkzero.model.presets import write_random_model
    from thinkzero.model.tokenizer import load_tokenizer

    made = write_random_model("tiny", tmp_path / "v2", seed=3, model_type="deepseek_v2")
    model, tok = load_model(tmp_path / "v2"), load_tokenizer(tmp_path / "v2")
    assert model.config.model_type == "deepseek_v2" and model.config.topk_method == "group_limited_greedy"
    assert tok.vocab_size == model.config.vocab_size == 128
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)
    ids = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "2+2?"}]))])
    assert torch.equal(logits(model, ids), logits(made.eval(), ids))

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_model.py"
    run = subprocess.run([sys.executable, str(script), "--preset", "tiny", str(tmp_path / "cli"), "--seed", "3"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert load_model(tmp_path / "cli").config.model_type == "deepseek_v3"


def test_bf16_load_keeps_router_bias_fp32(saved):
    model, path = saved
    loaded = load_model(path, dtype=torch.bfloat16)
    gate = loaded.moe_layers[0].gate
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert gate.e_score_correction_bias.dtype == torch.float32  # bf16 would swallow small balancing updates
    assert torch.equal(gate.e_score_correction_bias, model.moe_layers[0].gate.e_score_correction_bias.float())
