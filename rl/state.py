"""The trainer's state on disk: choosing the checkpoint to resume from, writing a checkpoint, restoring one.

rl.checkpoint holds the file layout and the atomic commit; this module decides what goes into a checkpoint and what
comes back out, across processes. Rank 0 alone makes every filesystem decision (which checkpoint to resume from,
whether the recipe may change, creating and committing the checkpoint directory) and shares it through
`Collectives.on_main`, so ranks never disagree on what they saw on disk, and an error on rank 0 reaches every rank.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from thinkzero.rl import checkpoint as ckpt
from thinkzero.rl.config import Config, ConfigError, config_to_dict
from thinkzero.rl.distributed import Collectives, is_collective_failure
from thinkzero.rl.faults import kill_point
from thinkzero.rl.hf_policy import save_policy
from thinkzero.rl.rollout import policy_for_sampling


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


# ---- resume -------------------------------------------------------------------------------------------------------

def find_resume(cfg: Config, notes: list[str]) -> tuple[Path | None, dict | None]:
    """The checkpoint to start from and its trainer state. resume=auto takes the newest one whose state loads,
    skipping (with a note) any that are truncated or damaged; a file that could run code stops the run."""
    resume, output_dir = cfg.train.resume, Path(cfg.train.output_dir)
    if resume == "none":
        previous = ckpt.list_checkpoints(output_dir)
        metrics = output_dir / "metrics.jsonl"
        if (previous or (metrics.is_file() and metrics.stat().st_size)) and not cfg.train.overwrite_output_dir:
            what = previous[-1].name if previous else "metrics.jsonl"
            raise ConfigError(f"train.output_dir {str(output_dir)!r} already holds another run ({what}); "
                              "continue it with train.resume=auto, replace it with "
                              "train.overwrite_output_dir=true, or choose another train.output_dir")
        return None, None
    if resume == "auto":
        for path in reversed(ckpt.list_checkpoints(output_dir)):
            try:
                return path, ckpt.read_state(path)
            except ckpt.CorruptCheckpointFile as e:
                notes.append(f"warning: skipped {path.name} for resume: {e}")
        return None, None
    path = Path(resume)
    if not (path / ckpt.COMPLETE).is_file():
        raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint directory "
                                f"(no {ckpt.COMPLETE} marker)")
    return path, ckpt.read_state(path)


def check_recipe(path: Path, cfg: Config, notes: list[str]) -> None:
    """Compares the recipe with the one the checkpoint was written with; see rl.checkpoint.REFUSED for which
    changes stop the resume and which are applied (with a note)."""
    saved = ckpt.read_config(path)
    if saved is None:
        return
    refused, applied = ckpt.config_changes(saved, config_to_dict(cfg))
    if refused:
        raise ConfigError(f"cannot resume from {path} with a recipe that changes {'; '.join(refused)} (the "
                          "checkpoint would not mean the same thing); restore those values, or start a new run "
                          "in another train.output_dir")
    if applied:
        notes.append(f"warning: resuming with a changed recipe, applied: {'; '.join(applied)}")


def decide_resume(dist: Collectives, cfg: Config) -> tuple[Path | None, dict | None, list[str]]:
    """(checkpoint, its trainer state, notes for the log), decided on rank 0 and the same on every rank: each rank
    reads the chosen checkpoint's state itself, but never chooses."""
    found: dict[str, Any] = {}

    def decide() -> tuple[Path | None, list[str]]:
        notes: list[str] = []
        path, found["state"] = find_resume(cfg, notes)
        if path is not None:
            check_recipe(path, cfg, notes)
        return path, notes

    path, notes = dist.on_main(decide)
    if path is None:
        return None, None, notes
    return path, found["state"] if dist.is_main else ckpt.read_state(path), notes


