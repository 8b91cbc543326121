"""Hugging Face model directories <-> DeepseekForCausalLM: config.json + safetensors (one file, or shards + index).

Loading is strict: every tensor the model holds must come from the checkpoint with the right shape, and every
tensor in the checkpoint must land somewhere, except ones we skip knowingly (DeepSeek-V3's multi-token-prediction
layers, stale rotary caches, a tied lm_head). Problems are collected and reported together. Tensors are read one
at a time and copied into the model, so peak memory is the model plus one tensor.
"""

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig
from .transformer import DeepseekForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Our model (like transformers 5) stacks each layer's experts in memory: gate_up_proj (E, 2I, D) = [gate; up] per
# expert, down_proj (E, D, I). Checkpoints on disk (and transformers' save_pretrained, and vLLM) use one tensor per
# expert and projection; we read and write that form, and also read the stacked one.
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A model directory that does not match the model its config.json describes."""


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> DeepseekForCausalLM:
    """Builds DeepseekForCausalLM from a Hugging Face model directory and loads its weights strictly.

    dtype: None -> the config's torch_dtype/dtype when it is float32/bfloat16/float16, else float32.
    device: where the model lives (default CPU). The model is returned in eval mode.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; expected a Hugging Face model directory")
    cfg = ModelConfig.from_json(path / CONFIG_FILE)
    dtype = dtype or _config_dtype(cfg)
    device = torch.device(device or "cpu")

    with torch.device("meta"):  # shapes only: check the checkpoint before paying for a real model
        expected = {k: tuple(t.shape) for k, t in hf_views(DeepseekForCausalLM(cfg).state_dict()).items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    sources = _index_tensors(path)
    _check_names_and_shapes(path, cfg, expected, sources)

    # Build on the meta device and allocate uninitialised storage: no random init of weights we overwrite anyway
    # (for a 16B model that would cost minutes and an fp32 copy of everything).
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives every module its own new tensor; tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    for moe in model.moe_layers:  # the router bias stays fp32: bf16 would swallow small balancing updates
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.float()
    targets = hf_views(model.state_dict())  # views into the model's tensors: copying into them loads the model
    with torch.no_grad():
        for name in expected:
            file, key, transform, _ = sources[name]
            targets[name].copy_(transform(_read(path, file, key)))
    return model.eval()


def save_model(module: nn.Module, path: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Writes config.json and the weights as model.safetensors, or as shards + index above max_shard_bytes.

    Accepts the model wrapped by DDP / DeepSpeed (unwraps `.module`). Files are written under temporary names and
    renamed into place; weight files left from an earlier save with a different sharding are removed.
    """
    while isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    cfg = getattr(module, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"save_model expects a DeepseekForCausalLM (with a ModelConfig .config), got {type(module)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tensors = {}
    seen_storage = set()
    for name, t in hf_views(module.state_dict()).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied to model.embed_tokens.weight; Hugging Face leaves it out too
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    if any(t.is_meta for t in tensors.values()) or any(
        hasattr(p, "ds_shape") and p.numel() == 0 for p in module.parameters()
    ):
        raise ValueError("save_model got meta or ZeRO-3 partitioned weights; gather the full weights before saving")

    shards = _plan_shards(tensors, max_shard_bytes)
    written = []
    if len(shards) == 1:
        _atomic_save(tensors, path / SINGLE_FILE)
        written.append(SINGLE_FILE)
    else:
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save({n: tensors[n] for n in names}, path / file)
            weight_map.update(dict.fromkeys(names, file))
            written.append(file)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_write_text(path / INDEX_FILE, json.dumps({"metadata": {"total_size": total},
                                                          "weight_map": weight_map}, indent=2))
        written.append(INDEX_FILE)
    for stale in path.glob("model*.safetensors*"):
        if stale.name not in written:
            stale.unlink()

    config = cfg.to_dict()
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if dtypes:
        # The dtype most weights have; the e_score_correction_bias may stay float32 in a bf16 model.
        main = max(dtypes, key=lambda d: sum(t.numel() for t in tensors.values() if t.dtype == d))
        config["torch_dtype"] = str(main).removeprefix("torch.")
        config.pop("dtype", None)
    _atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def hf_views(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under the names checkpoints use on disk: each stacked expert tensor becomes one view per
    expert and projection (`...mlp.experts.{e}.gate_proj.weight` etc.); no data is copied."""
    out = {}
    for name, t in state.items():
        fused = _FUSED.match(name)
        if not fused or t.dim() != 3:
            out[name] = t
            continue
        prefix, kind = fused.groups()
        for e in range(t.shape[0]):
            if kind == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
            else:
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = t[e].chunk(2)
    return out


# ---- loading helpers ---------------------------------------------------------------------------------------------


def _config_dtype(cfg: ModelConfig) -> torch.dtype:
    name = cfg.extra.get("torch_dtype") or cfg.extra.get("dtype")
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def _weight_files(path: Path) -> list[str]:
    """File names holding the weights: the index's shards, else model.safetensors."""
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX_FILE} names shard files that do not exist: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    found = sorted(p.name for p in path.iterdir())
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; the directory holds {found}")


def _open(path: Path, file: str):
    try:
        return safe_open(path / file, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path / file}: cannot read this safetensors file ({e}); it is corrupted or truncated - "
            f"re-download or re-save it"
        ) from None


