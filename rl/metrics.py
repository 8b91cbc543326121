"""The numbers a training step logs, reduced over every rank: reward and length statistics of the rollout, and what
an update accumulates over its micro-batches (token-weighted loss metrics, expert load, routing drift).

Every reduction goes through rl.distributed.Collectives, and every rank reduces the same keys in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from thinkzero.rl.batch import RolloutBatch, StepBatch
from thinkzero.rl.distributed import Collectives
from thinkzero.rl.loss import masked_mean


def expert_load_cv(counts: torch.Tensor) -> float:
    """Coefficient of variation of tokens per expert (0 = perfectly balanced)."""
    counts = counts.double()
    mean = counts.mean()
    return float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0


def routing_mismatches(chosen: torch.Tensor, sampled: torch.Tensor, Tp: int, mask: torch.Tensor) -> torch.Tensor:
    """Completion tokens whose set of top-k experts differs between two routings (B, Tp + Tc, k) (); mask (B, Tc)."""
    differs = (chosen[:, Tp:].sort(dim=-1).values != sampled[:, Tp:].sort(dim=-1).values).any(dim=-1)  # (B, Tc)
    return (differs & mask.bool()).sum()


def without_last_token(mask: torch.Tensor) -> torch.Tensor:
    """The completion mask (B, Tc) without each row's last token: no engine feeds the last sampled token back through
    the model, so its routing is never computed (its logits predict past the completion and are never trained)."""
    keep = mask.clone()
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()  # (B,)
    keep[torch.arange(mask.shape[0], device=mask.device), last] = 0
    return keep


def rollout_metrics(dist: Collectives, per_function: dict[str, list], batch: RolloutBatch) -> dict[str, float]:
    """Per-reward mean and std over the judged samples, and completion lengths, over all ranks."""
    metrics = {}
    for name, values in per_function.items():
        judged = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
        s, s2, n = dist.sum(judged.sum()), dist.sum((judged ** 2).sum()), dist.sum(len(judged))
        mean = s / n if n else float("nan")
        metrics[f"rewards/{name}/mean"] = mean
        metrics[f"rewards/{name}/std"] = math.sqrt(max(0.0, s2 / n - mean ** 2)) if n else float("nan")
    lengths = batch.lengths.float()
    metrics["completions/mean_length"] = dist.sum(lengths.sum()) / dist.sum(len(lengths))
    metrics["completions/max_length"] = dist.max(float(lengths.max()))
    metrics["completions/clipped_ratio"] = dist.sum(sum(f == "length" for f in batch.finish_reasons)) / \
        dist.sum(len(lengths))
    return metrics


@dataclass
class UpdateMetrics:
    """What one update accumulates over its micro-batches, before the cross-rank reductions."""

    moe_layers: int
    num_experts: int
    sums: dict[str, float] = field(default_factory=dict)  # token-weighted loss metrics
    extremes: dict[str, float] = field(default_factory=dict)  # running *_min / *_max metrics
    tokens: float = 0.0
    loss: float = 0.0  # each micro-batch's share of its global mini-batch loss, added up
    grad_norms: list = field(default_factory=list)  # one per optimizer step (None: DeepSpeed reported none)
    expert_counts: list[torch.Tensor] = field(default_factory=list)  # per MoE layer (num_experts,)
    routing_mismatches: list[float] = field(default_factory=list)  # per MoE layer, in the update's first forwards
    routing_tokens: float = 0.0

    def __post_init__(self):
        self.expert_counts = [torch.zeros(self.num_experts, dtype=torch.float64) for _ in range(self.moe_layers)]
        self.routing_mismatches = [0.0] * self.moe_layers

    def add(self, metrics: dict, entropy: torch.Tensor, mask: torch.Tensor) -> None:
        """One micro-batch's loss metrics (means over its tokens) and entropy (B, Tc), weighted by its tokens."""
        n_tok = float(mask.sum())
        self.tokens += n_tok
        for k, v in metrics.items():
            if not k.endswith(("_min", "_max")):
                self.sums[k] = self.sums.get(k, 0.0) + float(v) * n_tok
            elif n_tok:  # a micro-batch without tokens saw nothing (its min / max read as a neutral 1)
                pick = min if k.endswith("_min") else max
                self.extremes[k] = pick(self.extremes.get(k, float(v)), float(v))
        self.sums["entropy"] = self.sums.get("entropy", 0.0) + float(masked_mean(entropy.detach(), mask)) * n_tok

    def add_routing(self, chosen: list[torch.Tensor] | None, rb: RolloutBatch, rows: slice, first_pass: bool) -> None:
        """The experts a micro-batch's forward picked (per MoE layer (B, Tp + Tc, k)): load of real tokens only
        (padding is routed too, and how much there is depends on the batch composition, so on the number of
        processes); in the update's first pass, the completion tokens routed unlike the rollout (0 under replay)."""
        real = rb.attention_mask[rows].bool().cpu()  # (B, Tp + Tc)
        for counts, layer in zip(self.expert_counts, chosen or []):
            counts += torch.bincount(layer.cpu()[real].flatten(), minlength=counts.numel()).double()
        if first_pass and chosen and rb.routing is not None:
            completion = without_last_token(rb.completion_mask[rows])
            for i, (layer, sampled) in enumerate(zip(chosen, rb.routing)):
                self.routing_mismatches[i] += float(
                    routing_mismatches(layer, sampled[rows], rb.prompt_ids.shape[1], completion))
            self.routing_tokens += float(completion.sum())

    def reduce(self, dist: Collectives, routed: bool) -> tuple[dict[str, float], list[torch.Tensor]]:
        """(metrics over all ranks, global expert counts per MoE layer). `routed`: the rollout carried routing."""
        tokens = max(dist.sum(self.tokens), 1.0)
        metrics = {k: dist.sum(v) / tokens for k, v in self.sums.items()}
        for k, v in self.extremes.items():
            metrics[k] = -dist.max(-v) if k.endswith("_min") else dist.max(v)
        metrics["policy_loss"] = dist.sum(self.loss) / len(self.grad_norms)  # averaged over the optimizer steps
        finite = [g for g in self.grad_norms if g is not None and math.isfinite(g)]
        metrics["grad_norm"] = float(np.mean(finite)) if finite else float("nan")
        global_counts = [dist.gather_sum(c) for c in self.expert_counts]
        for i, counts in enumerate(global_counts):
            metrics[f"moe/expert_load_cv/layer{i}"] = expert_load_cv(counts)
        if routed and self.moe_layers:
            total = max(dist.sum(self.routing_tokens), 1.0)
            metrics["moe/routing_mismatch_frac"] = float(np.mean([dist.sum(n) / total
                                                                  for n in self.routing_mismatches]))
        return metrics, global_counts


def completion_rows(step: StepBatch, limit: int) -> list[dict]:
    """The first `limit` completions of a step as table rows: prompt, completion, advantage, each reward, total."""
    rows = []
    for i in range(min(limit, len(step.texts))):
        row = {"prompt": step.examples[i]["prompt"], "completion": step.texts[i],
               "advantage": float(step.advantages[i])}
        for name, values in step.per_function.items():
            row[name] = values[i]
        row["reward"] = float(step.rewards[i])
        rows.append(row)
    return rows
