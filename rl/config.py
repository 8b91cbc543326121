"""All training configuration as nested dataclasses: one recipe YAML maps onto `Config` one to one.

`load_recipe(root, path, overrides)` reads the YAML, applies `key.sub=value` overrides and builds the dataclasses with
type checks (unknown keys name the closest valid one); GRPO's `load_config` and SFT's `load_sft_config` (rl/sft.py)
both use it. `validate` is the one place for cross-field checks, one checker per section; those of the sections and
fields SFT shares (`check_model`, `check_data`, `check_optim`, `check_logging`) are SFT's checks too.
`config_to_dict` is what goes to W&B, the output dir and every checkpoint. Secrets never live here: the W&B key comes
from the environment (WANDB_API_KEY or ~/.netrc) and a recipe key that looks like a secret is refused.

Inner code takes plain arguments, not this object; only the trainer and scripts read it.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

_UNION_ORIGINS = (typing.Union, types.UnionType)
T = TypeVar("T")
NAMED_TEMPLATES = ("r1_zero", "chat")
DEFAULT_PROMPTS_PER_STEP = 4


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says where and what would be right."""


@dataclass
class ModelSection:
    name_or_path: str = ""  # HF model directory (config.json + safetensors); a hub id is allowed but not fetched here
    tokenizer: str | None = None  # defaults to name_or_path
    ref_model: str | None = None  # frozen KL reference; defaults to name_or_path; not loaded at all when beta == 0
    ref_model_on_cpu: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    gradient_checkpointing: bool = False
    # Write a random-init model of this preset (model/presets.py) to name_or_path when it holds no model yet:
    # for toy runs and tests that start from scratch. A directory that already has a model is never touched.
    init_preset: str | None = None
    # Who implements the policy: 'auto' is ours for DeepSeek-V2/V3 (config.json model_type deepseek_v2/v3) and
    # transformers' AutoModelForCausalLM for any other model_type; 'thinkzero' or 'transformers' forces one.
    policy: Literal["auto", "thinkzero", "transformers"] = "auto"
    trust_remote_code: bool = False  # let a transformers checkpoint run the model code it ships (only code you trust)


@dataclass
class DataSection:
    source: str = ""  # hub name, a local .jsonl/.json/.parquet/.csv file (or glob), or a save_to_disk directory
    config_name: str | None = None  # hub dataset config, e.g. "main" for openai/gsm8k
    split: str = "train"
    prompt_column: str = "prompt"
    answer_column: str | None = "answer"  # None: no gold answer (rewards that need one will say so)
    template: str = "r1_zero"  # 'r1_zero' | 'chat' (tokenizer's chat template) | a custom string containing {prompt}
    system_prompt: str | None = None  # only with template 'chat'
    max_prompt_length: int = 512  # in tokens; longer prompts are dropped and counted
    shuffle: bool = True
    eval_source: str | None = None  # defaults to source
    eval_split: str | None = None  # None: no evaluation
    eval_max_examples: int | None = None


@dataclass
class RolloutSection:
    num_generations: int = 8  # G completions per prompt
    prompts_per_step: int | None = None  # P; a step samples P * G completions (default 4)
    batch_size: int | None = None  # alternative to prompts_per_step: completions per step, divisible by G
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy (all G completions equal, so no learning signal)
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_strings: list[str] = field(default_factory=lambda: ["</answer>"])
    ignore_eos: bool = False  # EOS does not end a completion (fixed-length rollouts for benchmarks)
    # Who samples: our engine (DeepSeek models), a colocated vLLM per process, or transformers' generate (the slow
    # path, for transformers policies on machines without vLLM).
    engine: Literal["thinkzero", "vllm", "transformers"] = "thinkzero"
    vllm: VLLMSection = field(default_factory=lambda: VLLMSection())


@dataclass
class VLLMSection:
    gpu_memory_utilization: float = 0.3  # share of GPU memory vLLM may take (on CPU: of host memory)
    enable_sleep_mode: bool = False  # release vLLM's weights and KV cache while the update runs (CUDA only)
    tensor_parallel_size: int = 1  # GPUs one vLLM engine spans
    cpu_kv_cache_space_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU machines
    max_model_len: int | None = None  # None: longest prompt + rollout.max_new_tokens
    enforce_eager: bool = True  # no CUDA graphs (they cost start-up time and memory)


