"""GRPO-family policy losses and KL estimators: pure functions, tensors in, (loss, metrics) out.

Every variant shares the PPO clipped surrogate per token,
    ratio = exp(logprobs - old_logprobs)
    surrogate = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)
plus beta * KL(policy || reference) per token, and differs only in how per-token terms become one number
(`AGGREGATORS`, chosen by name):
    grpo     mean over each sequence's tokens, then mean over sequences (DeepSeekMath)
    bnpo     mean over all tokens of the local batch
    dr_grpo  sum over tokens / (num sequences * max_completion_length), a constant (Dr. GRPO: no length bias)
    dapo     sum over tokens / tokens of the GLOBAL batch (num_items_in_batch), so mini-batches, gradient
             accumulation and ranks add up to exactly the full-batch token mean (DAPO)
    gspo     one importance ratio per sequence, exp(mean over tokens of (logprobs - old_logprobs)), clipped at the
             sequence level, mean over sequences (GSPO, Qwen)

Normalisers that can span several calls take the global count as an argument (`num_items_in_batch` for dapo,
`num_sequences` for grpo / dr_grpo / gspo); with them, the sum of the per-micro-batch losses equals the full-batch
loss. (Under DDP, which averages gradients over ranks, the caller multiplies by the number of ranks.)

Shapes: B sequences, T completion tokens (right-padded; completion_mask marks real tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


# KL estimators of KL(policy || ref) from samples of the policy; log_r = ref_logprobs - logprobs (Schulman, "Approximating
# KL divergence"). k3 is unbiased and always >= 0 (DeepSeekMath's choice).

def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs  # (B, T)  -log r


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_r = ref_logprobs - logprobs  # (B, T)
    return 0.5 * log_r**2  # (B, T)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_r = ref_logprobs - logprobs  # (B, T)
    return torch.exp(log_r) - log_r - 1  # (B, T)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of values where mask is 1; 0 where there is nothing to average."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# Aggregators: per-token loss (B, T) -> scalar. `ctx` holds the optional global normalisers.

def _agg_grpo(per_token: Tensor, mask: Tensor, ctx: dict) -> Tensor:
    per_seq = masked_mean(per_token, mask, dim=1)  # (B,)
    return per_seq.sum() / (ctx["num_sequences"] or per_token.shape[0])


def _agg_bnpo(per_token: Tensor, mask: Tensor, ctx: dict) -> Tensor:
    return masked_mean(per_token, mask)


def _agg_dr_grpo(per_token: Tensor, mask: Tensor, ctx: dict) -> Tensor:
    if ctx["max_completion_length"] is None:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the rollout's max_new_tokens)")
    num_sequences = ctx["num_sequences"] or per_token.shape[0]
    return (per_token * mask).sum() / (num_sequences * ctx["max_completion_length"])


def _agg_dapo(per_token: Tensor, mask: Tensor, ctx: dict) -> Tensor:
    num_items = ctx["num_items_in_batch"]
    if num_items is None:
        num_items = mask.sum()  # single call: the local batch is the global batch
    num_items = torch.as_tensor(num_items, dtype=per_token.dtype, device=per_token.device).clamp(min=1)
    return (per_token * mask).sum() / num_items


AGGREGATORS: dict[str, Callable[[Tensor, Tensor, dict], Tensor]] = {
    "grpo": _agg_grpo,
    "bnpo": _agg_bnpo,
    "dr_grpo": _agg_dr_grpo,
    "dapo": _agg_dapo,
    "gspo": _agg_grpo,  # the per-sequence ratio is broadcast over tokens, so a per-sequence mean is the paper's
}


def token_log_ratio(logprobs: Tensor, old_logprobs: Tensor, completion_mask: Tensor) -> Tensor:
    return logprobs - old_logprobs  # (B, T)


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, completion_mask: Tensor) -> Tensor:
    """GSPO: log s_i = mean over the sequence's tokens of (logprobs - old_logprobs), the same for every token."""
    per_seq = masked_mean(logprobs - old_logprobs, completion_mask, dim=1)  # (B,)
    return per_seq.unsqueeze(1).expand_as(logprobs)  # (B, T)


# Which importance ratio each loss type uses.
LOG_RATIOS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "grpo": token_log_ratio,
    "bnpo": token_log_ratio,
    "dr_grpo": token_log_ratio,
    "dapo": token_log_ratio,
    "gspo": sequence_log_ratio,
}


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO-family loss.

    logprobs [B, T] (with grad), old_logprobs [B, T] or None (= logprobs.detach(): one update per rollout),
    ref_logprobs [B, T] or None (needed when beta > 0), advantages [B], completion_mask [B, T].
    Returns (loss scalar, metrics) where metrics are detached scalars over the local batch: policy_loss, kl,
    clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean, ratio/mean.
    """
    if loss_type not in AGGREGATORS:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(AGGREGATORS)}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    if logprobs.dim() != 2 or completion_mask.shape != logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and completion_mask {tuple(completion_mask.shape)} "
                         "must both be [B, T]")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match logprobs {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] = [{logprobs.shape[0]}]")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (log-probs of the completions under the reference model)")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    mask = completion_mask.to(logprobs.dtype)  # (B, T)
    ctx = {"max_completion_length": max_completion_length, "num_items_in_batch": num_items_in_batch,
           "num_sequences": num_sequences}

    log_ratio = LOG_RATIOS[loss_type](logprobs, old_logprobs, mask)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)  # (B, T)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # (B, 1)
    surrogate = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    aggregate = AGGREGATORS[loss_type]
    policy_term = aggregate(surrogate, mask, ctx)  # ()

    if beta > 0:
        kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs)  # (B, T)
        loss = aggregate(surrogate + beta * kl, mask, ctx)  # ()
    else:
        kl = None
        loss = policy_term

    with torch.no_grad():
        # A token is "clipped" when the clip removed its gradient: ratio beyond the bound on the side the advantage
        # pushes it (TRL's definitions, so dashboards compare).
        low = (ratio < 1 - epsilon) & (adv < 0)  # (B, T)
        high = (ratio > 1 + epsilon_high) & (adv > 0)  # (B, T)
        metrics = {
            "policy_loss": policy_term.detach(),
            "kl": masked_mean(kl, mask).detach() if kl is not None else torch.zeros((), dtype=logprobs.dtype),
            "clip_ratio/low_mean": masked_mean(low.to(mask.dtype), mask),
            "clip_ratio/high_mean": masked_mean(high.to(mask.dtype), mask),
            "clip_ratio/region_mean": masked_mean((low | high).to(mask.dtype), mask),
            "ratio/mean": masked_mean(ratio.detach(), mask),
        }
    return loss, metrics
