"""Processes working together: the accelerator and its process group, DeepSpeed's settings, the reference model's
partitioning, and the few collectives the trainer uses.

Every collective here is meant to be reached by every rank, the same number of times and in the same order; a branch
that only some ranks take must never hold one. Where one rank has to act alone (rank 0 writing a model, choosing the
checkpoint to resume from), `Collectives.on_main` runs the action there and hands its outcome (a value, or the error
it raised) to every rank, so all ranks continue, or fail, together instead of waiting on each other forever.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from thinkzero.rl import checkpoint as ckpt
from thinkzero.rl.hf_policy import moe_classes

T = TypeVar("T")


def process_group_kwargs(world_size: int, cuda: bool, timeout_s: float) -> list:
    """The process-group handler for `world_size` processes: none for one process; otherwise a finite timeout, so a
    collective that the ranks do not all reach fails with an error instead of hanging, and on CPU an explicit gloo
    backend (without it each rank silently believes it is alone)."""
    from accelerate.utils import InitProcessGroupKwargs

    if world_size <= 1:
        return []
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if cuda else "gloo"
    return [InitProcessGroupKwargs(backend=backend, timeout=timeout)]


def make_accelerator(timeout_s: float):
    """An Accelerator with the right process group (see process_group_kwargs): NCCL on GPUs, gloo on CPU.

    Plain DDP on CPU also needs `cpu=True`: `accelerate launch` with a MULTI_GPU config starts the processes but does
    not pass the config's `use_cpu` on to them, and without it accelerate reports distributed_type NO (no DDP wrapper,
    barriers that do nothing). DeepSpeed must not get `cpu=True` (accelerate would then drop DeepSpeed)."""
    from accelerate import Accelerator

    _resolve_deepspeed_config_file()
    world_size, cuda = int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available()
    handlers = process_group_kwargs(world_size, cuda, timeout_s)
    cpu = world_size > 1 and not cuda and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)


def _resolve_deepspeed_config_file() -> None:
    """The configs in recipes/accelerate name their DeepSpeed json relative to the repository root; accelerate reads
    it relative to the working directory. Resolve it against the repository when it is not found from here."""
    name = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not name or name == "none" or Path(name).is_file():
        return
    in_repo = Path(__file__).resolve().parents[1] / name
    if not in_repo.is_file():
        raise FileNotFoundError(f"DeepSpeed config file {name!r} (deepspeed_config_file in the accelerate config) "
                                f"exists neither in {os.getcwd()} nor in {in_repo.parent}")
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(in_repo)


def prepare_models(accelerator, policy: nn.Module, optimizer, ref_model: nn.Module | None, *, micro: int,
                   mini_local: int, max_grad_norm: float | None, ref_on_cpu: bool):
    """The policy and optimizer handed to accelerate (DDP or a DeepSpeed engine), and under ZeRO-3 the reference
    partitioned like the policy. Returns (model, optimizer, reference, DeepSpeed's accumulation count or None)."""
    plugin = accelerator.state.deepspeed_plugin
    accumulation = None
    if plugin is not None:
        accumulation = configure_deepspeed(accelerator, micro, mini_local, max_grad_norm)
    zero3 = plugin is not None and plugin.zero_stage == 3
    if zero3:
        # ZeRO-3 gathers parameters module by module with a collective per call. A token-routed expert is called
        # only when some token picks it, which differs between ranks; gathering each MoE block whole (a "leaf")
        # keeps the collectives in step, and DeepSpeed gives unpicked experts zero gradients.
        from deepspeed.utils import set_z3_leaf_modules

        if leaves := moe_classes(policy):  # DeepSpeed refuses a list that matches no module
            set_z3_leaf_modules(policy, leaves)
    # Elsewhere nothing is needed for experts no token picked: each layer's experts are stacked in one tensor per
    # projection, so every rank always has a gradient (zero where unpicked) for the same parameters.
    model, optimizer = accelerator.prepare(policy, optimizer)
    if plugin is not None:
        # DeepSpeed's TorchCheckpointEngine unpickles with weights_only=False; every file it reads goes through our
        # safe loader instead (saving is unchanged).
        model.checkpoint_engine.load = safe_deepspeed_load
    if zero3 and ref_model is not None and not ref_on_cpu:
        ref_model = partition_reference(accelerator, ref_model)
    return model, optimizer, ref_model, accumulation


def configure_deepspeed(accelerator, micro: int, mini_local: int, max_grad_norm: float | None) -> int:
    """Fills DeepSpeed's batch settings from ours: we call backward once per micro-batch and step once per
    mini-batch, so DeepSpeed's accumulation count is the number of micro-batches in a mini-batch (returned)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    accumulation = mini_local // micro
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = micro * accumulation * accelerator.num_processes
    ds["gradient_clipping"] = max_grad_norm or 0.0
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = accelerator.mixed_precision == "bf16"
    if ds.get("fp16", {}).get("enabled") == "auto":
        ds["fp16"]["enabled"] = accelerator.mixed_precision == "fp16"
    return accumulation


def partition_reference(accelerator, ref_model: nn.Module) -> nn.Module:
    """Under ZeRO-3 the reference model is partitioned like the policy: a DeepSpeed engine without optimizer that
    gathers each module's parameters for its forward (model.ref_model_on_cpu keeps a full copy on the CPU)."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = {k: v for k, v in ds["zero_optimization"].items() if k.startswith("stage3_") or k == "stage"}
    config = {k: ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                 "train_batch_size", "bf16", "fp16") if k in ds}
    config["zero_optimization"] = zero
    if leaves := moe_classes(ref_model):  # DeepSpeed refuses a list that matches no module
        set_z3_leaf_modules(ref_model, leaves)
    engine = deepspeed.initialize(model=ref_model, config=config)[0]
    engine.eval()  # the engine's eval() returns None, unlike nn.Module's
    return engine


def safe_deepspeed_load(path: str, map_location=None):
    """DeepSpeed's checkpoint files through rl.checkpoint.load_file, allowing the few DeepSpeed types its ZeRO-1/2/3
    optimizer states hold (a loss scaler, the stage enum, fragment addresses: plain records, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    safe = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)
    return ckpt.load_file(path, safe, "cpu" if map_location is None else map_location)


class Collectives:
    """Cross-rank reductions over the accelerator's process group; in one process each is the identity."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world_size = accelerator.num_processes
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process

    def sum(self, value) -> float:
        if self.world_size == 1:
            return float(value)
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

    def max(self, value) -> float:
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.accelerator.gather(t).max())

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world_size == 1 else self.accelerator.gather(t)

    def gather_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        return self.accelerator.reduce(t.to(self.device), reduction="sum").cpu()

    def on_main(self, action: Callable[[], T]) -> T:
        """`action()` run on rank 0 alone; every rank returns its result, or raises the error it raised. One
        broadcast whatever happened, so no rank is left waiting on a rank that failed or decided otherwise."""
        if self.world_size == 1:
            return action()
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome[0] = ("ok", action())
            except Exception as error:  # noqa: BLE001 -- handed to every rank, then raised there
                outcome[0] = ("error", error)
        from accelerate.utils import broadcast_object_list

        kind, value = broadcast_object_list(outcome, from_process=0)[0]
        if kind == "error":
            raise value
        return value

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is the process group giving up on a collective (its timeout ran out, a peer went away). NCCL
    reports these as DistError; gloo as a plain RuntimeError that says it timed out."""
    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and "timed out" in str(error).lower())