@dataclass
class RolloutCorrectionSection:
    """Train-inference mismatch correction (Yao et al. 2025): the rollout engine's log-probs differ from the trainer's,
    so each token is reweighted by min(pi_old / pi_rollout, cap) (tis) or dropped when the ratio leaves
    [1 / cap, cap] (mis), per token or per sequence (the product of the sequence's token ratios)."""

    mode: Literal["none", "tis", "mis"] = "none"
    level: Literal["token", "sequence"] = "token"
    cap: float = 2.0


@dataclass
class MoESection:
    router_bias_update_gamma: float = 0.0  # aux-loss-free balancing step per update (DeepSeek-V3); 0 = off
    aux_loss_coef: float = 0.0  # weight of the MoE balance loss (replaces the checkpoint's aux_loss_alpha); 0 = off
    routing_replay: bool = False  # reuse the rollout's experts when computing log-probs in the update


@dataclass
class AlgorithmSection:
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # 'none' = Dr. GRPO
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: ratio <= 1 + epsilon_high (DAPO clip-higher); None = epsilon
    beta: float = 0.04  # KL coefficient (DeepSeekMath); 0 = no reference model
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    num_iterations: int = 1  # mu: updates per rollout (> 1 stores old log-probs)
    mini_batch_size: int | None = None  # completions per optimizer step (global); None = the whole step's batch
    micro_batch_size: int | None = None  # completions per forward/backward pass per process; None = mini-batch
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards, draw more prompts
    max_extra_draws: int = 4  # bound on extra prompt batches drawn per step by dynamic sampling
    mask_truncated_completions: bool = False  # completions that hit max_new_tokens get no loss
    moe: MoESection = field(default_factory=MoESection)
    rollout_correction: RolloutCorrectionSection = field(default_factory=RolloutCorrectionSection)


@dataclass
class RewardFunctionSection:
    name: str = ""
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardsSection:
    functions: list[RewardFunctionSection] = field(
        default_factory=lambda: [RewardFunctionSection(name="math_accuracy")]
    )
    modules: list[str] = field(default_factory=list)  # user modules (import path or .py file) that register rewards
    num_workers: int = 1  # 0 = score in-process
    timeout_s: float = 10.0  # per call; the calls of a function that overran share timeout_s more per step
    max_consecutive_timeouts: int = 3  # steps in a row with every call of a function timed out -> disable it
    fallback: float = 0.0  # score for a sample whose function raised or timed out


@dataclass
class OptimSection:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    max_grad_norm: float | None = 1.0  # None = no clipping
    max_consecutive_skips: int = 3  # non-finite updates in a row before the run stops


@dataclass
class TrainSection:
    max_steps: int = 100
    seed: int = 42
    output_dir: str = "runs/thinkzero"
    save_every: int = 50  # 0 = only at the end
    keep_last: int = 2
    resume: str = "none"  # 'none' | 'auto' (newest checkpoint in output_dir that loads) | a checkpoint path
    # A fresh run (resume 'none') into an output_dir that holds another run is refused unless this is true; then the
    # old run's checkpoints are deleted and its metrics.jsonl restarted once the new run has started.
    overwrite_output_dir: bool = False
    eval_every: int = 0  # 0 = never
    # Seconds a collective (barrier, all-reduce) may wait across processes before the run fails with an error that
    # names it, instead of hanging a cluster job forever when ranks disagree. Generous: a slow checkpoint write or
    # ZeRO-3 gather must fit.
    dist_timeout_s: float = 1800.0


@dataclass
class LoggingSection:
    project: str = "thinkzero"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"  # online falls back to offline without an API key
    log_every: int = 1
    completions_every: int = 10  # 0 = never
    completions_rows: int = 16  # rows per completions-table entry
    console: bool = True


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    rewards: RewardsSection = field(default_factory=RewardsSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


# Secrets

_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|credential)|(^|[_-])token$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """True for names like api_key, WANDB_API_KEY, hf_token, client_secret; False for max_new_tokens, pad_token_id."""
    return bool(_SECRET_KEY.search(str(key)))


