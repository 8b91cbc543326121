"""Training checkpoints: a Hugging Face model directory plus the trainer state needed to resume exactly.

Layout of `<output_dir>/checkpoint-000120/`:
    config.json, model*.safetensors, tokenizer files  -> loadable by model.load_model, transformers and vLLM
    trainer_state.pt   optimizer, scheduler, RNG states, data position, step, resolved config (tensors and plain
                       Python values only, so it loads with torch.load(weights_only=True))
    deepspeed/         DeepSpeed's own sharded state, when training under DeepSpeed
    COMPLETE           written last; a directory without it is never resumed from

A checkpoint is written into a hidden temporary directory and renamed into place, so a crash mid-write leaves the
previous checkpoint intact and the half-written one invisible. Saving a step that already has a checkpoint renames the
old one aside (`.replaced-checkpoint-*`) before the new one goes in, and deletes it only then; `recover` (run at
start-up) puts back an aside left by a crash in between and removes stale temporaries.

Every file a resume reads is loaded with `load_file`: torch.load(weights_only=True), so only tensors, plain Python
values and the allow-listed types named by the caller are rebuilt. A planted pickle is refused with a one-line
message naming the file (`UnsafeCheckpointFile`) and nothing in it runs.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
# Only the exception torch.load(weights_only=True) raises; nothing is unpickled here.
from pickle import UnpicklingError  # allowed by the security scan (tests/rl/test_rl_security.py)
from typing import Any

import torch

from thinkzero.model.checkpoint import CheckpointError

PREFIX = "checkpoint-"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "thinkzero_config.json"
REPLACED = ".replaced-"
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


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (Python, torch CPU, CUDA); sampling draws from per-prompt generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def recover(output_dir: str | Path) -> list[str]:
    """Start-up repair of what a crash during a save leaves behind (rank 0, before anything else is written): stale
    temporaries are removed (a full disk would otherwise stay full), and a checkpoint renamed aside for a replacement
    that never arrived is put back. Returns one line per action, for the log."""
    root, notes = Path(output_dir), []
    for stale in sorted(root.glob(f".tmp-{PREFIX}*")):
        shutil.rmtree(stale, ignore_errors=True)
        notes.append(f"removed {stale}, a checkpoint write that never finished")
    for aside in sorted(root.glob(f"{REPLACED}{PREFIX}*")):
        final = root / aside.name[len(REPLACED):]
        if (final / COMPLETE).is_file() or not (aside / COMPLETE).is_file():
            remove(aside)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(aside, final)
            notes.append(f"restored {final}: its replacement was interrupted")
    return notes


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


def remove(checkpoint: Path) -> None:
    """Deletes a checkpoint so that a crash part-way never leaves a directory that still looks complete."""
    (checkpoint / COMPLETE).unlink(missing_ok=True)
    _fsync_dir(checkpoint)
    shutil.rmtree(checkpoint, ignore_errors=True)


def write_state(tmp: Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    torch.save(state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))


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
    aside = None
    if final.exists():  # the same step saved again (e.g. a stop right after a periodic save): never leave no copy
        aside = Path(output_dir) / f"{REPLACED}{final.name}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(Path(output_dir))
    if aside is not None:
        remove(aside)
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            remove(old)
    return final


def read_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete thinkzero checkpoint (no {COMPLETE} marker)")
    return load_file(path / STATE_FILE)


class UnsafeCheckpointFile(CheckpointError):
    """A checkpoint file holds Python objects beyond tensors and allow-listed types: loading it could run code."""


class CorruptCheckpointFile(CheckpointError):
    """A checkpoint file cannot be read at all (truncated or damaged)."""


def load_file(path: str | Path, safe_types: tuple = (), map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) of one file, allowing `safe_types` besides tensors and plain values. A file with
    anything else (e.g. a planted pickle) raises UnsafeCheckpointFile, an unreadable one CorruptCheckpointFile; both
    one line, naming the file."""
    try:
        with torch.serialization.safe_globals(list(safe_types)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the first global it refused
        detail = f"{found.group(1)} is not allowed" if found else "an object of a type that is not allowed"
        raise UnsafeCheckpointFile(
            f"refused to load {path}: it holds Python objects that are not tensors or plain values ({detail}), so "
            "loading it could run code; resume only from checkpoints you trust, or delete this one") from None
    except (RuntimeError, EOFError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptCheckpointFile(f"cannot read {path} ({detail}): the file is truncated or damaged") from None


# Resuming with a changed recipe, per field. REFUSED: they change what the saved weights, data position or step mean
# (another model or tokenizer, other data or prompt formatting, another group shape or seed), so the resumed run would
# not be a continuation. UNREMARKED: they say how long to run and where and how to report it. Every other field
# (optim.*, algorithm.*, rewards.*, the other rollout fields, model.dtype/...) is applied from the new recipe, with one
# warning listing the changes; optimizer hyper-parameters override the ones saved in the optimizer state.
REFUSED = ("model.name_or_path", "model.init_preset", "model.tokenizer", "model.ref_model", "data.source",
           "data.config_name", "data.split", "data.prompt_column", "data.answer_column", "data.template",
           "data.system_prompt", "data.max_prompt_length", "data.shuffle", "rollout.num_generations",
           "rollout.prompts_per_step", "rollout.batch_size", "train.seed")
UNREMARKED = ("train.max_steps", "train.resume", "train.output_dir", "train.overwrite_output_dir", "train.save_every",
              "train.keep_last", "train.eval_every", "logging.")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "params":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, applied) changes between a checkpoint's config and the resuming run's, as 'key: old -> new'."""
    old = _flatten(saved)
    new = _flatten(json.loads(json.dumps(current, default=str)))  # as written into the checkpoint
    refused, applied = [], []
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key) or key.startswith(UNREMARKED):
            continue
        line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        (refused if key in REFUSED else applied).append(line)
    return refused, applied


def read_config(path: str | Path) -> dict[str, Any] | None:
    """The resolved config a checkpoint was written with (None for checkpoints that predate the file)."""
    file = Path(path) / CONFIG_FILE
    return json.loads(file.read_text()) if file.is_file() else None
