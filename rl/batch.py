"""The data a training step passes around: a rollout as one tensor batch, and a scored rollout.

`RolloutBatch` is what a rollout engine returns (rl.engine): N = P * G rows, prompt-major, prompts left-padded and
completions right-padded. Its methods are the only ways batches are cut, padded, joined and moved, so every copy of a
batch keeps every field (routing included). `ScoredRollout` is a batch with its decoded texts, reward scores and the
examples its prompts came from; dynamic sampling cuts and joins these by whole groups. `StepBatch` is what the
update trains on: the step's rows with their advantages (and old / reference log-probs once computed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from thinkzero.rewards import ScoreResult


def _pad_width(t: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    """`t` padded along dim 1 to `width` with `value` (on the left or the right); `t` itself when wide enough."""
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    pad = t.new_full((t.shape[0], extra, *t.shape[2:]), value)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


@dataclass
class RolloutBatch:
    """N = P * G rows, prompt-major (row p * G + g is the g-th completion of prompt p)."""

    prompt_ids: torch.Tensor  # (N, Tp) left-padded
    prompt_mask: torch.Tensor  # (N, Tp)
    completion_ids: torch.Tensor  # (N, Tc) right-padded
    completion_mask: torch.Tensor  # (N, Tc)
    sampling_logprobs: torch.Tensor  # (N, Tc) log-probs under the distribution that was sampled
    lengths: torch.Tensor  # (N,) completion tokens
    finish_reasons: list[str]  # 'stop' | 'length'
    group_index: torch.Tensor  # (N,) index of the prompt within this batch
    routing: list[torch.Tensor] | None  # per MoE layer (N, Tp + Tc, k), for routing replay

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (N, Tp + Tc)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (N, Tp + Tc)

    def select(self, rows: torch.Tensor | slice) -> RolloutBatch:
        """The sub-batch of the given rows: an index tensor, or a slice (views, no copy)."""
        reasons = self.finish_reasons[rows] if isinstance(rows, slice) else [self.finish_reasons[i]
                                                                              for i in rows.tolist()]
        return RolloutBatch(
            prompt_ids=self.prompt_ids[rows], prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows], completion_mask=self.completion_mask[rows],
            sampling_logprobs=self.sampling_logprobs[rows], lengths=self.lengths[rows], finish_reasons=reasons,
            group_index=self.group_index[rows],
            routing=None if self.routing is None else [r[rows] for r in self.routing])

    def pad_to(self, Tp: int, Tc: int, pad_id: int) -> RolloutBatch:
        """This batch with prompts left-padded to Tp and completions right-padded to Tc (padding is masked out, and
        routes to expert 0)."""
        tp = self.prompt_ids.shape[1]
        routing = None if self.routing is None else [
            torch.cat([_pad_width(r[:, :tp], Tp, 0, left=True), _pad_width(r[:, tp:], Tc, 0, left=False)], dim=1)
            for r in self.routing]
        return replace(
            self, prompt_ids=_pad_width(self.prompt_ids, Tp, pad_id, left=True),
            prompt_mask=_pad_width(self.prompt_mask, Tp, 0, left=True),
            completion_ids=_pad_width(self.completion_ids, Tc, pad_id, left=False),
            completion_mask=_pad_width(self.completion_mask, Tc, 0, left=False),
            sampling_logprobs=_pad_width(self.sampling_logprobs, Tc, 0.0, left=False), routing=routing)

    @classmethod
    def from_rows(cls, prompts: Sequence[Sequence[int]], completions: Sequence[tuple[list[int], list[float], str]],
                  num_generations: int, pad_id: int) -> RolloutBatch:
        """The batch of N rows from per-row results: prompts[i] (token ids) and completions[i] = (token ids,
        sampled-token log-probs, finish reason), rows prompt-major (G = num_generations per prompt)."""
        N = len(prompts)
        Tp = max(len(p) for p in prompts)
        Tc = max(1, max(len(ids) for ids, _, _ in completions))
        prompt_ids = torch.full((N, Tp), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((N, Tp), dtype=torch.long)
        completion_ids = torch.full((N, Tc), pad_id, dtype=torch.long)
        completion_mask = torch.zeros((N, Tc), dtype=torch.long)
        sampling_logprobs = torch.zeros((N, Tc), dtype=torch.float32)
        for i, (prompt, (ids, logprobs, _)) in enumerate(zip(prompts, completions)):
            prompt_ids[i, Tp - len(prompt):] = torch.tensor(list(prompt))
            prompt_mask[i, Tp - len(prompt):] = 1
            completion_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            completion_mask[i, :len(ids)] = 1
            sampling_logprobs[i, :len(ids)] = torch.tensor(logprobs, dtype=torch.float32)
        return cls(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, sampling_logprobs=sampling_logprobs,
                   lengths=completion_mask.sum(dim=1), finish_reasons=[r for _, _, r in completions],
                   group_index=torch.arange(N // num_generations).repeat_interleave(num_generations), routing=None)

    @classmethod
    def cat(cls, batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
        """The rows of all `batches`, in order, padded to the widest prompt and completion. Routing is kept only when
        every batch has it; group_index counts prompts across the joined batch."""
        Tp = max(b.prompt_ids.shape[1] for b in batches)
        Tc = max(b.completion_ids.shape[1] for b in batches)
        padded = [b.pad_to(Tp, Tc, pad_id) for b in batches]
        offsets, seen = [], 0
        for b in padded:
            offsets.append(seen)
            seen += int(b.group_index.max()) + 1 if b.group_index.numel() else 0
        routing = None
        if all(b.routing is not None for b in padded):
            routing = [torch.cat([b.routing[layer] for b in padded]) for layer in range(len(padded[0].routing))]
        joined = {f.name: torch.cat([getattr(b, f.name) for b in padded]) for f in fields(cls)
                  if f.name not in ("finish_reasons", "group_index", "routing")}
        return cls(**joined, finish_reasons=[f for b in padded for f in b.finish_reasons],
                   group_index=torch.cat([b.group_index + o for b, o in zip(padded, offsets)]), routing=routing)

    def to(self, device: torch.device | str, rows: slice = slice(None)) -> RolloutBatch:
        """The given rows with every tensor on `device` (e.g. for a reference model on another device)."""
        part = self.select(rows)
        moved = {f.name: getattr(part, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(part, f.name), torch.Tensor)}
        routing = None if part.routing is None else [r.to(device) for r in part.routing]
        return replace(part, **moved, routing=routing)


def decode_completions(batch, tokenizer) -> tuple[list[list[int]], list[str]]:
    """(token ids, text) of every row's completion, padding left out. `batch`: anything with completion_ids and
    completion_mask (a RolloutBatch, model.generate's output)."""
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch.completion_ids.cpu(), batch.completion_mask.cpu())]
    return ids, [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def _select_scores(scores: ScoreResult, rows: list[int]) -> ScoreResult:
    # Failures are counted per scoring call when the call returns (the trainer's reward_failures); a selection of
    # rows carries none, so joining selections never counts one twice.
    return ScoreResult(total=[scores.total[i] for i in rows],
                       per_function={k: [v[i] for i in rows] for k, v in scores.per_function.items()}, failures={})


@dataclass
class ScoredRollout:
    """A rollout with its decoded completions, their scores and the example each prompt came from."""

    batch: RolloutBatch  # N = P * G rows
    texts: list[str]  # (N,)
    scores: ScoreResult  # N values per reward function
    examples: list[dict]  # (P,) one per prompt

    @property
    def num_groups(self) -> int:
        return len(self.examples)

    def select_groups(self, groups: torch.Tensor, G: int) -> ScoredRollout:
        """The given groups (prompt indices, ascending), each with all of its G rows."""
        prompts = groups.tolist()
        rows = [p * G + g for p in prompts for g in range(G)]
        batch = self.batch.select(torch.tensor(rows, dtype=torch.long))
        # group_index counts the prompts of this selection, as `examples` does
        batch.group_index = torch.arange(len(prompts), device=batch.group_index.device).repeat_interleave(G)
        return ScoredRollout(batch=batch,
                             texts=[self.texts[i] for i in rows], scores=_select_scores(self.scores, rows),
                             examples=[self.examples[p] for p in prompts])

    @classmethod
    def cat(cls, parts: Sequence[ScoredRollout], pad_id: int) -> ScoredRollout:
        """The groups of all `parts`, in order (parts without groups are left out)."""
        parts = [p for p in parts if p.num_groups]
        names = parts[0].scores.per_function
        scores = ScoreResult(total=[v for p in parts for v in p.scores.total],
                             per_function={k: [v for p in parts for v in p.scores.per_function[k]] for k in names},
                             failures={})
        return cls(batch=RolloutBatch.cat([p.batch for p in parts], pad_id), texts=[t for p in parts for t in p.texts],
                   scores=scores, examples=[ex for p in parts for ex in p.examples])

    def first_groups(self, num_groups: int, G: int) -> ScoredRollout:
        """The first `num_groups` groups (all of them when there are fewer)."""
        if self.num_groups <= num_groups:
            return self
        return self.select_groups(torch.arange(num_groups), G)

    def examples_per_row(self, G: int) -> list[dict]:
        return [ex for ex in self.examples for _ in range(G)]


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