def strip_secrets(value: Any) -> Any:
    """A copy of a nested dict/list structure without secret-looking keys."""
    if isinstance(value, dict):
        return {k: strip_secrets(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, list):
        return [strip_secrets(v) for v in value]
    return value


# Loading

def load_recipe(
    root: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
    path_keys: tuple[str, ...] = (),
) -> T:
    """Recipe YAML (None = all defaults) + `key.sub=value` overrides -> the `root` dataclass (Config, or SFT's
    SFTConfig), type-checked: unknown keys are errors naming the closest valid one. No cross-field checks: those are
    the caller's validator. `path_keys` are read_recipe's.

    Override values are parsed as YAML scalars/flow values (`3`, `1e-6`, `null`, `[a, b]`), except for text fields,
    which take the text verbatim (`data.template=Q: {prompt}`).
    """
    raw = {} if path is None else read_recipe(path, path_keys)
    for item in overrides:
        _apply_override(raw, item, root)
    return _build(root, raw, "", root)


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, check_paths: bool = True
) -> Config:
    """GRPO recipe + overrides (see load_recipe) -> validated Config. `check_paths=False` skips the file-system checks
    (model / data paths must exist), for tools that build those files first."""
    cfg = load_recipe(Config, path, overrides, path_keys=RECIPE_PATH_KEYS)
    validate(cfg, check_paths=check_paths)
    return cfg


# Keys whose relative paths name inputs, resolved against the recipe's directory (outputs such as train.output_dir
# stay relative to the current directory). A trailing ".*" is a list of paths.
RECIPE_PATH_KEYS = ("model.name_or_path", "model.tokenizer", "model.ref_model", "data.source", "data.eval_source",
                    "rewards.modules.*", "train.resume")


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line}); merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: str | Path, path_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe file as a plain dict: valid YAML, a mapping, no duplicated key. Relative paths under `path_keys` are
    resolved against the recipe's directory when they exist there, else left relative to the current directory;
    which one was used is printed when the two differ."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        loader = _UniqueKeyLoader(path.read_text())  # a SafeLoader: plain YAML types only
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except _DuplicateKey as e:
        raise ConfigError(f"recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    for key in path_keys:
        _resolve_recipe_path(raw, key.split("."), path.parent, key)
    return raw


def _resolve_recipe_path(node: Any, parts: list[str], recipe_dir: Path, key: str) -> None:
    section, last = parts[0], parts[1]
    if not isinstance(node, dict) or not isinstance(node.get(section), dict):
        return
    holder = node[section]
    if len(parts) == 3:  # "section.list.*"
        values = holder.get(last)
        if isinstance(values, list):
            holder[last] = [_resolved(v, recipe_dir, f"{key[:-2]}.{i}") for i, v in enumerate(values)]
    elif last in holder:
        holder[last] = _resolved(holder[last], recipe_dir, key)


def _resolved(value: Any, recipe_dir: Path, key: str) -> Any:
    if not isinstance(value, str) or not value or value in ("none", "auto") or Path(value).expanduser().is_absolute():
        return value
    if recipe_dir.resolve() == Path.cwd().resolve():
        return value
    candidate = recipe_dir / value
    if _exists(candidate):
        print(f"config: {key} {value!r} found next to the recipe: {candidate}", file=sys.stderr)
        return str(candidate)
    if _exists(Path(value)):
        print(f"config: {key} {value!r} not found next to the recipe ({recipe_dir}); using it from the current "
              f"directory", file=sys.stderr)
    return value


def _exists(path: Path) -> bool:
    text = str(path)
    if any(c in text for c in "*?["):
        return bool(glob.glob(text))
    return path.exists()


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build (type-check, no cross-field validation) a Config from a plain dict, e.g. one stored in a checkpoint."""
    return _build(Config, raw, "", Config)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a resolved recipe (Config, or SFT's SFTConfig), secrets stripped: for W&B, config.yaml
    and checkpoints."""
    return strip_secrets(dataclasses.asdict(cfg))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _apply_override(raw: dict[str, Any], item: str, root: type) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.max_steps=3)")
    parts = key.split(".")
    if _field_type(root, parts) is str and text.strip() not in ("null", "~"):
        value: Any = text  # verbatim: a template like "Q: {prompt}" is not YAML-parsed into a mapping
    else:
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where, item)]
            continue
        if node.get(part) is None:
            if _field_type(root, parts[: i + 1]) is list:
                raise ConfigError(f"override {item!r}: {where} is a list the recipe does not define; set it whole, "
                                  f"e.g. {where}=[...]")
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, item)] = value
    else:
        node[last] = value