def apply_optim_config(cfg: Config, scheduler) -> None:
    """The recipe's optimizer hyper-parameters over those restored with the optimizer state (a no-op when the
    recipe is unchanged: the same schedule formula gives the same learning rate)."""
    o = cfg.optim
    scheduler.base_lrs = [o.lr for _ in scheduler.base_lrs]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in scheduler.optimizer.param_groups:
        group.update(lr=o.lr * factor, initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                     weight_decay=o.weight_decay)


def load_training_state(path: Path, state: dict, cfg: Config, model: nn.Module, optimizer, scheduler, *,
                        world_size: int, rank: int, is_deepspeed: bool) -> None:
    """Restores optimizer, scheduler and this rank's RNGs from a checkpoint (the weights were already loaded from the
    same directory when the model was built; the data position and counters are the caller's)."""
    if state["world_size"] != world_size:
        raise ValueError(f"{path} was written by {state['world_size']} processes; resuming with "
                         f"{world_size} is not supported (the data shards and RNG streams would differ)")
    scheduler.load_state_dict(state["scheduler"])
    if is_deepspeed:
        model.load_checkpoint(str(path / "deepspeed"), load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        optimizer.load_state_dict(state["optimizer"])
    apply_optim_config(cfg, scheduler)
    ckpt.set_rng_state(ckpt.load_file(path / f"rng_rank{rank}.pt"))


# ---- save ---------------------------------------------------------------------------------------------------------

def save_checkpoint(dist: Collectives, model: nn.Module, tokenizer, cfg: Config, step: int, state: dict | None, *,
                    rank: int, is_deepspeed: bool, log: Callable[[str], None]) -> Path | None:
    """Writes checkpoint-<step>: HF model dir + trainer state (`state`, needed on rank 0 only); atomic (temp dir
    renamed into place). A write that fails on any rank (a full disk) fails on every rank: the temporary directory is
    removed and CheckpointWriteFailed is raised."""
    output_dir = Path(cfg.train.output_dir)
    try:
        return _write_checkpoint(dist, model, tokenizer, cfg, step, state, rank=rank, is_deepspeed=is_deepspeed,
                                 log=log)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as RuntimeError
        if is_collective_failure(e):
            raise  # ranks that stopped answering are not a full disk: the caller reports the timeout as it is
        if dist.is_main:
            shutil.rmtree(ckpt.tmp_dir(output_dir, step), ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        previous = ckpt.latest_checkpoint(output_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointWriteFailed(f"could not write the step-{step} checkpoint in {output_dir} ({reason}); "
                                    f"{kept}. Free space there and resume with train.resume=auto") from None


def _write_checkpoint(dist: Collectives, model: nn.Module, tokenizer, cfg: Config, step: int, state: dict | None, *,
                      rank: int, is_deepspeed: bool, log: Callable[[str], None]) -> Path | None:
    output_dir = Path(cfg.train.output_dir)
    tmp = dist.on_main(lambda: ckpt.begin(output_dir, step))
    failure: Exception | None = None
    try:
        with policy_for_sampling(model) as module:  # gathers ZeRO-3 shards; a no-op otherwise
            if dist.is_main:
                save_policy(module, tmp)
                tokenizer.save(tmp)
        torch.save(ckpt.rng_state(), tmp / f"rng_rank{rank}.pt")  # every rank's global RNGs
    except (OSError, RuntimeError, SafetensorError) as e:
        failure = e
    kill_point("checkpoint", step)
    if is_deepspeed:
        model.save_checkpoint(str(tmp / "deepspeed"))
    # Every rank learns whether any rank's files failed (this reduce is also the barrier before the commit).
    if dist.max(failure is not None) > 0:
        raise failure or RuntimeError("another process could not write its part of the checkpoint")

    def commit() -> Path:
        ckpt.write_state(tmp, state, config_to_dict(cfg))
        final = ckpt.commit(tmp, output_dir, step, cfg.train.keep_last)
        log(f"saved {final}")
        return final

    final = dist.on_main(commit)
    return final if dist.is_main else None
