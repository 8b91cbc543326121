"""The GRPO training loop, written out: rollout -> rewards -> advantages -> policy update, step after step.

This is the only module that touches accelerate / DeepSpeed. Everything it calls is plain: the sampling engine
(model.generate via rl.rollout), the reward scorer (rewards.Scorer), advantages and losses (rl.advantages, rl.loss).

Data parallelism: every rank samples its own slice of the global prompt batch and owns whole groups, so group
statistics never straddle ranks. Rewards are gathered before advantages are computed, so 'batch' reward scaling and
every logged number are global — they do not depend on the number of processes. Loss normalisers (the dapo token
count, the number of sequences) are global too, and the loss is multiplied by the world size to undo the gradient
averaging of DDP / DeepSpeed, so N processes take the same update as one process on the whole batch. (With several
mini-batches per step, optimizer step k uses every rank's k-th slice, so the step's groups are split into optimizer
steps differently from one process: same data per step, a different order of updates.)

Sampling is seeded per prompt, not per rank: each prompt of a step draws from its own generator seeded by
(train.seed, step, draw, the prompt's index in the global batch). A prompt therefore gets the same completions whichever
rank holds it and however many prompts share its batch, so 1 and N processes sample the same tokens (up to float
rounding of the logits) and a resumed run samples exactly what the straight run did, with no sampling RNG to save.
(Dynamic sampling is the exception: ranks draw extra prompts while any rank still needs groups, so how many extra
draws happen depends on how the groups are split.)

Under ZeRO-3 the rollout gathers the parameters once and samples on a hook-free twin (rl.rollout); the reference model
is a DeepSpeed engine partitioned like the policy (model.ref_model_on_cpu keeps it whole on the CPU instead); MoE
blocks are ZeRO-3 "leaf" modules and every rank pads its batch to the same shapes, so all ranks issue the same
collectives. Checkpoints hold a consolidated Hugging Face model directory plus DeepSpeed's own state for resume.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

import thinkzero.model as tzmodel
import thinkzero.rewards as tzrewards
from thinkzero.model.checkpoint import DTYPES
from thinkzero.model.generate import SamplingParams
from thinkzero.rl import checkpoint as ckpt
from thinkzero.rl.advantages import group_advantages, group_reward_stats, nonconstant_groups
from thinkzero.rl.config import Config, ConfigError, check_world_size, config_to_dict, config_to_yaml
from thinkzero.rl.data import PromptSampler, load_rows, prepare_examples
from thinkzero.rl.faults import kill_point, nan_point
from thinkzero.rl.loss import masked_mean, policy_loss
from thinkzero.rl.optim import adamw, lr_lambda, seed_everything
from thinkzero.rl.batch import RolloutBatch, ScoredRollout, decode_completions
from thinkzero.rl.rollout import policy_for_sampling, rollout
from thinkzero.rl.signals import StopRequest
from thinkzero.rl.tracking import Tracker

# Loss types normalised by each micro-batch's own token count (see rl.loss); the others take global normalisers.
LOCAL_MEAN_LOSSES = ("bnpo",)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite updates in a row); the state was saved first."""


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


