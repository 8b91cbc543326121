"""What the RL and SFT loops share to set up an update: the seeding, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str, min_ratio: float):
    """Multiplier of the base learning rate at a given (0-based) training step."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def adamw(params, lr: float, betas, eps: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, with the fused kernel where this torch has one for the parameters' device: one kernel over all
    parameters instead of about ten ops per parameter (scripts/bench_step.py measures the difference)."""
    params = list(params)
    kwargs = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # a torch without a fused AdamW for this device (e.g. CPU before 2.4)
        return torch.optim.AdamW(params, **kwargs)
