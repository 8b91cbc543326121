"""Group-relative advantages (GRPO) and per-group reward statistics: pure functions on reward tensors.

Rewards come prompt-major, either flat [B*G] (row p*G + g is completion g of prompt p) or as [B, G]. The baseline is
always the group mean; what the centred reward is divided by is a named variant (`SCALERS`):
    group  per-group std (DeepSeekMath GRPO)
    batch  std over the whole batch (more robust when a group's std is tiny)
    none   no division (Dr. GRPO: removes the difficulty bias the std term adds)
Stds are the unbiased (n - 1) estimate, matching TRL so logged numbers compare.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ADVANTAGE_EPS = 1e-4  # added to the std so all-equal groups give 0 / eps = 0, not NaN


def as_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[B*G] or [B, G] -> [B, G]."""
    if rewards.dim() == 2:
        if rewards.shape[1] != num_generations:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not have num_generations={num_generations} "
                             "columns")
        return rewards
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of "
                         f"num_generations={num_generations}; expected [B*G] or [B, G]")
    return rewards.view(-1, num_generations)  # (B, G)


def _scale_group(centred: torch.Tensor, rewards: torch.Tensor, eps: float) -> torch.Tensor:
    return centred / (rewards.std(dim=1, keepdim=True) + eps)  # (B, G) / (B, 1)


def _scale_batch(centred: torch.Tensor, rewards: torch.Tensor, eps: float) -> torch.Tensor:
    return centred / (rewards.std() + eps)  # (B, G) / ()


def _scale_none(centred: torch.Tensor, rewards: torch.Tensor, eps: float) -> torch.Tensor:
    return centred


SCALERS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "group": _scale_group,
    "batch": _scale_batch,
    "none": _scale_none,
}


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", eps: float = ADVANTAGE_EPS
) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / scale. Returns the same shape as `rewards` ([B*G] or [B, G]), float32."""
    if scale_rewards not in SCALERS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; choose one of {', '.join(SCALERS)}")
    grouped = as_groups(rewards.float(), num_generations)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    advantages = SCALERS[scale_rewards](centred, grouped, eps)  # (B, G)
    return advantages.reshape(rewards.shape)


def nonconstant_groups(rewards: torch.Tensor, num_generations: int, atol: float = 1e-6) -> torch.Tensor:
    """Bool [B]: groups whose rewards are not all equal. Only these carry a learning signal (DAPO dynamic
    sampling keeps just them)."""
    grouped = as_groups(rewards.float(), num_generations)  # (B, G)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values  # (B,)
    return spread > atol


def group_rows(group_mask: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Bool [B] over groups -> LongTensor of the kept completion rows in prompt-major order ([B*G] indexing)."""
    row_mask = group_mask.repeat_interleave(num_generations)  # (B*G,)
    return row_mask.nonzero(as_tuple=True)[0]


def group_reward_stats(rewards: torch.Tensor, num_generations: int) -> dict[str, float]:
    """`reward` (mean), `reward_std` (mean of per-group stds, as TRL logs it) and `frac_reward_zero_std`."""
    grouped = as_groups(rewards.float(), num_generations)  # (B, G)
    return {
        "reward": grouped.mean().item(),
        "reward_std": grouped.std(dim=1).mean().item(),
        "frac_reward_zero_std": (~nonconstant_groups(grouped, num_generations)).float().mean().item(),
    }
