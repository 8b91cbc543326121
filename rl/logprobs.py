"""The log-prob passes of a training step: the completion tokens' log-probs of a batch's rows under a policy, and the
old and reference log-probs computed once per rollout, before the update.

Rows are prompt-major (G per prompt), so a block of rows that lies within one prompt's group shares its prompt: the
forward then computes that prompt once per block (`shared_prefix`), with the same numbers as the plain forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from thinkzero.rl.batch import RolloutBatch, StepBatch
from thinkzero.rl.rollout import policy_for_sampling


def completion_logprobs(module: nn.Module, rb: RolloutBatch, rows: slice, *, num_generations: int,
                        temperature: float, first_row: int | None = None, routing: bool = False,
                        return_routing: bool = False, compute_entropy: bool = False):
    """Log-probs of the completion tokens of the given rows under `module` (B, Tc), their entropy, and the forward's
    output. `first_row`: the index of rows' first row in the step's batch when `rb` is already a slice of it;
    `routing`: replay the rollout's experts."""
    input_ids = rb.input_ids[rows]  # (B, Tp + Tc)
    mask = rb.attention_mask[rows]  # (B, Tp + Tc)
    Tp = rb.prompt_ids.shape[1]
    replay = [r[rows] for r in rb.routing] if routing and rb.routing is not None else None
    # Aligned blocks of g = gcd(G, rows) rows each lie within one group: the prompt is computed once per group when a
    # micro-batch holds whole groups, once per micro-batch when it holds part of one.
    start = first_row if first_row is not None else rows.start or 0
    g = math.gcd(num_generations, input_ids.shape[0])
    share = g > 1 and start % g == 0
    # Completion token j is predicted at position Tp - 1 + j; only those positions reach the output layer.
    out = module(input_ids, mask, target_ids=rb.completion_ids[rows], target_start=Tp - 1,
                 temperature=temperature or 1.0, routing=replay, return_routing=return_routing,
                 compute_entropy=compute_entropy, shared_prefix=Tp if share else 0, group_size=g if share else 1)
    return out.logprobs, out.entropy, out


@torch.no_grad()
def precompute_logprobs(step: StepBatch, model: nn.Module, ref_model: nn.Module | None, *, micro: int,
                        needs_old: bool, routing_replay: bool, num_generations: int, temperature: float,
                        device: torch.device) -> None:
    """Fills step.old_logprobs (when `needs_old`: the rollout feeds more than one optimizer step) and
    step.ref_logprobs (when there is a reference model), micro-batch by micro-batch."""
    rb = step.rollout
    N = rb.completion_ids.shape[0]
    kwargs = {"num_generations": num_generations, "temperature": temperature}
    if needs_old:
        # A forward under the current policy before the first update, not the engine's sampling log-probs: it is
        # exact (the same computation as the update's first forward, so that ratio is exactly 1), while the sampling
        # ones differ by float noise and by any temperature / top-p / top-k processing. With routing replay it
        # replays the rollout's experts, as the update does.
        replay = routing_replay and rb.routing is not None
        with policy_for_sampling(model) as policy:
            step.old_logprobs = torch.cat([
                completion_logprobs(policy, rb, slice(s, s + micro), routing=replay, **kwargs)[0]
                for s in range(0, N, micro)])
    if ref_model is not None:
        ref_device = next(ref_model.parameters()).device
        step.ref_logprobs = torch.cat([
            completion_logprobs(ref_model, rb.to(ref_device, slice(s, s + micro)), slice(None), first_row=s,
                                **kwargs)[0].to(device)
            for s in range(0, N, micro)])
