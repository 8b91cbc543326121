"""Random weights large enough that parity tests can fail (a fresh init is near zero: attention near uniform,
greedy choices near ties), shared by the model tests."""

import torch
from torch import nn


def randomize_(module: nn.Module, scale: float, norm_scale: float, bias_scale: float | None = None) -> nn.Module:
    """In state-dict order: norm weights 1 + norm_scale * N(0, 1); the router's correction bias bias_scale * N(0, 1)
    (scale when None); every other float tensor scale * N(0, 1). Returns the module."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("norm.weight"):
                t.copy_(1 + norm_scale * torch.randn_like(t))
            elif name.endswith("e_score_correction_bias") and bias_scale is not None:
                t.copy_(bias_scale * torch.randn_like(t))
            else:
                t.copy_(scale * torch.randn_like(t))
    return module
