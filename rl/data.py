"""Prompts for RL: load a dataset, render each prompt through a template, tokenise, and sample batches of prompts.

Sources (`load_rows`): a hub dataset name with config and split (`openai/gsm8k`, `main`, `train`), local
.jsonl/.json/.parquet/.csv files (a file, a glob, or a directory of them), or a `save_to_disk` directory.

Each prepared example is a dict with every column of the dataset (reward functions may ask for any of them), plus
    prompt       the raw question (from prompt_column)
    answer       the gold answer (from answer_column), when one is mapped
    prompt_text  the rendered prompt the policy sees
    prompt_ids   its token ids

`PromptSampler` hands out P prompts per step in a per-epoch shuffled order derived from the seed only, so its
state is two integers (epoch, position) and a resumed run continues exactly.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# The DeepSeek-R1-Zero template (DeepSeek-R1 paper, Table 1); prompt goes where {prompt} is, as a sentence (a
# question keeps its '?', anything else ends in '.'). It ends by opening the think block, so completions start
# inside it; the format rewards (rewards/format.py) are given the rendered prompt and count that opening <think>.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt} Assistant: <think>"
)
TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE}

# file extension -> `datasets` packaged builder
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class PromptTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class DataError(ValueError):
    """A dataset that cannot be used as configured; the message says what was found."""


# Loading

def load_rows(source: str, config_name: str | None = None, split: str = "train"):
    """-> datasets.Dataset. Local paths are tried first; anything else is a hub dataset name.

    A local file / glob / directory of data files is one split by itself (`split` is not used for it); a
    `save_to_disk` DatasetDict is indexed by `split`.
    """
    import datasets  # heavy; imported when data is actually loaded

    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"saved dataset {source} has no split {split!r}; splits: {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    files = _data_files(path) if (path.exists() or any(c in source for c in "*?[")) else None
    if files is not None:
        suffixes = {_suffix(f) for f in files}
        if len(suffixes) != 1 or next(iter(suffixes)) not in _BUILDERS:
            raise DataError(f"data files under {source} must all be one of {', '.join(_BUILDERS)}; "
                            f"found {', '.join(sorted(suffixes)) or 'none'}")
        builder = _BUILDERS[suffixes.pop()]
        if all(Path(f).stat().st_size == 0 for f in files):  # datasets fails on these with a bare StopIteration
            raise DataError(f"the dataset is empty: {source} holds no rows")
        return datasets.load_dataset(builder, data_files=files, split="train")
    if source.startswith((".", "/", "~")) or _suffix(source) in _BUILDERS:
        raise DataError(f"data source {source} does not exist")
    return datasets.load_dataset(source, config_name, split=split)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _suffix(path: str) -> str:
    return Path(path).suffix.lower()


def _data_files(path: Path) -> list[str]:
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.iterdir() if p.is_file() and _suffix(str(p)) in _BUILDERS)
    return sorted(glob.glob(str(path)))


# Templates

def render_prompt(prompt: str, template: str, tokenizer: Any = None, system_prompt: str | None = None) -> str:
    """template: 'r1_zero', 'chat' (the tokenizer's chat template, optional system prompt) or a string with
    {prompt}. Substitution is literal, so other braces in a custom template stay as written."""
    if template == "chat":
        if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
            raise DataError("template 'chat' needs a tokenizer with apply_chat_template")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = TEMPLATES.get(template, template)
    if template == "r1_zero":
        prompt = _as_sentence(prompt)
    if "{prompt}" not in text:
        raise DataError(f"template must be one of r1_zero, chat or a string containing {{prompt}}; got {template!r}")
    return text.replace("{prompt}", prompt)


def _as_sentence(text: str) -> str:
    text = text.rstrip()
    return text if text.endswith((".", "?", "!")) else text + "."


def prepare_examples(
    rows: Any,
    tokenizer: PromptTokenizer,
    *,
    prompt_column: str = "prompt",
    answer_column: str | None = "answer",
    template: str = "r1_zero",
    system_prompt: str | None = None,
    max_prompt_length: int = 512,
) -> tuple[list[dict[str, Any]], int]:
    """Rows (a datasets.Dataset or a list of dicts) -> (examples, number dropped for exceeding max_prompt_length)."""
    columns = list(rows.column_names) if hasattr(rows, "column_names") else (list(rows[0]) if len(rows) else [])
    if len(rows) == 0:
        raise DataError("the dataset is empty (0 rows)")
    for role, column in (("prompt", prompt_column), ("answer", answer_column)):
        if column is not None and column not in columns:
            raise DataError(f"{role} column {column!r} not found; the dataset has columns: {', '.join(columns)} "
                            f"(set data.{role}_column)")
    examples, dropped = [], 0
    for row in rows:
        prompt = row[prompt_column]
        if not isinstance(prompt, str):
            raise DataError(f"prompt column {prompt_column!r} must hold text; got {type(prompt).__name__}")
        text = render_prompt(prompt, template, tokenizer, system_prompt)
        ids = list(tokenizer.encode(text))
        if len(ids) > max_prompt_length:
            dropped += 1
            continue
        example = dict(row)
        example["prompt"] = prompt
        if answer_column is not None:
            example["answer"] = row[answer_column]
        example["prompt_text"] = text
        example["prompt_ids"] = ids
        examples.append(example)
    if not examples:
        raise DataError(f"all {dropped} prompts are longer than max_prompt_length={max_prompt_length} tokens; "
                        "raise data.max_prompt_length or use a shorter template")
    return examples, dropped


# Sampling

class PromptSampler:
    """Batches of prompts, forever, in an order that depends only on (seed, epoch).

    Every process builds the same sampler; `batch_size` is the GLOBAL number of prompts per step and each rank
    keeps its contiguous slice of it, so ranks own whole groups and together see the global batch. `draw(n)` takes
    n more prompts (dynamic sampling) from the same stream. An epoch is one pass over a fresh permutation; a batch
    that crosses the end continues into the next epoch's permutation.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(examples) == 0:
            raise DataError("PromptSampler needs at least one example")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self._check_divisible(batch_size, world_size)
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # index into the current epoch's order
        self._order = self._epoch_order(0)

    @staticmethod
    def _check_divisible(n: int, world_size: int) -> None:
        if n < 1 or n % world_size:
            raise ValueError(f"{n} prompts cannot be split evenly over {world_size} processes")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)  # seeded by (seed, epoch) only

    def _take_global(self, n: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(indices), len(self._order) - self.position)
            indices.extend(self._order[self.position:self.position + take].tolist())
            self.position += take
        return indices

    def draw(self, num_prompts: int) -> list[Any]:
        """The next num_prompts (global) prompts; returns this rank's slice."""
        self._check_divisible(num_prompts, self.world_size)
        indices = self._take_global(num_prompts)
        per_rank = num_prompts // self.world_size
        mine = indices[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [self.examples[i] for i in mine]

    def next_batch(self) -> list[Any]:
        return self.draw(self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> list[Any]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_examples"] != len(self.examples) or state["seed"] != self.seed:
            raise ValueError(f"data state was saved for {state['num_examples']} examples with seed {state['seed']}; "
                             f"this run has {len(self.examples)} examples with seed {self.seed}. Resuming needs the "
                             "same dataset, filtering and seed")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
