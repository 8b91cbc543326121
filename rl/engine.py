"""The rollout engine seam: who samples the completions a training step learns from.

The trainer only ever calls `sample`, `sync_weights` and `close`, so an engine can be our own sampler (model.generate,
through rl.rollout) or an inference server such as vLLM (rl.vllm_engine). `build_engine` picks one by
`rollout.engine`. Sampling is seeded per prompt (`seeds`, one int per prompt): what a prompt samples does not depend on
which rank holds it or on how many prompts share its batch.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn

from thinkzero.model.generate import SamplingParams
from thinkzero.rl.batch import RolloutBatch
from thinkzero.rl.config import Config
from thinkzero.rl.hf_policy import HFCausalLM, HFGenerateEngine, check_engine
from thinkzero.rl.rollout import rollout


def sampling_seed(seed: int, step: int, draw: int, prompt_index: int) -> int:
    """A well-mixed 63-bit seed for one prompt's sampling stream."""
    words = np.random.SeedSequence([seed % 2**64, step, draw, prompt_index]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class RolloutEngine(Protocol):
    def sample(self, prompts: list[list[int]], num_generations: int, params: SamplingParams,
               seeds: list[int]) -> RolloutBatch:
        """`num_generations` completions of every prompt (token ids, already templated), prompt p drawing from a
        stream seeded by seeds[p]."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Called on every rank after every optimizer step that changed the policy's weights."""
        ...

    def close(self) -> None:
        ...


class ThinkzeroEngine:
    """Samples with the training policy itself (rl.rollout): the weights are always current, so sync_weights does
    nothing."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device):
        self.model, self.tokenizer, self.device = model, tokenizer, device

    def sample(self, prompts: list[list[int]], num_generations: int, params: SamplingParams,
               seeds: list[int]) -> RolloutBatch:
        generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        return rollout(self.model, prompts, num_generations, params, generators, decode=self.tokenizer.decode)

    def sync_weights(self, model: nn.Module) -> None:
        pass

    def close(self) -> None:
        pass


def build_engine(cfg: Config, model: nn.Module, tokenizer, device: torch.device) -> RolloutEngine:
    """The engine `cfg.rollout.engine` names, sampling from `model` (the prepared, possibly wrapped, policy)."""
    module = model.module if hasattr(model, "module") else model
    check_engine("transformers" if isinstance(module, HFCausalLM) else "thinkzero", cfg.rollout.engine)
    if cfg.rollout.engine == "transformers":
        return HFGenerateEngine(model, tokenizer, device)
    if cfg.rollout.engine == "vllm":
        from thinkzero.rl.vllm_engine import VLLMEngine  # vLLM is an optional dependency

        return VLLMEngine.from_config(cfg, model, tokenizer, device)
    return ThinkzeroEngine(model, tokenizer, device)