def _read(path: Path, file: str, key: str) -> torch.Tensor:
    with _open(path, file) as f:
        try:
            return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{path / file}: cannot read tensor {key!r} ({e}); the file is corrupted or truncated"
            ) from None


def _index_tensors(path: Path) -> dict[str, tuple[str, str, Callable, tuple]]:
    """Our parameter name -> (file, key in file, transform to our layout, our shape), from the file headers only."""
    sources = {}
    for file in _weight_files(path):
        with _open(path, file) as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                try:
                    shape = tuple(f.get_slice(key).get_shape())
                except (SafetensorError, ValueError) as e:
                    raise CheckpointError(f"{path / file}: cannot read the header of {key!r} ({e})") from None
                fused = _FUSED.match(key)
                if fused and len(shape) == 3:
                    sources.update(_unfuse(file, key, fused.group(1), fused.group(2), shape))
                else:
                    sources[key] = (file, key, _identity, shape)
    return sources


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _unfuse(file: str, key: str, prefix: str, kind: str, shape: tuple) -> dict:
    E, rows, cols = shape
    out = {}
    for j in range(E):
        if kind == "down_proj":  # (E, D, I)
            out[f"{prefix}.{j}.down_proj.weight"] = (file, key, lambda t, j=j: t[j], (rows, cols))
        else:  # (E, 2I, D): gate rows first, then up
            half = rows // 2
            out[f"{prefix}.{j}.gate_proj.weight"] = (file, key, lambda t, j=j, h=half: t[j, :h], (half, cols))
            out[f"{prefix}.{j}.up_proj.weight"] = (file, key, lambda t, j=j, h=half: t[j, h:], (half, cols))
    return out


def _check_names_and_shapes(path: Path, cfg: ModelConfig, expected: dict, sources: dict) -> None:
    first_mtp, last_mtp = cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers

    def skipped_knowingly(name: str) -> bool:
        layer = _LAYER.match(name)
        if layer and first_mtp <= int(layer.group(1)) < last_mtp:
            return True  # DeepSeek-V3 multi-token-prediction layer: we do not build it
        if name.endswith("rotary_emb.inv_freq"):
            return True  # a cache some old checkpoints saved; we recompute it
        return name == "lm_head.weight" and cfg.tie_word_embeddings  # tied: the embedding is the source

    missing = [n for n in expected if n not in sources]
    unexpected = [n for n in sources if n not in expected and not skipped_knowingly(n)]
    misshaped = [
        f"{n}: checkpoint {list(sources[n][3])} vs model {list(shape)}"
        for n, shape in expected.items()
        if n in sources and tuple(sources[n][3]) != shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"{path}: checkpoint does not match the model described by its config.json"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if names:
                lines.append(f"  {len(names)} {title} tensor(s):")
                lines += [f"    {n}" for n in names[:50]]
                if len(names) > 50:
                    lines.append(f"    ... and {len(names) - 50} more")
        raise CheckpointError("\n".join(lines))


# ---- saving helpers ----------------------------------------------------------------------------------------------


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in state_dict order; a tensor larger than the limit gets a shard of its own."""
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _atomic_save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})  # transformers refuses files without format=pt
    os.chmod(tmp, 0o644)  # safetensors creates files private (0600); match the other files of the directory
    os.replace(tmp, file)


def _atomic_write_text(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, file)
