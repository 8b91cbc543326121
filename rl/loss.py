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

Rollout correction (`rollout_correction`, Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training"): the rollout engine's log-probs differ from the trainer's (kernels, precision, batch shapes),
so the samples come from pi_rollout, not pi_old. TIS weights each token's surrogate by min(pi_old / pi_rollout, cap);
MIS drops the tokens (or sequences) whose ratio leaves [1 / cap, cap].

Shapes: B sequences, T completion tokens (right-padded; completion_mask marks real tokens).
"""

from __future__ import annotations

import math
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
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO-family loss.

    logprobs [B, T] (with grad), old_logprobs [B, T] or None (= logprobs.detach(): one update per rollout),
    ref_logprobs [B, T] or None (needed when beta > 0), advantages [B], completion_mask [B, T],
    token_weights [B, T] or None: detached weights on each token's surrogate (TIS, from `rollout_correction`),
    applied before the loss type's reduction; the normalisers and the KL term are unchanged.
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
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("token_weights", token_weights)):
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
    if token_weights is not None:
        # Only the surrogate is an expectation over the rollout's samples that the weights correct; the KL to the
        # reference is a regulariser (TRL and verl weight the same term).
        surrogate = surrogate * token_weights  # (B, T)
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


# Rollout correction. A ratio r = pi_old(y) / pi_rollout(y) per token; at level "sequence" one ratio per sequence,
# the product of its token ratios (a sum of log-ratios: the product itself under- or overflows on long sequences).

def _token_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    return log_ratio * mask  # (B, T)


def _sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    return (log_ratio * mask).sum(dim=1, keepdim=True).expand_as(log_ratio)  # (B, T)


CORRECTION_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token": _token_log_ratio,
    "sequence": _sequence_log_ratio,
}


# A mode: (log r (B, T), mask (B, T), log cap) -> (weights or None, tokens kept (B, T) or None, metrics).

def _correct_none(log_ratio: Tensor, mask: Tensor, log_cap: float):
    return None, None, {}


def _correct_tis(log_ratio: Tensor, mask: Tensor, log_cap: float):
    # min(r, cap) = exp(min(log r, log cap)): no overflow whatever the sequence's length.
    weights = torch.exp(torch.clamp(log_ratio, max=log_cap))  # (B, T)
    truncated = (log_ratio > log_cap).to(mask.dtype)  # (B, T)
    return weights, None, {"mismatch/truncated_frac": masked_mean(truncated, mask)}


def _correct_mis(log_ratio: Tensor, mask: Tensor, log_cap: float):
    keep = (log_ratio.abs() <= log_cap).to(mask.dtype)  # (B, T)  r in [1 / cap, cap]
    return None, keep, {"mismatch/masked_frac": masked_mean(1 - keep, mask)}


CORRECTIONS: dict[str, Callable[[Tensor, Tensor, float], tuple]] = {
    "none": _correct_none,
    "tis": _correct_tis,
    "mis": _correct_mis,
}

# exp(20) = 4.9e8, beyond any useful cap: keeps the ratio metrics finite when a long sequence's product overflows.
_METRIC_MAX_LOG_RATIO = 20.0


def rollout_correction(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, mode: str, level: str,
                       cap: float) -> tuple[Tensor | None, Tensor, dict[str, Tensor]]:
    """(B, T) tensors -> (token_weights or None, loss mask, metrics); nothing here carries gradient.

    mode "none": weights None, mask returned as given (diagnostic metrics only). "tis": weights min(r, cap), for
    `policy_loss(token_weights=...)`. "mis": weights None, mask with the tokens (level "token") or whole sequences
    (level "sequence") whose r leaves [1 / cap, cap] set to 0.
    Metrics, masked means over the valid tokens (sequence level: each sequence's r counts once per token):
    mismatch/abs_logprob_diff_mean, mismatch/kl = KL(rollout || trainer) by the k3 estimator on the rollout's
    samples (exp(log r) - log r - 1 with token log r; unbiased, >= 0), mismatch/ratio_mean, _min, _max, and
    mismatch/truncated_frac (tis) or mismatch/masked_frac (mis).
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown rollout correction mode {mode!r}; choose one of {', '.join(CORRECTIONS)}")
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"unknown rollout correction level {level!r}; choose one of {', '.join(CORRECTION_LEVELS)}")
    if not cap > 1:
        raise ValueError(f"rollout correction cap must be > 1; got {cap}")
    if old_logprobs.shape != rollout_logprobs.shape or mask.shape != old_logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)}, rollout_logprobs "
                         f"{tuple(rollout_logprobs.shape)} and mask {tuple(mask.shape)} must all be the same [B, T]")
    with torch.no_grad():
        mask_f = mask.to(old_logprobs.dtype)  # (B, T)
        token_log_ratio = (old_logprobs - rollout_logprobs).detach()  # (B, T)  log r per token
        log_ratio = CORRECTION_LEVELS[level](token_log_ratio, mask_f)  # (B, T)
        weights, keep, metrics = CORRECTIONS[mode](log_ratio, mask_f, math.log(cap))
        loss_mask = mask if keep is None else mask * keep.to(mask.dtype)
        valid = mask_f > 0
        ratio = torch.exp(log_ratio.clamp(-_METRIC_MAX_LOG_RATIO, _METRIC_MAX_LOG_RATIO))  # (B, T)
        # min / max over nothing (an all-padding batch) read as 1: no mismatch seen.
        one = torch.ones((), dtype=ratio.dtype, device=ratio.device)
        metrics = {
            "mismatch/abs_logprob_diff_mean": masked_mean(token_log_ratio.abs(), mask_f),
            "mismatch/kl": masked_mean(kl_k3(rollout_logprobs.detach(), old_logprobs.detach()), mask_f),
            "mismatch/ratio_mean": masked_mean(ratio, mask_f),
            "mismatch/ratio_min": ratio[valid].min() if valid.any() else one,
            "mismatch/ratio_max": ratio[valid].max() if valid.any() else one,
            **metrics,
        }
    return weights, loss_mask, metrics