def _field_type(root: type, parts: list[str]) -> Any:
    """Type (origin for generics) of the field at a key path under `root`, or None when the path is not a field."""
    tp: Any = root
    for part in parts:
        if typing.get_origin(tp) is list and part.isdigit():
            tp = typing.get_args(tp)[0]
            continue
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = typing.get_type_hints(tp)[part]
        if typing.get_origin(tp) in _UNION_ORIGINS:
            non_none = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = non_none[0] if len(non_none) == 1 else tp
    return typing.get_origin(tp) or tp


def _list_index(node: list, part: str, where: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {item!r}: {where} needs an index 0..{len(node) - 1} into the recipe's list")
    return int(part)


def _all_key_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_all_key_paths(tp, path + "."))
    return out


def _unknown_key_message(cls: type, key: str, where: str, root: type) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    section = where.rpartition(".")[0]
    msg = f"unknown config key '{where}'"
    if is_secret_key(key):
        return (msg + ": secrets are never read from recipes or overrides; set them in the environment "
                "(WANDB_API_KEY) or ~/.netrc")
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    elsewhere = [p for p in _all_key_paths(root) if p.rpartition(".")[2] == key]
    if close:
        msg += f"; did you mean '{(section + '.' if section else '') + close[0]}'?"
    elif elsewhere:
        msg += f"; did you mean '{elsewhere[0]}'?"
    else:
        msg += f"; valid keys here: {', '.join(names)}"
    return msg


def _build(cls: type, raw: Any, where: str, root: type) -> Any:
    """`raw` as a `cls` instance; `root` is the recipe's top dataclass, where an unknown key's hint looks."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config '{where or '<root>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(_unknown_key_message(cls, str(key), path, root))
        kwargs[key] = _convert(value, hints[key], path, root)
    return cls(**kwargs)


_SCALARS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in _UNION_ORIGINS:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, root: type) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config '{where}' must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in _UNION_ORIGINS:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where, root)
            except ConfigError:
                pass
        raise ConfigError(f"config '{where}' expects {_type_name(tp)}; got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, root)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config '{where}' expects a {_type_name(tp)}; got {value!r}")
        return [_convert(v, args[0], f"{where}.{i}", root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config '{where}' expects a mapping; got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-6` (no dot) as a string; accept what Python reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    elif tp in _SCALARS and _SCALARS[tp](value):
        return float(value) if tp is float else value
    raise ConfigError(f"config '{where}' expects {_type_name(tp)}; got {value!r} ({type(value).__name__})")


# Validation (the one place for cross-field rules). Each section has its own checker; GRPO's `validate` and SFT's
# `validate_sft` (rl/sft.py) call the same ones for the sections and fields the two recipes share.

class Problems(list):
    """What the checkers found wrong, one message each, raised together so a recipe is fixed in one go."""

    def need(self, ok: bool, msg: str) -> None:
        if not ok:
            self.append(msg)

    def raise_if_any(self, heading: str) -> None:
        if self:
            raise ConfigError(f"{heading}:\n  - " + "\n  - ".join(self))


def _looks_local(path: str) -> bool:
    """A path the user means on disk (not a hub id like 'openai/gsm8k')."""
    return (path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path
            or Path(path).suffix in (".json", ".jsonl", ".parquet", ".csv", ".safetensors"))


def check_model(m: Any, p: Problems, *, check_paths: bool, path_fields: tuple[str, ...],
                transformers_presets: bool = False) -> None:
    """model.name_or_path, the local paths among `path_fields` and model.init_preset (GRPO's and SFT's model
    sections both have these; GRPO's presets include transformers models)."""
    p.need(bool(m.name_or_path), "model.name_or_path is required (a model directory with config.json + safetensors)")
    if check_paths:
        for name in path_fields:
            value = getattr(m, name)
            if m.init_preset and value in (None, m.name_or_path):
                continue  # written at start-up when missing
            if value and _looks_local(value) and not Path(value).expanduser().exists():
                p.append(f"model.{name}: path {value!r} does not exist")
    if m.init_preset is not None:
        from thinkzero.model.presets import PRESETS

        names = sorted(PRESETS)
        if transformers_presets:
            from thinkzero.rl.hf_policy import HF_PRESETS

            names += sorted(HF_PRESETS)
        p.need(m.init_preset in names,
               f"model.init_preset must be one of {', '.join(names)} or null; got {m.init_preset!r}")


def check_data(d: Any, p: Problems, *, check_paths: bool, path_fields: tuple[str, ...]) -> None:
    """data.source, the local paths among `path_fields`, data.template and data.system_prompt (fields GRPO's and
    SFT's data sections share)."""
    p.need(bool(d.source), "data.source is required (hub dataset name, local data file or save_to_disk directory)")
    if check_paths:
        for name in path_fields:
            value = getattr(d, name)
            if value and _looks_local(value) and not any(c in value for c in "*?[") \
                    and not Path(value).expanduser().exists():
                p.append(f"data.{name}: path {value!r} does not exist")
    p.need(d.template in NAMED_TEMPLATES or "{prompt}" in d.template,
           f"data.template must be one of {', '.join(NAMED_TEMPLATES)} or a string containing {{prompt}}; "
           f"got {d.template!r}")
    p.need(d.system_prompt is None or d.template == "chat",
           "data.system_prompt is only used with data.template: chat")


def check_optim(o: OptimSection, p: Problems) -> None:
    p.need(o.lr > 0, f"optim.lr must be > 0; got {o.lr}")
    p.need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {o.weight_decay}")
    p.need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optim.betas must be two numbers in [0, 1); got {o.betas}")
    p.need(o.eps > 0, f"optim.eps must be > 0; got {o.eps}")
    p.need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0; got {o.warmup_steps}")
    p.need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1]; got {o.min_lr_ratio}")
    p.need(o.max_grad_norm is None or o.max_grad_norm > 0,
           f"optim.max_grad_norm must be > 0 or null (no clipping); got {o.max_grad_norm}")
    p.need(o.max_consecutive_skips >= 1, f"optim.max_consecutive_skips must be >= 1; got {o.max_consecutive_skips}")