class SignalStop(RuntimeError):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint of the last finished step."""


def process_group_kwargs(world_size: int, cuda: bool, timeout_s: float) -> list:
    """The process-group handler for `world_size` processes: none for one process; otherwise a finite timeout, so a
    collective that the ranks do not all reach fails with an error instead of hanging, and on CPU an explicit gloo
    backend (without it each rank silently believes it is alone)."""
    from accelerate.utils import InitProcessGroupKwargs

    if world_size <= 1:
        return []
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if cuda else "gloo"
    return [InitProcessGroupKwargs(backend=backend, timeout=timeout)]


def make_accelerator(timeout_s: float):
    """An Accelerator with the right process group (see process_group_kwargs): NCCL on GPUs, gloo on CPU.

    Plain DDP on CPU also needs `cpu=True`: `accelerate launch` with a MULTI_GPU config starts the processes but does
    not pass the config's `use_cpu` on to them, and without it accelerate reports distributed_type NO (no DDP wrapper,
    barriers that do nothing). DeepSpeed must not get `cpu=True` (accelerate would then drop DeepSpeed)."""
    from accelerate import Accelerator

    _resolve_deepspeed_config_file()
    world_size, cuda = int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available()
    handlers = process_group_kwargs(world_size, cuda, timeout_s)
    cpu = world_size > 1 and not cuda and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)


def _resolve_deepspeed_config_file() -> None:
    """The configs in recipes/accelerate name their DeepSpeed json relative to the repository root; accelerate reads
    it relative to the working directory. Resolve it against the repository when it is not found from here."""
    name = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not name or name == "none" or Path(name).is_file():
        return
    in_repo = Path(__file__).resolve().parents[1] / name
    if not in_repo.is_file():
        raise FileNotFoundError(f"DeepSpeed config file {name!r} (deepspeed_config_file in the accelerate config) "
                                f"exists neither in {os.getcwd()} nor in {in_repo.parent}")
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(in_repo)


def sampling_seed(seed: int, step: int, draw: int, prompt_index: int) -> int:
    """A well-mixed 63-bit seed for one prompt's sampling stream."""
    words = np.random.SeedSequence([seed % 2**64, step, draw, prompt_index]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def expert_load_cv(counts: torch.Tensor) -> float:
    """Coefficient of variation of tokens per expert (0 = perfectly balanced)."""
    counts = counts.double()
    mean = counts.mean()
    return float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0


@dataclass
class StepBatch:
    """What the update needs: the rollout rows this rank trains on, with their advantages and side information."""

    rollout: RolloutBatch
    advantages: torch.Tensor  # (N,)
    rewards: torch.Tensor  # (N,) weighted total
    per_function: dict[str, list]
    texts: list[str]
    examples: list[dict]  # one per row
    old_logprobs: torch.Tensor | None = None  # (N, Tc)
    ref_logprobs: torch.Tensor | None = None  # (N, Tc)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg.train.dist_timeout_s)
        acc = self.accelerator
        self.device = acc.device
        self.world_size = acc.num_processes
        self.rank = acc.process_index
        self.is_main = acc.is_main_process
        check_world_size(cfg, self.world_size)
        self.output_dir = Path(cfg.train.output_dir)
        self.start_notes: list[str] = []  # start-up repairs and resume warnings, logged once the tracker exists
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.start_notes += ckpt.recover(self.output_dir)
        acc.wait_for_everyone()
        seed_everything(cfg.train.seed + self.rank)

        # Rank 0 alone decides whether to write the random model; every rank passes the same barrier whatever it
        # sees on disk (a barrier inside a per-rank file check deadlocks when rank 0 writes before rank 1 looks).
        if cfg.model.init_preset:
            if self.is_main and not (Path(cfg.model.name_or_path) / "config.json").is_file():
                from thinkzero.model.presets import write_random_model

                write_random_model(cfg.model.init_preset, cfg.model.name_or_path, seed=cfg.train.seed)
            acc.wait_for_everyone()
        # Where to start from: a checkpoint (resume) or the configured model.
        self.resume_from, self.resume_state = self._find_resume()
        if self.resume_from:
            self._check_recipe(self.resume_from)
        model_path = str(self.resume_from) if self.resume_from else cfg.model.name_or_path
        dtype = DTYPES[cfg.model.dtype]
        if self.device.type == "cpu" and dtype != torch.float32:
            # fp32 on CPU: the small models trained there run small ops, which are slower in bf16 (large bf16
            # matmuls are several times faster on AVX-512-bf16 CPUs), and the CPU tests compare exact numbers.
            dtype = torch.float32
        self.dtype = dtype
        self.tokenizer = tzmodel.load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
        policy = tzmodel.load_model(model_path, dtype=dtype, device=self.device)
        if policy.config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{policy.config.vocab_size}; they do not belong together")
        if cfg.model.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        policy.train()
        self.moe_layers = len(policy.moe_layers)
        # The recipe's aux_loss_coef is the balance loss's one weight. It replaces the checkpoint's aux_loss_alpha
        # (DeepSeek-V2/V3 ship 0.001), which would otherwise be computed in every training forward and then either
        # ignored or multiplied by the coefficient a second time. The saved config.json keeps the checkpoint's value.
        for moe in policy.moe_layers:
            moe.gate.aux_loss_alpha = cfg.algorithm.moe.aux_loss_coef
        if cfg.algorithm.moe.router_bias_update_gamma > 0 and any(
                moe.gate.e_score_correction_bias is None for moe in policy.moe_layers):
            raise ValueError("algorithm.moe.router_bias_update_gamma > 0 needs a router with a correction bias "
                             "(DeepSeek-V3 topk_method 'noaux_tc'); this model's router has none: set it to 0")

        self.ref_model = None
        if cfg.algorithm.beta > 0:  # with beta == 0 no reference model is loaded at all
            ref_device = "cpu" if cfg.model.ref_model_on_cpu else self.device
            self.ref_model = tzmodel.load_model(cfg.model.ref_model or cfg.model.name_or_path, dtype=dtype,
                                                device=ref_device).eval().requires_grad_(False)

        o = cfg.optim
        self.optimizer = adamw(policy.parameters(), o.lr, o.betas, o.eps, o.weight_decay)
        # The schedule is stepped once per training step (not per optimizer step) and is not handed to accelerate,
        # so warmup_steps means the same thing whatever the mini-batching or the backend.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o.warmup_steps, cfg.train.max_steps, o.schedule, o.min_lr_ratio))

        r, a = cfg.rollout, cfg.algorithm
        self.batch_local = r.batch_size // self.world_size  # completions per step on this rank
        self.mini_local = (a.mini_batch_size or r.batch_size) // self.world_size
        self.micro = a.micro_batch_size or self.mini_local
        self.is_deepspeed = acc.state.deepspeed_plugin is not None
        self.zero3 = self.is_deepspeed and acc.state.deepspeed_plugin.zero_stage == 3
        if self.is_deepspeed:
            self._configure_deepspeed()
        if self.zero3:
            # ZeRO-3 gathers parameters module by module with a collective per call. A token-routed expert is called
            # only when some token picks it, which differs between ranks; gathering each MoE block whole (a "leaf")
            # keeps the collectives in step, and DeepSpeed gives unpicked experts zero gradients.
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(policy, [tzmodel.MoE])
        # Elsewhere nothing is needed for experts no token picked: each layer's experts are stacked in one tensor
        # per projection, so every rank always has a gradient (zero where unpicked) for the same parameters.
        self.model, self.optimizer = acc.prepare(policy, self.optimizer)
        if self.is_deepspeed:
            # DeepSpeed's TorchCheckpointEngine unpickles with weights_only=False; every file it reads goes through
            # our safe loader instead (saving is unchanged).
            self.model.checkpoint_engine.load = _safe_deepspeed_load
        if self.zero3 and self.ref_model is not None and not cfg.model.ref_model_on_cpu:
            self.ref_model = self._partition_reference(self.ref_model)

        # Data: every rank builds the same sampler and takes its slice of each global batch.
        d = cfg.data
        rows = load_rows(d.source, d.config_name, d.split)
        self.examples, dropped = prepare_examples(
            rows, self.tokenizer, prompt_column=d.prompt_column, answer_column=d.answer_column, template=d.template,
            system_prompt=d.system_prompt, max_prompt_length=d.max_prompt_length)
        # every column a reward may ask for; prompt_text lets the format rewards see a <think> the template opened
        self.columns = sorted({k for k in self.examples[0] if k != "prompt_ids"})
        self.sampler = PromptSampler(self.examples, r.prompts_per_step, seed=cfg.train.seed, shuffle=d.shuffle,
                                     rank=self.rank, world_size=self.world_size)
        self.eval_examples = None
        if d.eval_split is not None:
            eval_rows = load_rows(d.eval_source or d.source, d.config_name, d.eval_split)
            self.eval_examples, _ = prepare_examples(
                eval_rows, self.tokenizer, prompt_column=d.prompt_column, answer_column=d.answer_column,
                template=d.template, system_prompt=d.system_prompt, max_prompt_length=d.max_prompt_length)
            self.eval_examples = self.eval_examples[: d.eval_max_examples]

        for module in cfg.rewards.modules:  # user modules whose @reward functions the recipe names
            tzrewards.load_module(module)
        self.scorer = tzrewards.Scorer(
            [{"name": f.name, "weight": f.weight, "params": f.params} for f in cfg.rewards.functions],
            num_workers=cfg.rewards.num_workers, timeout_s=cfg.rewards.timeout_s, fallback=cfg.rewards.fallback,
            max_consecutive_timeouts=cfg.rewards.max_consecutive_timeouts,
            columns=self.columns + ["prompt", "completion_ids", "num_tokens", "finish_reason"])
        self.sampling = SamplingParams(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            eos_token_ids=() if r.ignore_eos else tuple(i for i in (self.tokenizer.eos_token_id,) if i is not None),
            stop_strings=tuple(r.stop_strings), pad_token_id=self._pad_id(),
            return_routing=a.moe.routing_replay and self.moe_layers > 0)

        self.step = 0
        self.consecutive_skips = 0
        self.skipped_updates = 0
        self.reward_failures: dict[str, int] = {}
        run_id = None
        if self.resume_from:
            run_id = self._load_state(self.resume_from, self.resume_state)
        self.saved_step = self.step if self.resume_from else None  # the step whose checkpoint is on disk
        # The run has started: only now replace another run's files and record what this run is.
        if self.is_main:
            if cfg.train.resume == "none" and cfg.train.overwrite_output_dir:
                for old in ckpt.list_checkpoints(self.output_dir):
                    ckpt.remove(old)
            (self.output_dir / "config.yaml").write_text(config_to_yaml(cfg))
        self.tracker = Tracker(
            self.output_dir, is_main=self.is_main, config=config_to_dict(cfg), project=cfg.logging.project,
            entity=cfg.logging.entity, run_name=cfg.logging.run_name, tags=cfg.logging.tags,
            group=cfg.logging.group, mode=cfg.logging.mode, run_id=run_id, console=cfg.logging.console,
            total_steps=cfg.train.max_steps, start_step=self.step)
        if dropped:
            self.tracker.write(f"dropped {dropped} prompts longer than max_prompt_length={d.max_prompt_length}")
        for note in self.start_notes:
            self.tracker.write(note)
        if self.resume_from:
            self.tracker.write(f"resumed from {self.resume_from} at step {self.step}")

    # ---- setup helpers ------------------------------------------------------------------------------------------

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def _find_resume(self) -> tuple[Path | None, dict | None]:
        """The checkpoint to start from and its trainer state. resume=auto takes the newest one whose state loads,
        skipping (with a warning) any that are truncated or damaged; a file that could run code stops the run."""
        resume = self.cfg.train.resume
        if resume == "none":
            previous = ckpt.list_checkpoints(self.output_dir)
            metrics = self.output_dir / "metrics.jsonl"
            if (previous or (metrics.is_file() and metrics.stat().st_size)) and not self.cfg.train.overwrite_output_dir:
                what = previous[-1].name if previous else "metrics.jsonl"
                raise ConfigError(f"train.output_dir {str(self.output_dir)!r} already holds another run ({what}); "
                                  "continue it with train.resume=auto, replace it with "
                                  "train.overwrite_output_dir=true, or choose another train.output_dir")
            return None, None
        if resume == "auto":
            for path in reversed(ckpt.list_checkpoints(self.output_dir)):
                try:
                    return path, ckpt.read_state(path)
                except ckpt.CorruptCheckpointFile as e:
                    self.start_notes.append(f"warning: skipped {path.name} for resume: {e}")
            return None, None
        path = Path(resume)
        if not (path / ckpt.COMPLETE).is_file():
            raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint directory "
                                    f"(no {ckpt.COMPLETE} marker)")
        return path, ckpt.read_state(path)

    def _check_recipe(self, path: Path) -> None:
        """Compares the recipe with the one the checkpoint was written with; see rl.checkpoint.REFUSED for which
        changes stop the resume and which are applied (with a warning)."""
        saved = ckpt.read_config(path)
        if saved is None:
            return
        refused, applied = ckpt.config_changes(saved, config_to_dict(self.cfg))
        if refused:
            raise ConfigError(f"cannot resume from {path} with a recipe that changes {'; '.join(refused)} (the "
                              "checkpoint would not mean the same thing); restore those values, or start a new run "
                              "in another train.output_dir")
        if applied:
            self.start_notes.append(f"warning: resuming with a changed recipe, applied: {'; '.join(applied)}")

    def _configure_deepspeed(self) -> None:
        """Fills DeepSpeed's batch settings from ours: we call backward once per micro-batch and step once per
        mini-batch, so DeepSpeed's accumulation count is the number of micro-batches in a mini-batch."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        self.ds_accumulation = self.mini_local // self.micro
        ds["train_micro_batch_size_per_gpu"] = self.micro
        ds["gradient_accumulation_steps"] = self.ds_accumulation
        ds["train_batch_size"] = self.micro * self.ds_accumulation * self.world_size
        ds["gradient_clipping"] = self.cfg.optim.max_grad_norm or 0.0
        if ds.get("bf16", {}).get("enabled") == "auto":
            ds["bf16"]["enabled"] = self.accelerator.mixed_precision == "bf16"
        if ds.get("fp16", {}).get("enabled") == "auto":
            ds["fp16"]["enabled"] = self.accelerator.mixed_precision == "fp16"

    def _partition_reference(self, ref_model: nn.Module) -> nn.Module:
        """Under ZeRO-3 the reference model is partitioned like the policy: a DeepSpeed engine without optimizer that
        gathers each module's parameters for its forward (model.ref_model_on_cpu keeps a full copy on the CPU)."""
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        zero = {k: v for k, v in ds["zero_optimization"].items() if k.startswith("stage3_") or k == "stage"}
        config = {k: ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                     "train_batch_size", "bf16", "fp16") if k in ds}
        config["zero_optimization"] = zero
        set_z3_leaf_modules(ref_model, [tzmodel.MoE])
        engine = deepspeed.initialize(model=ref_model, config=config)[0]
        engine.eval()  # the engine's eval() returns None, unlike nn.Module's
        return engine

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ---- the loop -----------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Trains to train.max_steps. On SIGTERM / SIGINT (rl.signals) it stops at the next step boundary — after
        the optimizer step in progress, or abandoning the rollout in progress — saves, and raises SignalStop."""
        cfg = self.cfg
        try:
            with StopRequest() as stop:
                while self.step < cfg.train.max_steps and not self._stop_agreed(stop):
                    metrics = self.train_step(stop)
                    if metrics is None:  # stopped between rollout and update: the step was abandoned
                        break
                    self.step += 1
                    if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.max_steps:
                        self.tracker.log(metrics, self.step)
                    if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.eval_examples:
                        self.tracker.log(self.evaluate(), self.step)
                    if cfg.train.save_every and self.step % cfg.train.save_every == 0 and \
                            self.step < cfg.train.max_steps:
                        self.save()
                if self.saved_step != self.step:  # a resumed run with nothing left to do keeps its checkpoint as is
                    self.save()
                if stop.signal_name and self.step < cfg.train.max_steps:
                    where = ckpt.checkpoint_dir(self.output_dir, self.step)
                    raise SignalStop(f"{stop.signal_name}: saved {where} at step {self.step}; continue with "
                                     "train.resume=auto")
        finally:
            self.tracker.close()
            self.scorer.close()

    def _stop_agreed(self, stop: StopRequest | None) -> bool:
        """Whether any rank got a stop signal (one tiny collective, so every rank stops at the same step)."""
        return self._max(stop is not None and stop.signal_name is not None) > 0

    def train_step(self, stop: StopRequest | None = None) -> dict[str, float] | None:
        """One training step; None when a stop signal came during the rollout: the step is abandoned and the data
        position, RNGs and counters are put back as they were, so the checkpoint saved next is that of the last
        finished step and a resume samples this step again exactly."""
        t_start = time.perf_counter()
        before = (self.sampler.state_dict(), ckpt.rng_state(None), dict(self.reward_failures))
        batch, timing, sample_metrics = self.collect()
        if self._stop_agreed(stop):
            self.sampler.load_state_dict(before[0])
            ckpt.set_rng_state(before[1], None)
            self.reward_failures = before[2]
            return None
        t_update = time.perf_counter()
        update_metrics = self.update(batch)
        with warnings.catch_warnings():
            # The schedule counts training steps; when a step's update was skipped as non-finite torch warns that
            # the scheduler stepped without the optimizer, which is what we mean.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        timing["timing/update_s"] = time.perf_counter() - t_update
        step_s = time.perf_counter() - t_start
        tokens = self._sum(batch.rollout.lengths.sum())
        metrics = {**sample_metrics, **update_metrics, **timing, "timing/step_s": step_s,
                   "throughput/tokens_per_s": tokens / max(timing["timing/rollout_s"], 1e-9),
                   "learning_rate": self.scheduler.get_last_lr()[0]}
        every = self.cfg.logging.completions_every
        if every and (self.step + 1) % every == 0:
            self._log_completions(batch)
        return metrics

    # ---- sampling and scoring ------------------------------------------------------------------------------------

    def _prompt_generators(self, num_prompts: int, draw: int) -> list[torch.Generator]:
        """One sampling generator per prompt of this rank's slice of a draw, seeded by (seed, step, draw, the prompt's
        index in the global draw): what a prompt samples depends on which prompt it is, not on which rank holds it or
        on any RNG state, so runs agree across process counts and resume exactly without saving sampling state."""
        first = self.rank * num_prompts  # every rank holds an equal, contiguous slice of each global draw
        return [torch.Generator(device=self.device).manual_seed(
            sampling_seed(self.cfg.train.seed, self.step, draw, first + i)) for i in range(num_prompts)]

    def _sample(self, examples: list[dict], draw: int = 0) -> tuple[ScoredRollout, float, float]:
        """G completions per example, decoded and scored. Returns (scored rollout, rollout_s, reward_s)."""
        G = self.cfg.rollout.num_generations
        t0 = time.perf_counter()
        batch = rollout(self.model, [ex["prompt_ids"] for ex in examples], G, self.sampling,
                        self._prompt_generators(len(examples), draw), decode=self.tokenizer.decode)
        kill_point("rollout", self.step + 1)
        t1 = time.perf_counter()
        ids, texts = decode_completions(batch, self.tokenizer)
        rows = [examples[i] for i in batch.group_index.tolist()]
        columns = {c: [row.get(c) for row in rows] for c in self.columns}
        facts = {"prompt": [row["prompt"] for row in rows], "completion_ids": ids, "num_tokens": batch.lengths.tolist(),
                 "finish_reason": batch.finish_reasons}
        scores = self.scorer.score(texts, columns=columns, facts=facts)
        kill_point("scoring", self.step + 1)
        self._count_failures(scores)
        return ScoredRollout(batch, texts, scores, examples), t1 - t0, time.perf_counter() - t1

    def collect(self) -> tuple[StepBatch, dict[str, float], dict[str, float]]:
        """Samples this step's groups (with dynamic sampling, drawing more prompts while groups are uninformative),
        scores them and computes advantages over the global batch."""
        cfg, G = self.cfg, self.cfg.rollout.num_generations
        P_local = self.batch_local // G
        rollout_s = reward_s = 0.0
        kept: list[ScoredRollout] = []
        dropped_groups: list[ScoredRollout] = []
        examples = self.sampler.next_batch()
        draws = 0
        while True:
            part, t_roll, t_rew = self._sample(examples, draws)
            rollout_s += t_roll
            reward_s += t_rew
            if not cfg.algorithm.dynamic_sampling:
                kept.append(part)
                break
            informative = nonconstant_groups(torch.tensor(part.scores.total, dtype=torch.float32), G)  # (P,)
            kept.append(part.select_groups(informative.nonzero().flatten(), G))
            dropped_groups.append(part.select_groups((~informative).nonzero().flatten(), G))
            have = sum(p.num_groups for p in kept)
            need_any = self._max(max(0, P_local - have))  # all ranks draw together to keep samplers in step
            if need_any == 0 or draws >= cfg.algorithm.max_extra_draws:
                break
            draws += 1
            examples = self.sampler.draw(self.cfg.rollout.prompts_per_step)

        # Assemble exactly P_local groups: the informative ones first, topped up with uninformative ones if the draw
        # budget ran out (their advantages are zero, so they add KL but no policy gradient).
        parts = kept + dropped_groups if cfg.algorithm.dynamic_sampling else kept
        scored = ScoredRollout.cat(parts, self.sampling.pad_token_id).first_groups(P_local, G)
        batch, texts, per_function, totals = scored.batch, scored.texts, scored.scores.per_function, scored.scores.total
        examples_per_row = scored.examples_per_row(G)
        if self.zero3 and self.world_size > 1:
            # Same shapes on every rank: ZeRO-3 gathers lm_head once per log-prob chunk, and the chunk count follows
            # the sequence length, so unequal lengths would mean unequal collectives.
            widths = self._gather(torch.tensor([batch.prompt_ids.shape[1], batch.completion_ids.shape[1]],
                                               device=self.device)).view(-1, 2).amax(0).tolist()
            batch = batch.pad_to(widths[0], widths[1], self.sampling.pad_token_id)
        timing = {"timing/rollout_s": rollout_s, "timing/reward_s": reward_s}

        rewards = torch.tensor(totals, dtype=torch.float32)  # (N,)
        all_rewards = self._gather(rewards.to(self.device)).cpu()  # (N * world,) prompt-major within each rank
        advantages_all = group_advantages(all_rewards, G, cfg.algorithm.scale_rewards)
        advantages = advantages_all[self.rank * len(rewards):(self.rank + 1) * len(rewards)]
        if cfg.algorithm.mask_truncated_completions:
            truncated = torch.tensor([f == "length" for f in batch.finish_reasons])
            batch.completion_mask = batch.completion_mask * (~truncated).to(batch.completion_mask.dtype)[:, None].to(
                batch.completion_mask.device)

        metrics = dict(group_reward_stats(all_rewards, G))
        for name, values in per_function.items():
            judged = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
            s, s2, n = self._sum(judged.sum()), self._sum((judged ** 2).sum()), self._sum(len(judged))
            mean = s / n if n else float("nan")
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = math.sqrt(max(0.0, s2 / n - mean ** 2)) if n else float("nan")
        lengths = batch.lengths.float()
        metrics["completions/mean_length"] = self._sum(lengths.sum()) / self._sum(len(lengths))
        metrics["completions/max_length"] = self._max(float(lengths.max()))
        metrics["completions/clipped_ratio"] = self._sum(sum(f == "length" for f in batch.finish_reasons)) / \
            self._sum(len(lengths))
        if cfg.algorithm.dynamic_sampling:
            metrics["dynamic_sampling/extra_draws"] = float(draws)
            metrics["dynamic_sampling/filled_groups"] = self._sum(
                max(0, P_local - sum(p.num_groups for p in kept)))
        for name, count in self.reward_failures.items():
            metrics[f"rewards/{name}/failures"] = float(count)
            metrics[f"rewards/{name}/disabled"] = float(name in self.scorer.disabled)
        step = StepBatch(rollout=batch, advantages=advantages.to(self.device), rewards=rewards,
                         per_function=per_function, texts=texts, examples=examples_per_row)
        t_logprobs = time.perf_counter()
        self._precompute_logprobs(step, metrics)
        timing["timing/logprobs_s"] = time.perf_counter() - t_logprobs  # reference (and old) log-prob forwards
        return step, timing, metrics

    def _count_failures(self, scores) -> None:
        for name, counter in scores.failures.items():
            self.reward_failures[name] = self.reward_failures.get(name, 0) + sum(counter.values())

    # ---- log-probs ----------------------------------------------------------------------------------------------

    def _completion_logprobs(self, module: nn.Module, rb: RolloutBatch, rows: slice, *, first_row: int | None = None,
                             routing: bool = False, return_routing: bool = False, compute_entropy: bool = False):
        """Log-probs of the completion tokens of the given rows under `module` (B, Tc), plus the forward output.
        `first_row`: the index of rows' first row in the step's batch when `rb` is already a slice of it."""
        input_ids = rb.input_ids[rows]  # (B, Tp + Tc)
        mask = rb.attention_mask[rows]  # (B, Tp + Tc)
        Tp = rb.prompt_ids.shape[1]
        replay = [r[rows] for r in rb.routing] if routing and rb.routing is not None else None
        # Rows are prompt-major (G per prompt). Cut into aligned blocks of g = gcd(G, rows) rows, every block lies
        # within one prompt's group, so the forward computes that prompt once per block (same numbers, fewer
        # tokens): once per group when a micro-batch holds whole groups, once per micro-batch when it holds part of one.
        start = first_row if first_row is not None else rows.start or 0
        g = math.gcd(self.cfg.rollout.num_generations, input_ids.shape[0])
        share = g > 1 and start % g == 0
        # Completion token j is predicted at position Tp - 1 + j; only those positions reach the output layer.
        out = module(input_ids, mask, target_ids=rb.completion_ids[rows], target_start=Tp - 1,
                     temperature=self.cfg.rollout.temperature or 1.0, routing=replay,
                     return_routing=return_routing, compute_entropy=compute_entropy,
                     shared_prefix=Tp if share else 0, group_size=g if share else 1)
        return out.logprobs, out.entropy, out

    @torch.no_grad()
    def _precompute_logprobs(self, step: StepBatch, metrics: dict[str, float]) -> None:
        """Old log-probs (whenever the rollout feeds more than one optimizer step) and reference log-probs
        (beta > 0), micro-batch by micro-batch."""
        cfg, rb = self.cfg, step.rollout
        N = rb.completion_ids.shape[0]
        replay = cfg.algorithm.moe.routing_replay and rb.routing is not None
        if cfg.algorithm.num_iterations > 1 or self.mini_local < N:
            # A forward under the current policy before the first update, not the engine's sampling log-probs: it
            # is exact (the same computation as the update's first forward, so that ratio is exactly 1), while the
            # sampling ones differ by float noise and by any temperature / top-p / top-k processing. With routing
            # replay it replays the rollout's experts, as the update does.
            old = []
            with policy_for_sampling(self.model) as policy:
                for s in range(0, N, self.micro):
                    rows = slice(s, s + self.micro)
                    lp, _, _ = self._completion_logprobs(policy, rb, rows, routing=replay)
                    old.append(lp)
            step.old_logprobs = torch.cat(old)
        if self.ref_model is not None:
            ref = []
            ref_device = next(self.ref_model.parameters()).device
            for s in range(0, N, self.micro):
                rows = slice(s, s + self.micro)
                sub = rb.to(ref_device, rows)
                lp, _, _ = self._completion_logprobs(self.ref_model, sub, slice(None), first_row=s)
                ref.append(lp.to(self.device))
            step.ref_logprobs = torch.cat(ref)

    # ---- the update ---------------------------------------------------------------------------------------------

    def update(self, step: StepBatch) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.algorithm
        rb = step.rollout
        N = rb.completion_ids.shape[0]
        sums: dict[str, float] = {}
        tokens_total = loss_sum = 0.0
        grad_norms = []
        expert_counts = [torch.zeros(self.policy.config.n_routed_experts or 1, dtype=torch.float64)
                         for _ in range(self.moe_layers)]
        replay = a.moe.routing_replay and rb.routing is not None
        mini_global = self.mini_local * self.world_size
        skipped_before = self.skipped_updates
        for _ in range(a.num_iterations):
            for m0 in range(0, N, self.mini_local):
                mini_mask = rb.completion_mask[m0:m0 + self.mini_local]
                num_items = self._sum(mini_mask.sum())  # dapo: tokens of the global mini-batch
                micro_starts = list(range(m0, m0 + self.mini_local, self.micro))
                for i, s in enumerate(micro_starts):
                    rows = slice(s, s + self.micro)
                    last = i == len(micro_starts) - 1
                    with self._no_sync(last):
                        logprobs, entropy, out = self._completion_logprobs(
                            self.model, rb, rows, routing=replay, return_routing=self.moe_layers > 0,
                            compute_entropy=True)
                        mask = rb.completion_mask[rows]
                        loss, m = policy_loss(
                            logprobs,
                            step.old_logprobs[rows] if step.old_logprobs is not None else None,
                            step.ref_logprobs[rows] if step.ref_logprobs is not None else None,
                            step.advantages[rows], mask, loss_type=a.loss_type, epsilon=a.epsilon,
                            epsilon_high=a.epsilon_high, beta=a.beta, kl_estimator=a.kl_estimator,
                            max_completion_length=cfg.rollout.max_new_tokens, num_items_in_batch=num_items,
                            num_sequences=mini_global)
                        # bnpo is a mean over the micro-batch's own tokens: average (not add) the global
                        # mini-batch's micro-batches, as one process with one micro-batch would.
                        share = 1 / (len(micro_starts) * self.world_size) if a.loss_type in LOCAL_MEAN_LOSSES else 1
                        loss = loss * share
                        loss_sum += float(m.pop("policy_loss")) * share
                        if a.moe.aux_loss_coef > 0 and self.moe_layers:  # already weighted by the coefficient
                            loss = loss + out.aux_loss * (mask.shape[0] / mini_global)
                        # Normalisers above are global; DDP/DeepSpeed average gradients over ranks, so undo that.
                        scaled = nan_point(loss, self.step + 1) * self.world_size
                        self._backward(scaled, last)
                    n_tok = float(mask.sum())
                    tokens_total += n_tok
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * n_tok
                    sums["entropy"] = sums.get("entropy", 0.0) + float(masked_mean(entropy.detach(), mask)) * n_tok
                    # Load of real tokens only: padding is routed too, and how much there is depends on the
                    # batch composition (so on the number of processes).
                    real = rb.attention_mask[rows].bool().cpu()  # (B, Tp + Tc)
                    for acc_counts, chosen in zip(expert_counts, out.routing or []):
                        acc_counts += torch.bincount(chosen.cpu()[real].flatten(),
                                                     minlength=acc_counts.numel()).double()
                grad_norms.append(self._optimizer_step())
        metrics = {k: self._sum(v) / max(self._sum(tokens_total), 1.0) for k, v in sums.items()}
        # Each micro-batch's loss is its share of the global mini-batch loss: add them up, average over updates.
        metrics["policy_loss"] = self._sum(loss_sum) / len(grad_norms)
        finite = [g for g in grad_norms if g is not None and math.isfinite(g)]
        metrics["grad_norm"] = float(np.mean(finite)) if finite else float("nan")
        metrics["skipped_updates"] = float(self.skipped_updates)
        if self.moe_layers:
            global_counts = [self._gather_sum(c) for c in expert_counts]
            for i, counts in enumerate(global_counts):
                metrics[f"moe/expert_load_cv/layer{i}"] = expert_load_cv(counts)
            gamma = a.moe.router_bias_update_gamma
            if gamma > 0 and self.skipped_updates == skipped_before:  # a skipped update moves nothing, bias included
                self.policy.update_router_bias([c.float() for c in global_counts], gamma)
        return metrics

    def _no_sync(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a mini-batch."""
        if self.world_size > 1 and not self.is_deepspeed and not last:
            return self.accelerator.no_sync(self.model)
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.is_deepspeed:
            # The engine divides by its accumulation count; our normalisers already account for the whole batch.
            self.model.set_gradient_accumulation_boundary(last)
            self.model.backward(loss * self.ds_accumulation)
        else:
            self.accelerator.backward(loss)

    def _optimizer_step(self) -> float | None:
        """Clips and applies the accumulated gradients; skips (and counts) the update if they are not finite."""
        max_norm = self.cfg.optim.max_grad_norm
        if self.is_deepspeed:
            kill_point("update", self.step + 1)
            # Clips and steps at the accumulation boundary. DeepSpeed itself drops an update whose gradient norm is
            # not finite (its optimizer's `overflow` flag; fp32 and ZeRO-3 always, bf16 ZeRO-1/2 only with
            # check_grad_overflow), so here we count it like our own skips.
            self.model.step()
            norm = self.model.get_global_grad_norm()
            norm = None if norm is None else float(norm)
            if getattr(self.model.optimizer, "overflow", False):
                self._skipped_update()
            elif norm is not None and not math.isfinite(self._max(norm)):
                raise TrainingStopped(
                    f"step {self.step + 1}: DeepSpeed applied an update with a non-finite gradient norm ({norm}); "
                    "the weights are no longer usable. Resume from the last checkpoint, and set "
                    "check_grad_overflow in the DeepSpeed config so such updates are dropped.")
            else:
                self.consecutive_skips = 0
            return norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        norm = float(norm)
        if not math.isfinite(self._max(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._skipped_update()
            return norm
        self.consecutive_skips = 0
        kill_point("update", self.step + 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _skipped_update(self) -> None:
        """Counts an update dropped for non-finite gradients; too many in a row save the state and stop the run."""
        self.skipped_updates += 1
        self.consecutive_skips += 1
        self.tracker.write(f"step {self.step + 1}: non-finite gradient norm, update skipped "
                           f"({self.consecutive_skips} in a row)")
        if self.consecutive_skips >= self.cfg.optim.max_consecutive_skips:
            self.save()
            raise TrainingStopped(
                f"{self.consecutive_skips} consecutive updates had non-finite gradients; stopped at step "
                f"{self.step} (state saved in {self.output_dir}). Lower optim.lr or check the rewards/data.")

    # ---- evaluation, logging ------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy completions of this rank's share of the eval prompts, scored with the training rewards."""
        examples = self.eval_examples[self.rank::self.world_size]
        params = SamplingParams(max_new_tokens=self.sampling.max_new_tokens, temperature=0.0,
                                eos_token_ids=self.sampling.eos_token_ids, stop_strings=self.sampling.stop_strings,
                                pad_token_id=self.sampling.pad_token_id)
        totals: dict[str, list[float]] = {}
        for s in range(0, len(examples), 32):
            chunk = examples[s:s + 32]
            with policy_for_sampling(self.model) as policy:
                out = tzmodel.generate(policy, [ex["prompt_ids"] for ex in chunk], 1, params, decode=self.tokenizer.decode)
            ids, texts = decode_completions(out, self.tokenizer)
            scores = self.scorer.score(texts, columns={c: [ex.get(c) for ex in chunk] for c in self.columns},
                                       facts={"prompt": [ex["prompt"] for ex in chunk], "completion_ids": ids,
                                              "num_tokens": out.completion_mask.sum(1).tolist(),
                                              "finish_reason": list(out.finish_reasons)})
            totals.setdefault("reward", []).extend(scores.total)
            for name, values in scores.per_function.items():
                totals.setdefault(f"{name}/mean", []).extend(v for v in values if v is not None)
        return {f"eval/{k}": self._sum(sum(v)) / max(self._sum(len(v)), 1) for k, v in totals.items()}

    def _log_completions(self, step: StepBatch) -> None:
        n = min(self.cfg.logging.completions_rows, len(step.texts))
        rows = []
        for i in range(n):
            row = {"prompt": step.examples[i]["prompt"], "completion": step.texts[i],
                   "advantage": float(step.advantages[i])}
            for name, values in step.per_function.items():
                row[name] = values[i]
            row["reward"] = float(step.rewards[i])
            rows.append(row)
        self.tracker.log_completions(rows, self.step + 1)

    # ---- cross-rank reductions (no-ops in one process) -----------------------------------------------------------

    def _sum(self, value) -> float:
        if self.world_size == 1:
            return float(value)
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

    def _max(self, value) -> float:
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.accelerator.gather(t).max())

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world_size == 1 else self.accelerator.gather(t)

    def _gather_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        return self.accelerator.reduce(t.to(self.device), reduction="sum").cpu()

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Writes checkpoint-<step>: HF model dir + trainer state; atomic (temp dir renamed into place). A write that
        fails (a full disk) removes its temporary directory and raises CheckpointWriteFailed."""
        try:
            final = self._write_checkpoint()
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as RuntimeError
            if self.is_main:
                shutil.rmtree(ckpt.tmp_dir(self.output_dir, self.step), ignore_errors=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
            previous = ckpt.latest_checkpoint(self.output_dir)
            kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
            raise CheckpointWriteFailed(f"could not write the step-{self.step} checkpoint in {self.output_dir} "
                                        f"({reason}); {kept}. Free space there and resume with "
                                        "train.resume=auto") from None
        self.saved_step = self.step
        return final

    def _write_checkpoint(self) -> Path | None:
        acc = self.accelerator
        if self.is_main:
            ckpt.begin(self.output_dir, self.step)
        acc.wait_for_everyone()
        tmp = ckpt.tmp_dir(self.output_dir, self.step)
        with policy_for_sampling(self.model) as module:  # gathers ZeRO-3 shards; a no-op otherwise
            if self.is_main:
                tzmodel.save_model(module, tmp)
                self.tokenizer.save(tmp)
        torch.save(ckpt.rng_state(None), tmp / f"rng_rank{self.rank}.pt")  # every rank's global RNGs
        kill_point("checkpoint", self.step)
        if self.is_deepspeed:
            self.model.save_checkpoint(str(tmp / "deepspeed"))
        acc.wait_for_everyone()
        final = None
        if self.is_main:
            state = {
                "step": self.step,
                "sampler": self.sampler.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "optimizer": None if self.is_deepspeed else self.optimizer.state_dict(),
                "consecutive_skips": self.consecutive_skips,
                "skipped_updates": self.skipped_updates,
                "reward_failures": dict(self.reward_failures),
                "world_size": self.world_size,
                "wandb_run_id": self.tracker.run_id or "",
            }
            ckpt.write_state(tmp, state, config_to_dict(self.cfg))
            final = ckpt.commit(tmp, self.output_dir, self.step, self.cfg.train.keep_last)
            self.tracker.write(f"saved {final}")
        acc.wait_for_everyone()
        return final

    def _apply_optim_config(self) -> None:
        """The recipe's optimizer hyper-parameters over those restored with the optimizer state (a no-op when the
        recipe is unchanged: the same schedule formula gives the same learning rate)."""
        o, scheduler = self.cfg.optim, self.scheduler
        scheduler.base_lrs = [o.lr for _ in scheduler.base_lrs]
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in scheduler.optimizer.param_groups:
            group.update(lr=o.lr * factor, initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                         weight_decay=o.weight_decay)

    def _load_state(self, path: Path, state: dict) -> str | None:
        """Restores optimizer, scheduler, data position, counters and RNG from a checkpoint. The weights were
        already loaded from the same directory when the model was built."""
        if state["world_size"] != self.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} processes; resuming with "
                             f"{self.world_size} is not supported (the data shards and RNG streams would differ)")
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.is_deepspeed:
            self.model.load_checkpoint(str(path / "deepspeed"), load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self._apply_optim_config()
        self.consecutive_skips = int(state["consecutive_skips"])
        self.skipped_updates = int(state["skipped_updates"])
        self.reward_failures = dict(state["reward_failures"])
        rng = ckpt.load_file(path / f"rng_rank{self.rank}.pt")
        ckpt.set_rng_state(rng, None)
        return state["wandb_run_id"] or None


def _safe_deepspeed_load(path: str, map_location=None):
    """DeepSpeed's checkpoint files through rl.checkpoint.load_file, allowing the few DeepSpeed types its ZeRO-1/2/3
    optimizer states hold (a loss scaler, the stage enum, fragment addresses: plain records, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    safe = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)
    return ckpt.load_file(path, safe, "cpu" if map_location is None else map_location)


def train(cfg: Config) -> Trainer:
    trainer = Trainer(cfg)
    trainer.train()
    return trainer
