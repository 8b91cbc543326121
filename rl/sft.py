"""Cold-start supervised fine-tuning: teach a policy the think/answer layout from a few worked examples before RL.

Each example is a prompt (rendered through the same templates as GRPO, rl.data.render_prompt) followed by a worked
completion. The loss is the mean negative log-likelihood of the completion tokens only: prompt tokens are context,
never targets. The result is written in the same Hugging Face directory format as GRPO checkpoints
(model.save_model + tokenizer.save), so `scripts/train.py` and `scripts/evaluate.py` load it as is.

The recipe maps onto `SFTConfig` the way a GRPO recipe maps onto rl.config.Config: unknown keys are errors naming
the closest valid key, and `key.sub=value` overrides apply on top (rl.config.load_recipe loads both). The optimizer
and logging sections are GRPO's, and so are their checks and those of the model and data fields the two share.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from thinkzero.model.checkpoint import DTYPES
from thinkzero.rl.config import (
    LoggingSection,
    OptimSection,
    Problems,
    check_data,
    check_logging,
    check_model,
    check_optim,
    config_to_dict,
    load_recipe,
)
from thinkzero.rl.data import DataError, load_rows, render_prompt
from thinkzero.rl.optim import adamw, lr_lambda, seed_everything


@dataclass
class SFTModelSection:
    name_or_path: str = ""  # model directory to start from
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    init_preset: str | None = None  # write a random-init model of this preset when name_or_path holds none


@dataclass
class SFTDataSection:
    source: str = ""  # anything rl.data.load_rows reads: hub name, local data file(s), save_to_disk directory
    config_name: str | None = None
    split: str = "train"
    prompt_column: str = "prompt"
    completion_column: str = "completion"  # the worked solution the model learns to write
    template: str = "r1_zero"  # as in GRPO recipes: 'r1_zero' | 'chat' | a string containing {prompt}
    system_prompt: str | None = None
    max_length: int = 1024  # prompt + completion tokens; longer examples are dropped and counted
    max_examples: int | None = None  # use only the first N rows
    append_eos: bool = True  # end each completion with the EOS token so the model learns to stop


@dataclass
class SFTTrainSection:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (None: run all epochs)
    batch_size: int = 16  # examples per optimizer step
    seed: int = 42
    output_dir: str = "runs/sft"


@dataclass
class SFTConfig:
    model: SFTModelSection = field(default_factory=SFTModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-4))
    train: SFTTrainSection = field(default_factory=SFTTrainSection)
    logging: LoggingSection = field(default_factory=lambda: LoggingSection(completions_every=0))


# Config loading

# Input paths a relative recipe value names, resolved against the recipe's directory (rl.config.read_recipe).
SFT_PATH_KEYS = ("model.name_or_path", "model.tokenizer", "data.source")


def load_sft_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> SFTConfig:
    """Recipe YAML (None = defaults) + `key.sub=value` overrides -> validated SFTConfig (rl.config.load_recipe, the
    loader GRPO recipes go through)."""
    cfg = load_recipe(SFTConfig, path, overrides, path_keys=SFT_PATH_KEYS)
    validate_sft(cfg)
    return cfg


def validate_sft(cfg: SFTConfig) -> None:
    """SFT's own fields, and the sections and fields it shares with GRPO through the same checkers (and messages)."""
    p = Problems()
    m, d, t = cfg.model, cfg.data, cfg.train
    check_model(m, p, check_paths=True, path_fields=("tokenizer",))
    if m.name_or_path and not m.init_preset:
        p.need((Path(m.name_or_path) / "config.json").is_file(),
               f"model.name_or_path: {m.name_or_path!r} has no config.json (set model.init_preset to start from a "
               "random-init model)")
    check_data(d, p, check_paths=True, path_fields=("source",))
    p.need(d.max_length >= 2, f"data.max_length must be >= 2; got {d.max_length}")
    p.need(d.max_examples is None or d.max_examples >= 1,
           f"data.max_examples must be >= 1 or null; got {d.max_examples}")
    p.need(t.epochs >= 1, f"train.epochs must be >= 1; got {t.epochs}")
    p.need(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1 or null; got {t.max_steps}")
    p.need(t.batch_size >= 1, f"train.batch_size must be >= 1; got {t.batch_size}")
    p.need(bool(t.output_dir), "train.output_dir is required")
    check_optim(cfg.optim, p)
    check_logging(cfg.logging, p)
    p.raise_if_any("invalid SFT config")


# Data

def build_sft_examples(rows: Any, tokenizer: Any, *, prompt_column: str, completion_column: str, template: str,
                       system_prompt: str | None = None, max_length: int = 1024,
                       append_eos: bool = True) -> tuple[list[dict], int]:
    """Rows -> ([{'input_ids': prompt + completion ids, 'num_prompt_tokens': int}], number dropped as too long).

    Prompt and completion are tokenised separately and concatenated, which is what the policy sees in RL: the
    rendered prompt's ids, then the tokens it generates."""
    columns = list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0]) if len(rows) else []
    if len(rows) == 0:
        raise DataError("the SFT dataset is empty (0 rows)")
    for role, column in (("prompt", prompt_column), ("completion", completion_column)):
        if column not in columns:
            raise DataError(f"{role} column {column!r} not found; the dataset has columns: {', '.join(columns)} "
                            f"(set data.{role}_column)")
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise DataError("data.append_eos is set but the tokenizer has no EOS token")
    examples, dropped = [], 0
    for row in rows:
        prompt_ids = list(tokenizer.encode(render_prompt(row[prompt_column], template, tokenizer, system_prompt)))
        completion_ids = list(tokenizer.encode(row[completion_column])) + ([eos] if append_eos else [])
        if len(prompt_ids) + len(completion_ids) > max_length or not completion_ids:
            dropped += 1
            continue
        examples.append({"input_ids": prompt_ids + completion_ids, "num_prompt_tokens": len(prompt_ids)})
    if not examples:
        raise DataError(f"all {dropped} examples are longer than data.max_length={max_length} tokens")
    return examples, dropped