def check_logging(lg: LoggingSection, p: Problems) -> None:
    p.need(lg.log_every >= 1, f"logging.log_every must be >= 1; got {lg.log_every}")
    p.need(lg.completions_every >= 0,
           f"logging.completions_every must be >= 0 (0 = never); got {lg.completions_every}")
    p.need(lg.completions_rows >= 1, f"logging.completions_rows must be >= 1; got {lg.completions_rows}")


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Cross-field checks; also fills derived values (rollout.prompts_per_step / batch_size). Raises ConfigError
    listing every problem found."""
    p = Problems()
    m, d = cfg.model, cfg.data
    check_model(m, p, check_paths=check_paths, path_fields=("name_or_path", "tokenizer", "ref_model"),
                transformers_presets=True)
    _check_policy_engine(m, cfg.rollout.engine, p, check_paths=check_paths)
    check_data(d, p, check_paths=check_paths, path_fields=("source", "eval_source"))
    p.need(d.max_prompt_length >= 1, f"data.max_prompt_length must be >= 1; got {d.max_prompt_length}")
    p.need(d.eval_max_examples is None or d.eval_max_examples >= 1,
           f"data.eval_max_examples must be >= 1 or null; got {d.eval_max_examples}")
    _check_rollout(cfg.rollout, p)
    _check_algorithm(cfg.algorithm, cfg.rollout.batch_size, p)
    _check_rewards(cfg.rewards, p)
    check_optim(cfg.optim, p)
    _check_train(cfg.train, d, p, check_paths=check_paths)
    check_logging(cfg.logging, p)
    p.raise_if_any("invalid config")


def _check_policy_engine(m: ModelSection, engine: str, p: Problems, *, check_paths: bool) -> None:
    """Whether rollout.engine can sample the policy: known from the preset, or from a local model's config.json (a
    model not on disk yet is checked when it loads)."""
    from thinkzero.rl.hf_policy import PolicyError, check_engine, policy_kind, preset_kind

    config = Path(m.name_or_path).expanduser() / "config.json"
    try:
        if m.init_preset:
            kind = "transformers" if m.policy == "transformers" else preset_kind(m.init_preset)
        elif check_paths and config.is_file():
            kind = policy_kind(config.parent, m.policy)
        else:
            return
        check_engine(kind, engine)
    except PolicyError as e:
        p.append(str(e))


def _check_rollout(r: RolloutSection, p: Problems) -> None:
    """Also derives prompts_per_step and batch_size from each other (one of them, or the default)."""
    G = r.num_generations
    p.need(G >= 2, f"rollout.num_generations must be >= 2 (advantages compare completions within a group); got {G}")
    if r.batch_size is not None:
        if G >= 1 and r.batch_size % G != 0:
            p.append(f"rollout.batch_size ({r.batch_size}) must be divisible by rollout.num_generations ({G}): each "
                     f"prompt gets a whole group")
        elif G >= 1:
            derived = r.batch_size // G
            if r.prompts_per_step is not None and r.prompts_per_step != derived:
                p.append(f"rollout.prompts_per_step ({r.prompts_per_step}) disagrees with rollout.batch_size "
                         f"({r.batch_size}) / num_generations ({G}) = {derived}; give only one of them")
            r.prompts_per_step = derived
    elif r.prompts_per_step is None:
        r.prompts_per_step = DEFAULT_PROMPTS_PER_STEP
    p.need(r.prompts_per_step is not None and r.prompts_per_step >= 1,
           f"rollout.prompts_per_step must be >= 1; got {r.prompts_per_step}")
    if r.prompts_per_step is not None and G >= 1:
        r.batch_size = r.prompts_per_step * G
    p.need(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1; got {r.max_new_tokens}")
    p.need(r.temperature >= 0, f"rollout.temperature must be >= 0; got {r.temperature}")
    p.need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1]; got {r.top_p}")
    p.need(r.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off); got {r.top_k}")
    v = r.vllm
    p.need(0 < v.gpu_memory_utilization <= 1,
           f"rollout.vllm.gpu_memory_utilization must be in (0, 1]; got {v.gpu_memory_utilization}")
    p.need(v.tensor_parallel_size >= 1,
           f"rollout.vllm.tensor_parallel_size must be >= 1; got {v.tensor_parallel_size}")
    p.need(v.cpu_kv_cache_space_gib > 0,
           f"rollout.vllm.cpu_kv_cache_space_gib must be > 0; got {v.cpu_kv_cache_space_gib}")
    p.need(v.max_model_len is None or v.max_model_len >= 2,
           f"rollout.vllm.max_model_len must be >= 2 or null; got {v.max_model_len}")


def _check_algorithm(a: AlgorithmSection, batch: int | None, p: Problems) -> None:
    """`batch` is the rollout's completions per step (derived by _check_rollout), which mini-batches must divide."""
    rc = a.rollout_correction
    p.need(rc.cap > 1, f"algorithm.rollout_correction.cap must be > 1; got {rc.cap}")
    p.need(0 < a.epsilon < 1, f"algorithm.epsilon must be in (0, 1) (lower clip 1 - epsilon > 0); got {a.epsilon}")
    p.need(a.epsilon_high is None or a.epsilon_high > 0,
           f"algorithm.epsilon_high must be > 0 or null (= epsilon); got {a.epsilon_high}")
    p.need(a.beta >= 0 and math.isfinite(a.beta), f"algorithm.beta must be >= 0; got {a.beta}")
    p.need(a.num_iterations >= 1, f"algorithm.num_iterations must be >= 1; got {a.num_iterations}")
    if a.mini_batch_size is not None:
        p.need(a.mini_batch_size >= 1, f"algorithm.mini_batch_size must be >= 1; got {a.mini_batch_size}")
        if batch and a.mini_batch_size >= 1:
            p.need(batch % a.mini_batch_size == 0,
                   f"algorithm.mini_batch_size ({a.mini_batch_size}) must divide the step's batch of "
                   f"prompts_per_step * num_generations = {batch} completions")
    if a.micro_batch_size is not None:
        p.need(a.micro_batch_size >= 1, f"algorithm.micro_batch_size must be >= 1; got {a.micro_batch_size}")
    p.need(a.max_extra_draws >= 0, f"algorithm.max_extra_draws must be >= 0; got {a.max_extra_draws}")
    p.need(a.moe.router_bias_update_gamma >= 0,
           f"algorithm.moe.router_bias_update_gamma must be >= 0; got {a.moe.router_bias_update_gamma}")
    p.need(a.moe.aux_loss_coef >= 0, f"algorithm.moe.aux_loss_coef must be >= 0; got {a.moe.aux_loss_coef}")


