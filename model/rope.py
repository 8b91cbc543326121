"""Rotary position embedding for the decoupled MLA key/query part, with DeepSeek's YaRN context extension.

YaRN (as in DeepSeek-V2/V3 and transformers' `_compute_yarn_parameters`):
  inv_freq   blends interpolated (1 / (factor * base^(2i/d))) and original frequencies with a linear ramp
             between the correction dims for beta_fast / beta_slow rotations over the original context
  cos/sin    are multiplied by attention_factor = m(factor, mscale) / m(factor, mscale_all_dim)
  softmax    scale becomes qk_head_dim^-0.5 * m(factor, mscale_all_dim)^2
  where m(s, a) = 0.1 * a * ln(s) + 1 for s > 1, else 1.

Layout: DeepSeek checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ... (`interleaved=True`). We read
the pairs from the even/odd slots and write the rotated halves back as [evens | odds]. Query and key get the
same permutation, so q.k, and hence attention, is unchanged; the cache simply stores keys in that order.
"""

import math

import torch
from torch import nn


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, theta: float, rope_scaling: dict | None, max_position_embeddings: int):
    """Rotary inverse frequencies (dim/2,) float32 and the cos/sin magnitude (attention_factor)."""
    # Built on the CPU whatever the ambient default device (e.g. a meta-device model skeleton), moved on use.
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)  # (dim/2,)
    if rope_scaling is None or rope_scaling["rope_type"] == "default":
        return 1.0 / base, 1.0
    original = rope_scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = rope_scaling.get("factor") or max_position_embeddings / original
    mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def correction_dim(
        rotations: float,
    ) -> float:  # the dim whose wavelength fits `rotations` times in `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    # 0: keep the original frequency (high-frequency dims), 1: fully interpolated (low-frequency dims)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = (1.0 / (factor * base)) * ramp + (1.0 / base) * (1 - ramp)
    return inv_freq, float(attention_factor)


def softmax_scale(qk_head_dim: int, rope_scaling: dict | None) -> float:
    """1/sqrt(d), times YaRN's mscale_all_dim correction squared (queries and keys each carry one factor)."""
    scale = qk_head_dim**-0.5
    if rope_scaling is not None and rope_scaling["rope_type"] != "default":
        mscale_all_dim = rope_scaling.get("mscale_all_dim")
        if mscale_all_dim:
            factor = rope_scaling.get("factor")
            scale *= yarn_mscale(factor, mscale_all_dim) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """positions (B, T) long -> cos, sin (B, T, dim/2) float32, already scaled by YaRN's attention_factor.

    The frequencies are a constant of the config, kept outside the state dict and out of reach of `.to(dtype)`
    (a bf16 inv_freq would smear far positions), and memoised per device.
    """

    def __init__(self, dim: int, theta: float, rope_scaling: dict | None, max_position_embeddings: int):
        super().__init__()
        self.dim = dim
        inv_freq, self.attention_factor = rope_inv_freq(dim, theta, rope_scaling, max_position_embeddings)
        self._inv_freq = {inv_freq.device: inv_freq}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = next(iter(self._inv_freq.values())).to(device)
        return self._inv_freq[device]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq(positions.device)  # (B, T, dim/2)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True
) -> torch.Tensor:
    """Rotates x (B, T, H, R) at its positions; cos/sin (B, T, R/2), or (B, T, 1, R/2) already shaped to broadcast
    over the heads (the model reshapes them once per forward, not once per layer). Output [rotated evens | rotated
    odds]."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # pairs (x0, x1), (x2, x3), ...
    else:
        x1, x2 = x.chunk(2, dim=-1)  # pairs (x_i, x_{i+R/2})
    if cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, R/2)
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