def collate(examples: list[dict], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch -> (input_ids (B, T), attention_mask (B, T), loss_mask (B, T)).

    loss_mask[b, t] = 1 where position t predicts a completion token (t + 1 is in the completion)."""
    T = max(len(ex["input_ids"]) for ex in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float32)
    for b, ex in enumerate(examples):
        n, p = len(ex["input_ids"]), ex["num_prompt_tokens"]
        input_ids[b, :n] = torch.tensor(ex["input_ids"])
        attention_mask[b, :n] = 1
        loss_mask[b, p - 1:n - 1] = 1.0
    return input_ids, attention_mask, loss_mask


PROGRESS_LINES = 10


def progress_line(step: int, total_steps: int, loss: float, elapsed_s: float) -> str:
    """'sft step 100/1000  loss 1.234  12.3 steps/s' (steps/s over the run so far)."""
    return f"sft step {step}/{total_steps}  loss {loss:.4g}  {step / max(elapsed_s, 1e-9):.3g} steps/s"


def completion_nll(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL over completion tokens, and the per-position log-probs (B, T) of the next token."""
    targets = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # (B, T): next token at each position
    logprobs = model(input_ids, attention_mask, target_ids=targets).logprobs  # (B, T)
    loss = -(logprobs * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    return loss, logprobs


# Training

def train_sft(cfg: SFTConfig) -> Path:
    """Runs SFT and writes the model + tokenizer to cfg.train.output_dir; returns that directory."""
    import thinkzero.model as tzmodel
    from thinkzero.rl.tracking import Tracker

    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    seed_everything(t.seed)
    out_dir = Path(t.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sft_config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if m.init_preset and not (Path(m.name_or_path) / "config.json").is_file():
        from thinkzero.model.presets import write_random_model

        write_random_model(m.init_preset, m.name_or_path, seed=t.seed)
    tokenizer = tzmodel.load_tokenizer(m.tokenizer or m.name_or_path)
    dtype = DTYPES[m.dtype]
    policy = tzmodel.load_model(m.name_or_path, dtype=dtype)
    policy.train()

    rows = load_rows(d.source, d.config_name, d.split)
    if d.max_examples is not None:
        rows = rows.select(range(min(d.max_examples, len(rows)))) if hasattr(rows, "select") else rows[:d.max_examples]
    examples, dropped = build_sft_examples(
        rows, tokenizer, prompt_column=d.prompt_column, completion_column=d.completion_column, template=d.template,
        system_prompt=d.system_prompt, max_length=d.max_length, append_eos=d.append_eos)
    steps_per_epoch = math.ceil(len(examples) / t.batch_size)
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    optimizer = adamw(policy.parameters(), o.lr, o.betas, o.eps, o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(o.warmup_steps, total_steps, o.schedule, o.min_lr_ratio))
    lg = cfg.logging
    tracker = Tracker(out_dir, is_main=True, config={"sft": config_to_dict(cfg)}, project=lg.project,
                      entity=lg.entity, run_name=lg.run_name, tags=lg.tags, group=lg.group, mode=lg.mode,
                      console=lg.console, total_steps=total_steps)
    if dropped:
        tracker.write(f"dropped {dropped} examples longer than data.max_length={d.max_length}")
    order_rng = torch.Generator().manual_seed(t.seed)
    order: list[int] = []
    skips = 0
    # without the console bar (logging.console: false), a line every tenth of the run shows that SFT progresses
    report_every = None if lg.console else max(1, total_steps // PROGRESS_LINES)
    t_start = time.perf_counter()
    try:
        for step in range(1, total_steps + 1):
            t0 = time.perf_counter()
            if len(order) < t.batch_size:  # a fresh permutation per epoch; a batch never mixes two epochs
                order = torch.randperm(len(examples), generator=order_rng).tolist()
            batch, order = [examples[i] for i in order[:t.batch_size]], order[t.batch_size:]
            input_ids, attention_mask, loss_mask = collate(batch, pad)
            loss, _ = completion_nll(policy, input_ids, attention_mask, loss_mask)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), o.max_grad_norm or float("inf")))
            if math.isfinite(norm):
                optimizer.step()
                skips = 0
            else:
                skips += 1
                if skips >= o.max_consecutive_skips:
                    raise RuntimeError(f"SFT: {skips} consecutive non-finite gradients at step {step}; lower optim.lr")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            tracker.log({"loss": float(loss.detach()), "grad_norm": norm, "learning_rate": scheduler.get_last_lr()[0],
                         "epoch": (step * t.batch_size) / len(examples),
                         "tokens": float(loss_mask.sum()), "timing/step_s": time.perf_counter() - t0}, step)
            if report_every and (step % report_every == 0 or step == total_steps):
                tracker.write(progress_line(step, total_steps, float(loss.detach()), time.perf_counter() - t_start))
        tzmodel.save_model(policy, out_dir)
        tokenizer.save(out_dir)
        tracker.write(f"saved {out_dir}")
    finally:
        tracker.close()
    return out_dir