def _check_rewards(rw: RewardsSection, p: Problems) -> None:
    p.need(len(rw.functions) >= 1, "rewards.functions must list at least one reward function")
    for i, fn in enumerate(rw.functions):
        p.need(bool(fn.name), f"rewards.functions.{i}.name is required")
        p.need(math.isfinite(fn.weight), f"rewards.functions.{i}.weight must be finite; got {fn.weight}")
        for key in fn.params:
            p.need(not is_secret_key(key),
                   f"rewards.functions.{i}.params.{key}: looks like a secret, and secrets are never read from "
                   "recipes or overrides; set it in the environment and read it inside the reward function")
    p.need(rw.num_workers >= 0, f"rewards.num_workers must be >= 0 (0 = in-process); got {rw.num_workers}")
    p.need(rw.timeout_s > 0, f"rewards.timeout_s must be > 0; got {rw.timeout_s}")
    p.need(rw.max_consecutive_timeouts >= 1,
           f"rewards.max_consecutive_timeouts must be >= 1; got {rw.max_consecutive_timeouts}")


def _check_train(t: TrainSection, d: DataSection, p: Problems, *, check_paths: bool) -> None:
    p.need(t.max_steps >= 1, f"train.max_steps must be >= 1; got {t.max_steps}")
    p.need(t.save_every >= 0, f"train.save_every must be >= 0 (0 = only at the end); got {t.save_every}")
    p.need(t.keep_last >= 1, f"train.keep_last must be >= 1; got {t.keep_last}")
    p.need(t.eval_every >= 0, f"train.eval_every must be >= 0 (0 = never); got {t.eval_every}")
    p.need(t.dist_timeout_s > 0, f"train.dist_timeout_s must be > 0 seconds; got {t.dist_timeout_s}")
    p.need(bool(t.output_dir), "train.output_dir is required")
    if t.output_dir and Path(t.output_dir).expanduser().exists() and not Path(t.output_dir).expanduser().is_dir():
        p.append(f"train.output_dir {t.output_dir!r} is an existing file; it must be a directory (or not exist)")
    if t.resume not in ("none", "auto") and check_paths:
        p.need(Path(t.resume).expanduser().is_dir(),
               f"train.resume must be 'none', 'auto' or an existing checkpoint directory; {t.resume!r} does not exist")
    if t.eval_every > 0:
        p.need(d.eval_split is not None, "train.eval_every > 0 needs data.eval_split (which split to evaluate on)")


