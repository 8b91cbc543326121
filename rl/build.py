"""What a training run is made of, built from its recipe: the policy and reference models, the prompts, the reward
scorer and the sampling parameters. Plain construction, no processes: rl.trainer hands the results to accelerate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import thinkzero.rewards as tzrewards
from thinkzero.model.checkpoint import DTYPES
from thinkzero.model.generate import SamplingParams
from thinkzero.rl import hf_policy
from thinkzero.rl.config import Config
from thinkzero.rl.data import PromptSampler, load_rows, prepare_examples


def write_random_model(cfg: Config) -> None:
    """The recipe's preset written to model.name_or_path with random weights, unless a model is already there."""
    if not (Path(cfg.model.name_or_path) / "config.json").is_file():
        hf_policy.write_random_policy(cfg.model.init_preset, cfg.model.name_or_path, seed=cfg.train.seed)


def load_tokenizer(cfg: Config):
    """The tokenizer of model.tokenizer (default model.name_or_path): ours for our policy, transformers' otherwise."""
    m = cfg.model
    kind = hf_policy.policy_kind(m.name_or_path, m.policy)
    return hf_policy.load_policy_tokenizer(m.tokenizer or m.name_or_path, kind, m.trust_remote_code)


def training_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    dtype = DTYPES[cfg.model.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        # fp32 on CPU: the small models trained there run small ops, which are slower in bf16 (large bf16 matmuls
        # are faster on CPUs with bf16 instructions), and the CPU tests compare exact numbers.
        return torch.float32
    return dtype


def load_policy(cfg: Config, model_path: str, tokenizer, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The policy to train, from `model_path` (the configured model, or the checkpoint resumed from)."""
    m, moe = cfg.model, cfg.algorithm.moe
    policy = hf_policy.load_policy(model_path, dtype, device, m.policy, m.trust_remote_code)
    hf_policy.check_moe_options(policy, moe.aux_loss_coef, moe.router_bias_update_gamma, moe.routing_replay)
    if policy.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{policy.config.vocab_size}; they do not belong together")
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.train()
    # The recipe's aux_loss_coef is the balance loss's one weight. It replaces the checkpoint's aux_loss_alpha
    # (DeepSeek-V2/V3 ship 0.001), which would otherwise be computed in every training forward and then either
    # ignored or multiplied by the coefficient a second time. The saved config.json keeps the checkpoint's value.
    for moe in policy.moe_layers:
        moe.gate.aux_loss_alpha = cfg.algorithm.moe.aux_loss_coef
    if cfg.algorithm.moe.router_bias_update_gamma > 0 and any(
            moe.gate.e_score_correction_bias is None for moe in policy.moe_layers):
        raise ValueError("algorithm.moe.router_bias_update_gamma > 0 needs a router with a correction bias "
                         "(DeepSeek-V3 topk_method 'noaux_tc'); this model's router has none: set it to 0")
    return policy


def load_reference(cfg: Config, dtype: torch.dtype, device: torch.device) -> nn.Module | None:
    """The frozen reference model for the KL term; none at all with beta == 0."""
    m = cfg.model
    if cfg.algorithm.beta == 0:
        return None
    return hf_policy.load_policy(m.ref_model or m.name_or_path, dtype, "cpu" if m.ref_model_on_cpu else device,
                                 m.policy, m.trust_remote_code).requires_grad_(False)


@dataclass
class Prompts:
    examples: list[dict]  # the training prompts, templated and tokenized
    columns: list[str]  # every column a reward may ask for
    sampler: PromptSampler  # this rank's slice of each global batch
    eval_examples: list[dict] | None
    dropped: int  # prompts left out as longer than data.max_prompt_length


def load_prompts(cfg: Config, tokenizer, rank: int, world_size: int) -> Prompts:
    """Every rank builds the same sampler and takes its slice of each global batch."""
    d = cfg.data
    prepare = {"prompt_column": d.prompt_column, "answer_column": d.answer_column, "template": d.template,
               "system_prompt": d.system_prompt, "max_prompt_length": d.max_prompt_length}
    examples, dropped = prepare_examples(load_rows(d.source, d.config_name, d.split), tokenizer, **prepare)
    # prompt_text lets the format rewards see a <think> the template opened
    columns = sorted({k for k in examples[0] if k != "prompt_ids"})
    sampler = PromptSampler(examples, cfg.rollout.prompts_per_step, seed=cfg.train.seed, shuffle=d.shuffle,
                            rank=rank, world_size=world_size)
    eval_examples = None
    if d.eval_split is not None:
        eval_rows = load_rows(d.eval_source or d.source, d.config_name, d.eval_split)
        eval_examples = prepare_examples(eval_rows, tokenizer, **prepare)[0][: d.eval_max_examples]
    return Prompts(examples, columns, sampler, eval_examples, dropped)


def build_scorer(cfg: Config, columns: list[str]) -> tzrewards.Scorer:
    rw = cfg.rewards
    for module in rw.modules:  # user modules whose @reward functions the recipe names
        tzrewards.load_module(module)
    return tzrewards.Scorer(
        [{"name": f.name, "weight": f.weight, "params": f.params} for f in rw.functions],
        num_workers=rw.num_workers, timeout_s=rw.timeout_s, fallback=rw.fallback,
        max_consecutive_timeouts=rw.max_consecutive_timeouts,
        columns=columns + ["prompt", "completion_ids", "num_tokens", "finish_reason"])


def sampling_params(cfg: Config, tokenizer, moe_layers: int) -> SamplingParams:
    r = cfg.rollout
    pad = tokenizer.pad_token_id
    return SamplingParams(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        eos_token_ids=() if r.ignore_eos else tuple(i for i in (tokenizer.eos_token_id,) if i is not None),
        stop_strings=tuple(r.stop_strings), pad_token_id=pad if pad is not None else (tokenizer.eos_token_id or 0),
        # The rollout's experts: for replay, and with vLLM (whose kernels may route differently from ours) so the
        # update can report how far its routing drifted (moe/routing_mismatch_frac).
        return_routing=moe_layers > 0 and (cfg.algorithm.moe.routing_replay or r.engine == "vllm"))
