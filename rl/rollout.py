"""The RL side of sampling: G completions for each prompt from a (possibly wrapped) policy, as one tensor batch.

The policy may be a plain module, a DDP wrapper or a DeepSpeed engine. Under ZeRO-3 the parameters are gathered once for
the whole rollout (not per token) and released after. Sampling then runs on a hook-free twin of the module whose
parameters are the gathered tensors (no copy): ZeRO-3's per-module hooks would otherwise re-partition and re-gather
every layer at every decode step, a collective per call, and ranks decode different numbers of steps (rows stop at
EOS), so the collectives would not match and the ranks would hang. Otherwise the unwrapped module samples directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from thinkzero.model.generate import SamplingParams, generate
from thinkzero.rl.batch import RolloutBatch


def _is_zero3(model: nn.Module) -> bool:
    config = getattr(model, "zero_optimization_stage", None)
    return callable(config) and config() == 3


def _unhooked_twin(module: nn.Module) -> nn.Module:
    """A module of the same class and config whose parameters and buffers ARE those of `module` (shared storage),
    built on the meta device so nothing is allocated, and carrying none of `module`'s hooks."""
    with torch.device("meta"):
        twin = type(module)(module.config)
    shared: dict[int, nn.Parameter] = {}  # tied weights (lm_head = embed_tokens) stay one tensor in the twin
    for name, param in module.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        twin_param = shared.setdefault(id(param), nn.Parameter(param.data, requires_grad=False))
        setattr(twin.get_submodule(owner), leaf, twin_param)
    for name, buffer in module.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(owner), leaf, buffer)
    return twin.eval()


@contextlib.contextmanager
def policy_for_sampling(model: nn.Module) -> Iterator[nn.Module]:
    """The bare policy module, in eval mode with full parameters, for the duration of a rollout."""
    module = model.module if hasattr(model, "module") else model
    if _is_zero3(model):
        import deepspeed  # only needed (and only importable cheaply) when DeepSpeed is in use

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None), torch.no_grad():
            twin = _unhooked_twin(module)
            try:
                yield twin
            finally:
                del twin  # drop the references to the gathered tensors before they are released
        return
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def rollout(
    model: nn.Module,
    prompts: list[list[int]],
    num_generations: int,
    params: SamplingParams,
    generator: torch.Generator | list[torch.Generator] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> RolloutBatch:
    """Samples `num_generations` completions for every prompt (token ids, already templated) and batches them."""
    with policy_for_sampling(model) as policy:
        out = generate(policy, prompts, num_generations, params, generator=generator, decode=decode)
    n = out.completion_ids.shape[0]
    group_index = torch.arange(len(prompts), device=out.completion_ids.device).repeat_interleave(num_generations)
    return RolloutBatch(
        prompt_ids=out.prompt_ids,
        prompt_mask=out.prompt_mask,
        completion_ids=out.completion_ids,
        completion_mask=out.completion_mask,
        sampling_logprobs=out.sampling_logprobs,
        lengths=out.completion_mask.sum(dim=1),
        finish_reasons=list(out.finish_reasons),
        group_index=group_index[:n],
        routing=out.routing,
    )
