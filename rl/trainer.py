"""The GRPO training loop, written out: rollout -> rewards -> advantages -> policy update, step after step.

The loop lives here; what it calls is elsewhere and plain: the rollout engine (rl.engine: our sampler or vLLM), the
reward scorer (rewards.Scorer), advantages and losses (rl.advantages, rl.loss). The process group, DeepSpeed's
settings and the cross-rank reductions are in rl.distributed; saving and resuming the training state in rl.state.

Data parallelism: every rank samples its own slice of the global prompt batch and owns whole groups, so group
statistics never straddle ranks. Rewards are gathered before advantages are computed, so 'batch' reward scaling and
every logged number are global — they do not depend on the number of processes. Loss normalisers (the dapo token
count, the number of sequences) are global too, and the loss is multiplied by the world size to undo the gradient
averaging of DDP / DeepSpeed, so N processes take the same update as one process on the whole batch. (With several
mini-batches per step, optimizer step k uses every rank's k-th slice, so the step's groups are split into optimizer
steps differently from one process: same data per step, a different order of updates.)

Sampling is seeded per prompt (train.seed, step, draw, the prompt's index in the global batch; rl.engine), so 1 and N
processes sample the same tokens and a resumed run samples exactly what the straight run did, with no sampling RNG to
save. (Dynamic sampling is the exception: how many extra draws happen depends on how the groups are split.) Under
ZeRO-3 every rank pads its batch to the same shapes so all ranks issue the same collectives (rl.distributed).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from thinkzero.model.generate import SamplingParams
from thinkzero.rl import build, hf_policy
from thinkzero.rl import checkpoint as ckpt
from thinkzero.rl.advantages import group_advantages, group_reward_stats, nonconstant_groups
from thinkzero.rl.batch import RolloutBatch, ScoredRollout, StepBatch, decode_completions
from thinkzero.rl.config import Config, check_world_size, config_to_dict, config_to_yaml
from thinkzero.rl.distributed import Collectives, is_collective_failure, make_accelerator, prepare_models
from thinkzero.rl.engine import build_engine, sampling_seed
from thinkzero.rl.evaluation import score_greedy
from thinkzero.rl.faults import kill_point, nan_point
from thinkzero.rl.logprobs import completion_logprobs, precompute_logprobs
from thinkzero.rl.loss import policy_loss, rollout_correction
from thinkzero.rl.metrics import UpdateMetrics, completion_rows, rollout_metrics
from thinkzero.rl.optim import adamw, lr_lambda, seed_everything
from thinkzero.rl.rollout import policy_for_sampling
from thinkzero.rl.signals import StopRequest
from thinkzero.rl.state import (
    CheckpointWriteFailed,
    decide_resume,
    load_training_state,
    save_checkpoint,
)
from thinkzero.rl.tracking import Tracker

__all__ = ["CheckpointWriteFailed", "CollectiveTimeout", "SignalStop", "StepBatch", "Trainer", "TrainingStopped",
           "train"]

# Loss types normalised by each micro-batch's own token count (see rl.loss); the others take global normalisers.
LOCAL_MEAN_LOSSES = ("bnpo",)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite updates in a row); the state was saved first."""


class CollectiveTimeout(RuntimeError):
    """The processes stopped meeting at the same collective (one failed, hung or took another path) and the process
    group's timeout (train.dist_timeout_s) ran out."""


