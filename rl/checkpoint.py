"""Training checkpoints: a Hugging Face model directory plus the trainer state needed to resume exactly.

Layout of `<output_dir>/checkpoint-000120/`:
    config.json, model*.safetensors, tokenizer files  -> loadable by model.load_model, transformers and vLLM
    trainer_state.pt   optimizer, scheduler, RNG states, data position, step, resolved config (tensors and plain
                       Python values only, so it loads with torch.load(weights_only=True))
    deepspeed/         DeepSpeed's own sharded state, when training under DeepSpeed
    COMPLETE           written last; a directory without it is never resumed from

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash mid-write leaves the
previous checkpoint intact and the half-written one invisible.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

PREFIX = "checkpoint-"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state(generator: torch.Generator | None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f".tmp-{PREFIX}{step:06d}"


def begin(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for checkpoint `step`. Leftovers of writes that crashed (any step) are removed
    first: they were never complete, so nothing can resume from them."""
    for stale in Path(output_dir).glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_dir(output_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _remove(checkpoint: Path) -> None:
    """Deletes a checkpoint so that a crash part-way never leaves a directory that still looks complete."""
    (checkpoint / COMPLETE).unlink(missing_ok=True)
    _fsync_dir(checkpoint)
    shutil.rmtree(checkpoint, ignore_errors=True)


def write_state(tmp: Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    torch.save(state, tmp / STATE_FILE)
    (tmp / "thinkzero_config.json").write_text(json.dumps(config, indent=2, default=str))


def commit(tmp: Path, output_dir: str | Path, step: int, keep_last: int | None) -> Path:
    """Marks `tmp` complete, renames it into place and prunes old checkpoints beyond `keep_last`."""
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    with open(tmp / COMPLETE, "w") as handle:
        handle.write(f"{step}\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)
    final = checkpoint_dir(output_dir, step)
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(Path(output_dir))
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            _remove(old)
    return final


def read_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete thinkzero checkpoint (no {COMPLETE} marker)")
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