def check_world_size(cfg: Config, world_size: int) -> None:
    """Checks that need the number of processes (known only once the trainer starts): each rank owns whole groups
    and an equal share of every mini-batch."""
    r, a = cfg.rollout, cfg.algorithm
    p = Problems()
    P = r.prompts_per_step or 0
    if P % world_size:
        p.append(f"rollout.prompts_per_step ({P}) must be divisible by the number of processes "
                 f"({world_size}): each process owns whole groups")
    mini = a.mini_batch_size or (r.batch_size or 0)
    if mini % world_size:
        p.append(f"algorithm.mini_batch_size ({mini}) must be divisible by the number of processes ({world_size})")
    elif a.micro_batch_size is not None and (mini // world_size) % a.micro_batch_size:
        p.append(f"algorithm.micro_batch_size ({a.micro_batch_size}) must divide the per-process "
                 f"mini-batch of {mini // world_size} completions ({mini} over {world_size} processes)")
    p.raise_if_any("invalid config for this launch")


# Help text

def config_help(cls: type = Config) -> str:
    """Every recipe section and field with its type, default and comment, from the dataclasses above: for --help."""
    return "\n".join(_help_lines(cls, cls(), ""))


def _help_lines(cls: type, default: Any, indent: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    lines = []
    for f in dataclasses.fields(cls):
        value, tp = getattr(default, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{indent}{f.name}:")
            lines.extend(_help_lines(tp, value, indent + "  "))
            continue
        if dataclasses.is_dataclass(typing.get_args(tp)[0] if typing.get_args(tp) else None):
            value = [dataclasses.asdict(v) for v in value]
        shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
        note = f"  # {comments[f.name]}" if f.name in comments else ""
        lines.append(f"{indent}{f.name}: {shown}  ({_type_name(tp)}){note}")
    return lines


def _field_comments(cls: type) -> dict[str, str]:
    """The `# ...` comment at the end of each field's line in the class source (absent when the source is not
    available, e.g. in a frozen build)."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+): [^\n]*?  # ([^\n]*)$", source, flags=re.MULTILINE)
    return dict(found)