class SignalStop(RuntimeError):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint of the last finished step."""


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stage = "starting"  # what the loop is doing, for the message when ranks stop meeting
        self.accelerator = make_accelerator(cfg.train.dist_timeout_s)
        self.dist = Collectives(self.accelerator)
        self.device = self.accelerator.device
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        check_world_size(cfg, self.world_size)
        self.output_dir = Path(cfg.train.output_dir)
        # Rank 0 does the filesystem work and every rank gets its outcome (rl.distributed.Collectives.on_main).
        self.start_notes: list[str] = self.dist.on_main(self._prepare_output_dir)  # logged once the tracker exists
        seed_everything(cfg.train.seed + self.rank)
        if cfg.model.init_preset:
            self.dist.on_main(lambda: build.write_random_model(cfg))
        # Where to start from: a checkpoint (resume) or the configured model.
        self.resume_from, self.resume_state, notes = decide_resume(self.dist, cfg)
        self.start_notes += notes
        self.tokenizer = build.load_tokenizer(cfg)
        self.dtype = build.training_dtype(cfg, self.device)
        policy = build.load_policy(cfg, str(self.resume_from or cfg.model.name_or_path), self.tokenizer, self.dtype,
                                   self.device)
        self.moe_layers = len(policy.moe_layers)
        self.ref_model = build.load_reference(cfg, self.dtype, self.device)
        self._prepare(policy)
        prompts = build.load_prompts(cfg, self.tokenizer, self.rank, self.world_size)
        self.examples, self.columns, self.sampler = prompts.examples, prompts.columns, prompts.sampler
        self.eval_examples = prompts.eval_examples
        self.scorer = build.build_scorer(cfg, self.columns)
        self.sampling = build.sampling_params(cfg, self.tokenizer, self.moe_layers)
        self._start_run(prompts.dropped)
        self.engine = build_engine(cfg, self.model, self.tokenizer, self.device)
        if cfg.rollout.engine == "transformers":
            self.tracker.write("rollout.engine transformers: sampling with transformers' generate, one prompt at a "
                               "time - the slow path (rollout.engine vllm samples fast)")

    # ---- setup helpers ------------------------------------------------------------------------------------------

    def _prepare_output_dir(self) -> list[str]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return ckpt.recover(self.output_dir)

    def _prepare(self, policy: nn.Module) -> None:
        """Optimizer, schedule and batch sizes; the policy (and under ZeRO-3 the reference) handed to accelerate."""
        cfg, o = self.cfg, self.cfg.optim
        optimizer = adamw(policy.parameters(), o.lr, o.betas, o.eps, o.weight_decay)
        # The schedule is stepped once per training step (not per optimizer step) and is not handed to accelerate,
        # so warmup_steps means the same thing whatever the mini-batching or the backend.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(o.warmup_steps, cfg.train.max_steps, o.schedule, o.min_lr_ratio))
        self.batch_local = cfg.rollout.batch_size // self.world_size  # completions per step on this rank
        self.mini_local = (cfg.algorithm.mini_batch_size or cfg.rollout.batch_size) // self.world_size
        self.micro = cfg.algorithm.micro_batch_size or self.mini_local
        plugin = self.accelerator.state.deepspeed_plugin
        self.is_deepspeed = plugin is not None
        self.zero3 = self.is_deepspeed and plugin.zero_stage == 3
        self.model, self.optimizer, self.ref_model, self.ds_accumulation = prepare_models(
            self.accelerator, policy, optimizer, self.ref_model, micro=self.micro, mini_local=self.mini_local,
            max_grad_norm=o.max_grad_norm, ref_on_cpu=cfg.model.ref_model_on_cpu)

    def _start_run(self, dropped: int) -> None:
        """Counters (or those of the checkpoint resumed from), the run's files and the tracker."""
        cfg = self.cfg
        self.step = 0
        self.consecutive_skips = 0
        self.skipped_updates = 0
        self.reward_failures: dict[str, int] = {}
        run_id = self._restore(self.resume_from, self.resume_state) if self.resume_from else None
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
            self.tracker.write(f"dropped {dropped} prompts longer than max_prompt_length={cfg.data.max_prompt_length}")
        for note in self.start_notes:
            self.tracker.write(note)
        if self.resume_from:
            self.tracker.write(f"resumed from {self.resume_from} at step {self.step}")

    def _restore(self, path: Path, state: dict) -> str | None:
        """Restores optimizer, scheduler, RNGs, data position and counters; returns the W&B run id to continue."""
        load_training_state(path, state, self.cfg, self.model, self.optimizer, self.scheduler,
                            world_size=self.world_size, rank=self.rank, is_deepspeed=self.is_deepspeed)
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.skipped_updates = int(state["skipped_updates"])
        self.reward_failures = dict(state["reward_failures"])
        return state["wandb_run_id"] or None

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ---- the loop -----------------------------------------------------------------------------------------------

    def train(self) -> None:
        """Trains to train.max_steps. On SIGTERM / SIGINT (rl.signals) it stops at the next step boundary — after
        the optimizer step in progress, or abandoning the rollout in progress — saves, and raises SignalStop."""
        cfg = self.cfg
        self.stop_agreed = False
        try:
            self._train_until_done()
        except RuntimeError as e:
            if not is_collective_failure(e):
                raise
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise CollectiveTimeout(
                f"the processes stopped meeting at the same collective at step {self.step + 1} while {self.stage} "
                f"({last}); another process failed, hung or took another path: its own log says why "
                f"(train.dist_timeout_s={cfg.train.dist_timeout_s:g} s)") from e
        finally:
            self.engine.close()
            self.tracker.close()
            self.scorer.close()

    def _train_until_done(self) -> None:
        cfg = self.cfg
        with StopRequest() as stop:
            while self.step < cfg.train.max_steps and not self._stop_agreed(stop):
                metrics = self.train_step(stop)
                if metrics is None:  # stopped between rollout and update: the step was abandoned
                    break
                self.step += 1
                if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.max_steps:
                    self.tracker.log(metrics, self.step)
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.eval_examples:
                    self.stage = "evaluating"
                    self.tracker.log(self.evaluate(), self.step)
                if cfg.train.save_every and self.step % cfg.train.save_every == 0 and \
                        self.step < cfg.train.max_steps:
                    self.stage = "saving a checkpoint"
                    self.save()
            if self.saved_step != self.step:  # a resumed run with nothing left to do keeps its checkpoint as is
                self.stage = "saving a checkpoint"
                self.save()
            if self.stop_agreed and self.step < cfg.train.max_steps:
                # Every rank stops with the same error: only the rank(s) the signal reached know its name.
                where = ckpt.checkpoint_dir(self.output_dir, self.step)
                raise SignalStop(f"{stop.signal_name or 'a stop signal to another process'}: saved {where} at "
                                 f"step {self.step}; continue with train.resume=auto")

    def _stop_agreed(self, stop: StopRequest | None) -> bool:
        """Whether any rank got a stop signal (one tiny collective, so every rank stops at the same step)."""
        self.stage = "agreeing on whether to stop"
        self.stop_agreed = self.dist.max(stop is not None and stop.signal_name is not None) > 0
        return self.stop_agreed

    def train_step(self, stop: StopRequest | None = None) -> dict[str, float] | None:
        """One training step; None when a stop signal came during the rollout: the step is abandoned and the data
        position, RNGs and counters are put back as they were, so the checkpoint saved next is that of the last
        finished step and a resume samples this step again exactly."""
        t_start = time.perf_counter()
        before = (self.sampler.state_dict(), ckpt.rng_state(), dict(self.reward_failures))
        self.stage = "sampling and scoring"
        batch, timing, sample_metrics = self.collect()
        if self._stop_agreed(stop):
            self.sampler.load_state_dict(before[0])
            ckpt.set_rng_state(before[1])
            self.reward_failures = before[2]
            return None
        t_update = time.perf_counter()
        self.stage = "updating the policy"
        update_metrics = self.update(batch)
        with warnings.catch_warnings():
            # The schedule counts training steps; when a step's update was skipped as non-finite torch warns that
            # the scheduler stepped without the optimizer, which is what we mean.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        timing["timing/update_s"] = time.perf_counter() - t_update
        step_s = time.perf_counter() - t_start
        tokens = self.dist.sum(batch.rollout.lengths.sum())
        metrics = {**sample_metrics, **update_metrics, **timing, "timing/step_s": step_s,
                   "throughput/tokens_per_s": tokens / max(timing["timing/rollout_s"], 1e-9),
                   "learning_rate": self.scheduler.get_last_lr()[0]}
        every = self.cfg.logging.completions_every
        if every and (self.step + 1) % every == 0:
            self._log_completions(batch)
        return metrics

    # ---- sampling and scoring ------------------------------------------------------------------------------------

    def collect(self) -> tuple[StepBatch, dict[str, float], dict[str, float]]:
        """Samples this step's groups (with dynamic sampling, drawing more prompts while groups are uninformative),
        scores them and computes advantages over the global batch."""
        cfg, G = self.cfg, self.cfg.rollout.num_generations
        scored, timing, metrics = self._draw_groups()
        batch = scored.batch
        if self.zero3 and self.world_size > 1:
            # Same shapes on every rank: ZeRO-3 gathers lm_head once per log-prob chunk, and the chunk count follows
            # the sequence length, so unequal lengths would mean unequal collectives.
            widths = self.dist.gather(torch.tensor([batch.prompt_ids.shape[1], batch.completion_ids.shape[1]],
                                                   device=self.device)).view(-1, 2).amax(0).tolist()
            batch = batch.pad_to(widths[0], widths[1], self.sampling.pad_token_id)

        rewards = torch.tensor(scored.scores.total, dtype=torch.float32)  # (N,)
        all_rewards = self.dist.gather(rewards.to(self.device)).cpu()  # (N * world,) prompt-major within each rank
        advantages_all = group_advantages(all_rewards, G, cfg.algorithm.scale_rewards)
        advantages = advantages_all[self.rank * len(rewards):(self.rank + 1) * len(rewards)]
        if cfg.algorithm.mask_truncated_completions:
            truncated = torch.tensor([f == "length" for f in batch.finish_reasons])
            batch.completion_mask = batch.completion_mask * (~truncated).to(batch.completion_mask.dtype)[:, None].to(
                batch.completion_mask.device)
        metrics = {**group_reward_stats(all_rewards, G), **rollout_metrics(self.dist, scored.scores.per_function, batch),
                   **metrics}
        for name, count in self.reward_failures.items():
            metrics[f"rewards/{name}/failures"] = float(count)
            metrics[f"rewards/{name}/disabled"] = float(name in self.scorer.disabled)
        step = StepBatch(rollout=batch, advantages=advantages.to(self.device), rewards=rewards,
                         per_function=scored.scores.per_function, texts=scored.texts,
                         examples=scored.examples_per_row(G))
        t_logprobs = time.perf_counter()
        self._precompute_logprobs(step)
        timing["timing/logprobs_s"] = time.perf_counter() - t_logprobs  # reference (and old) log-prob forwards
        return step, timing, metrics

    def _draw_groups(self) -> tuple[ScoredRollout, dict[str, float], dict[str, float]]:
        """This rank's P_local scored groups: with dynamic sampling the informative ones first, topped up with
        uninformative ones if the draw budget ran out (their advantages are zero, so they add KL but no policy
        gradient). Returns (groups, timing, dynamic-sampling metrics)."""
        a, G = self.cfg.algorithm, self.cfg.rollout.num_generations
        P_local = self.batch_local // G
        timing = {"timing/rollout_s": 0.0, "timing/reward_s": 0.0}
        kept: list[ScoredRollout] = []
        uninformative: list[ScoredRollout] = []
        examples, draws = self.sampler.next_batch(), 0
        while True:
            part = self._sample(examples, draws, timing)
            if not a.dynamic_sampling:
                return part, timing, {}
            informative = nonconstant_groups(torch.tensor(part.scores.total, dtype=torch.float32), G)  # (P,)
            kept.append(part.select_groups(informative.nonzero().flatten(), G))
            uninformative.append(part.select_groups((~informative).nonzero().flatten(), G))
            have = sum(p.num_groups for p in kept)
            need_any = self.dist.max(max(0, P_local - have))  # all ranks draw together to keep samplers in step
            if need_any == 0 or draws >= a.max_extra_draws:
                break
            draws += 1
            examples = self.sampler.draw(self.cfg.rollout.prompts_per_step)
        scored = ScoredRollout.cat(kept + uninformative, self.sampling.pad_token_id).first_groups(P_local, G)
        metrics = {"dynamic_sampling/extra_draws": float(draws),
                   "dynamic_sampling/filled_groups": self.dist.sum(max(0, P_local - have))}
        return scored, timing, metrics

    def _sample(self, examples: list[dict], draw: int, timing: dict[str, float]) -> ScoredRollout:
        """G completions per example from the engine, decoded and scored; adds the seconds spent to `timing`."""
        t0 = time.perf_counter()
        first = self.rank * len(examples)  # every rank holds an equal, contiguous slice of each global draw
        seeds = [sampling_seed(self.cfg.train.seed, self.step, draw, first + i) for i in range(len(examples))]
        batch = self.engine.sample([ex["prompt_ids"] for ex in examples], self.cfg.rollout.num_generations,
                                   self.sampling, seeds)
        kill_point("rollout", self.step + 1)
        t1 = time.perf_counter()
        ids, texts = decode_completions(batch, self.tokenizer)
        rows = [examples[i] for i in batch.group_index.tolist()]
        columns = {c: [row.get(c) for row in rows] for c in self.columns}
        facts = {"prompt": [row["prompt"] for row in rows], "completion_ids": ids, "num_tokens": batch.lengths.tolist(),
                 "finish_reason": batch.finish_reasons}
        scores = self.scorer.score(texts, columns=columns, facts=facts)
        kill_point("scoring", self.step + 1)
        for name, counter in scores.failures.items():
            self.reward_failures[name] = self.reward_failures.get(name, 0) + sum(counter.values())
        timing["timing/rollout_s"] += t1 - t0
        timing["timing/reward_s"] += time.perf_counter() - t1
        return ScoredRollout(batch, texts, scores, examples)

    # ---- log-probs ----------------------------------------------------------------------------------------------

    def _completion_logprobs(self, module: nn.Module, rb: RolloutBatch, rows: slice, **kwargs):
        """(logprobs (B, Tc), entropy, forward output) of the given rows under `module` (rl.logprobs)."""
        return completion_logprobs(module, rb, rows, num_generations=self.cfg.rollout.num_generations,
                                   temperature=self.cfg.rollout.temperature, **kwargs)

    def _precompute_logprobs(self, step: StepBatch) -> None:
        """Old log-probs whenever the rollout feeds more than one optimizer step; reference log-probs if beta > 0."""
        a, N = self.cfg.algorithm, step.rollout.completion_ids.shape[0]
        precompute_logprobs(step, self.model, self.ref_model, micro=self.micro,
                            needs_old=a.num_iterations > 1 or self.mini_local < N,
                            routing_replay=a.moe.routing_replay, num_generations=self.cfg.rollout.num_generations,
                            temperature=self.cfg.rollout.temperature, device=self.device)

    # ---- the update ---------------------------------------------------------------------------------------------

    def update(self, step: StepBatch) -> dict[str, float]:
        """num_iterations passes over the step's batch, one optimizer step per mini-batch."""
        a, N = self.cfg.algorithm, step.rollout.completion_ids.shape[0]
        acc = UpdateMetrics(self.moe_layers, hf_policy.num_routed_experts(self.policy))
        skipped_before = self.skipped_updates
        for iteration in range(a.num_iterations):
            for m0 in range(0, N, self.mini_local):
                num_items = self.dist.sum(step.rollout.completion_mask[m0:m0 + self.mini_local].sum())  # dapo
                micro_starts = list(range(m0, m0 + self.mini_local, self.micro))
                for i, s in enumerate(micro_starts):
                    self._micro_step(step, slice(s, s + self.micro), num_items, len(micro_starts),
                                     last=i == len(micro_starts) - 1, first_pass=iteration == 0, acc=acc)
                acc.grad_norms.append(self._optimizer_step())
        return self._update_metrics(acc, step.rollout, skipped_before)

    def _micro_step(self, step: StepBatch, rows: slice, num_items: float, num_micro: int, *, last: bool,
                    first_pass: bool, acc: UpdateMetrics) -> None:
        """Forward and backward of one micro-batch; its metrics go into `acc`."""
        cfg, a, rb = self.cfg, self.cfg.algorithm, step.rollout
        mini_global = self.mini_local * self.world_size
        rc = a.rollout_correction
        with self._no_sync(last):
            logprobs, entropy, out = self._completion_logprobs(
                self.model, rb, rows, routing=a.moe.routing_replay and rb.routing is not None,
                return_routing=self.moe_layers > 0, compute_entropy=True)
            old = step.old_logprobs[rows] if step.old_logprobs is not None else None
            # Train-inference mismatch: pi_old (the current policy when the rollout feeds one update) against the
            # engine's sampling log-probs; mode none gives no weights and the mask unchanged.
            weights, mask, correction = rollout_correction(
                old if old is not None else logprobs.detach(), rb.sampling_logprobs[rows], rb.completion_mask[rows],
                rc.mode, rc.level, rc.cap)
            loss, m = policy_loss(
                logprobs, old, step.ref_logprobs[rows] if step.ref_logprobs is not None else None,
                step.advantages[rows], mask, loss_type=a.loss_type, epsilon=a.epsilon,
                epsilon_high=a.epsilon_high, beta=a.beta, kl_estimator=a.kl_estimator,
                max_completion_length=cfg.rollout.max_new_tokens, num_items_in_batch=num_items,
                num_sequences=mini_global, token_weights=weights)
            # bnpo is a mean over the micro-batch's own tokens: average (not add) the global mini-batch's
            # micro-batches, as one process with one micro-batch would.
            share = 1 / (num_micro * self.world_size) if a.loss_type in LOCAL_MEAN_LOSSES else 1
            loss = loss * share
            acc.loss += float(m.pop("policy_loss")) * share
            if a.moe.aux_loss_coef > 0 and self.moe_layers:  # already weighted by the coefficient
                loss = loss + out.aux_loss * (mask.shape[0] / mini_global)
            # Normalisers above are global; DDP/DeepSpeed average gradients over ranks, so undo that.
            self._backward(nan_point(loss, self.step + 1) * self.world_size, last)
        acc.add({**m, **correction}, entropy, rb.completion_mask[rows])  # weighted by completion tokens
        acc.add_routing(out.routing, rb, rows, first_pass)

    def _update_metrics(self, acc: UpdateMetrics, rb: RolloutBatch, skipped_before: int) -> dict[str, float]:
        metrics, global_counts = acc.reduce(self.dist, routed=rb.routing is not None)
        metrics["skipped_updates"] = float(self.skipped_updates)
        gamma = self.cfg.algorithm.moe.router_bias_update_gamma
        # A skipped update moves nothing, the routers' biases included.
        if self.moe_layers and gamma > 0 and self.skipped_updates == skipped_before:
            self.policy.update_router_bias([c.float() for c in global_counts], gamma)
            self.engine.sync_weights(self.model)  # the biases changed after the last optimizer step
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
        """Clips and applies the accumulated gradients; skips (and counts) the update if they are not finite. After
        an update that changed the weights the engine gets them (a no-op for our own engine)."""
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
            elif norm is not None and not math.isfinite(self.dist.max(norm)):
                raise TrainingStopped(
                    f"step {self.step + 1}: DeepSpeed applied an update with a non-finite gradient norm ({norm}); "
                    "the weights are no longer usable. Resume from the last checkpoint, and set "
                    "check_grad_overflow in the DeepSpeed config so such updates are dropped.")
            else:
                self.consecutive_skips = 0
                self.engine.sync_weights(self.model)
            return norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf")))
        if not math.isfinite(self.dist.max(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._skipped_update()
            return norm
        self.consecutive_skips = 0
        kill_point("update", self.step + 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.engine.sync_weights(self.model)
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

    # ---- evaluation, logging, checkpoints -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy completions of this rank's share of the eval prompts, scored with the training rewards. The
        parameters are gathered once (a collective under ZeRO-3) and every rank reduces the same keys, however many
        prompts its share holds (none, when there are fewer prompts than processes)."""
        params = SamplingParams(max_new_tokens=self.sampling.max_new_tokens, temperature=0.0,
                                eos_token_ids=self.sampling.eos_token_ids, stop_strings=self.sampling.stop_strings,
                                pad_token_id=self.sampling.pad_token_id)
        with policy_for_sampling(self.model) as policy:
            totals = score_greedy(policy, self.eval_examples[self.rank::self.world_size], params, self.tokenizer,
                                  self.scorer, self.columns)
        return {f"eval/{k}": self.dist.sum(sum(v)) / max(self.dist.sum(len(v)), 1) for k, v in totals.items()}

    def _log_completions(self, step: StepBatch) -> None:
        self.tracker.log_completions(completion_rows(step, self.cfg.logging.completions_rows), self.step + 1)

    def save(self) -> Path | None:
        """Writes checkpoint-<step> (see rl.state.save_checkpoint); raises CheckpointWriteFailed on a failed write."""
        state = None
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
        final = save_checkpoint(self.dist, self.model, self.tokenizer, self.cfg, self.step, state, rank=self.rank,
                                is_deepspeed=self.is_deepspeed, log=self.tracker.write)
        self.saved_step = self.step
        return final


def train(cfg: Config) -> Trainer:
    trainer = Trainer(cfg)
    trainer.train()
    return trainer
