"""How reward functions are named, found, and told what inputs they get.

A reward function is a plain callable. Its signature says what it receives:

    @reward("my_reward")
    def my_reward(completion: str, answer: str) -> float | None: ...

* `completion` (per-sample) or `completions` (batched) is the model's text;
* any other parameter is filled, in this order, from the recipe's `params` for this reward, from the rollout facts
  (`prompt`, `completion_ids`, `num_tokens`, `finish_reason`; batched functions may also say `prompts` and
  `finish_reasons`), or from the dataset column of that name; a parameter with a default may be left unfilled;
* `**kwargs` receives every column and fact.

Batched functions (`@reward("name", batched=True)`, TRL / open-r1 style) get lists and return a list of the same length.
Return `None` for "cannot judge".

Functions load by registered name (a user module of @reward functions loads with `load_module`), or without
registration from `package.module:function` or `/path/file.py:function`.
An undecorated function loaded that way is batched when it has a `completions` parameter.
"""

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

FACTS = ("prompt", "completion_ids", "num_tokens", "finish_reason")
_BATCHED_FACT_ALIASES = {"prompts": "prompt", "finish_reasons": "finish_reason"}


@dataclass(frozen=True)
class RewardFn:
    """A reward function and where a worker process can load it from."""

    name: str
    fn: Callable = field(repr=False, compare=False)
    batched: bool
    module: str
    qualname: str
    file: str | None  # the source file: used when `module` cannot be imported by name in a worker

    @property
    def where(self) -> str:
        return f"{self.module}:{self.qualname}"


_REGISTRY: dict[str, RewardFn] = {}


def reward(name: str, *, batched: bool = False):
    """Register a reward function under `name`. `batched=True` for `f(completions: list[str], ...) -> list`."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def register(fn: Callable) -> Callable:
        entry = _entry(fn, name, batched)
        _completion_param(entry)  # fail at definition time on an unusable signature
        existing = _REGISTRY.get(name)
        if existing is not None and not _same_function(existing, entry):
            raise ValueError(
                f"reward name {name!r} is already registered by {existing.where}; "
                f"pick another name for {entry.where}"
            )
        _REGISTRY[name] = entry
        fn.__reward_name__ = name
        fn.__reward_batched__ = batched
        return fn

    return register


def _same_function(a: RewardFn, b: RewardFn) -> bool:
    # The same definition imported twice (a script run as __main__ and re-imported by a worker, a reloaded module).
    if a.qualname != b.qualname:
        return False
    return a.module == b.module or (a.file is not None and a.file == b.file)


def _entry(fn: Callable, name: str, batched: bool) -> RewardFn:
    try:
        file = inspect.getsourcefile(fn)
    except TypeError:
        file = None
    return RewardFn(name=name, fn=fn, batched=batched, module=fn.__module__, qualname=fn.__qualname__,
                    file=os.path.abspath(file) if file else None)


def _builtins_loaded() -> None:
    # Built-ins register themselves when their modules are imported (the package __init__ does that).
    import thinkzero.rewards  # noqa: F401


def list_rewards() -> list[str]:
    _builtins_loaded()
    return sorted(_REGISTRY)


def get(name: str) -> RewardFn:
    """The registered reward `name`. Unknown name -> KeyError listing the registered ones."""
    _builtins_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"unknown reward {name!r}.{hint} Registered rewards: {', '.join(sorted(_REGISTRY))}. "
            "A function of your own loads by path: 'package.module:function' or '/path/to/file.py:function'."
        )
    return _REGISTRY[name]


def resolve(name: str) -> RewardFn:
    """A registered name, or a `module:function` / `file.py:function` path."""
    if ":" in name and not (len(name) > 1 and name[1] == ":" and name.count(":") == 1):  # not a bare Windows drive
        return load_function(name)
    return get(name)


def _module_name_for_file(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    return f"_thinkzero_reward_{stem}_{digest}"


def _import_file(path: str):
    path = os.path.abspath(path)
    name = _module_name_for_file(path)
    if name in sys.modules:
        return sys.modules[name]
    if not os.path.isfile(path):
        raise ImportError(f"reward file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _lookup(module, qualname: str) -> Callable:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def load_module(path: str):
    """Import a user module by dotted name or .py path so that its @reward functions register."""
    try:
        if path.endswith(".py") or os.sep in path:
            return _import_file(path)
        return importlib.import_module(path)
    except Exception as err:
        raise ImportError(f"could not import reward module {path!r}: {type(err).__name__}: {err}") from err


def load_function(path: str) -> RewardFn:
    """Load `package.module:function` or `/path/file.py:function` (registration not needed)."""
    module_part, _, qualname = path.rpartition(":")
    if not module_part or not qualname:
        raise ValueError(f"reward path {path!r} must look like 'package.module:function' or '/path/file.py:function'")
    try:
        if module_part.endswith(".py") or os.sep in module_part:
            module = _import_file(module_part)
        else:
            module = importlib.import_module(module_part)
    except Exception as err:
        raise ImportError(
            f"could not import the module of reward {path!r}: {type(err).__name__}: {err}"
        ) from err
    try:
        fn = _lookup(module, qualname)
    except AttributeError:
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ImportError(
            f"module {module_part!r} has no function {qualname!r} (reward {path!r}); it defines: {', '.join(public)}"
        ) from None
    if not callable(fn):
        raise TypeError(f"reward {path!r} is a {type(fn).__name__}, not a function")
    name = getattr(fn, "__reward_name__", None)
    if name is not None and name in _REGISTRY:
        return _REGISTRY[name]
    batched = "completions" in _parameters(fn)
    entry = _entry(fn, fn.__name__, batched)
    if module_part.endswith(".py") or os.sep in module_part:
        entry = RewardFn(entry.name, fn, batched, module.__name__, qualname, os.path.abspath(module_part))
    _completion_param(entry)
    return entry


def load_in_worker(module: str, qualname: str, file: str | None) -> Callable:
    """Find a function again inside a worker process (by module name, else from its file)."""
    if module in ("__main__", "__mp_main__"):
        # spawn already re-ran the parent's main script as __mp_main__ in this process
        for name in ("__mp_main__", "__main__"):
            main = sys.modules.get(name)
            main_file = getattr(main, "__file__", None)
            if main_file and file and os.path.abspath(main_file) == file:
                try:
                    return _lookup(main, qualname)
                except AttributeError:
                    pass
    if module not in ("__main__", "__mp_main__") and not module.startswith("_thinkzero_reward_"):
        try:
            return _lookup(importlib.import_module(module), qualname)
        except (ImportError, AttributeError):
            if file is None:
                raise
    if file is None:
        raise ImportError(f"cannot load {module}:{qualname} in a worker: its source file is unknown")
    return _lookup(_import_file(file), qualname)


def _parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as err:
        raise TypeError(f"cannot read the signature of reward function {fn!r}: {err}") from err


def _completion_param(entry: RewardFn) -> str:
    wanted = "completions" if entry.batched else "completion"
    params = _parameters(entry.fn)
    if wanted not in params:
        other = "completion" if entry.batched else "completions"
        hint = (f"; it has `{other}` — register it with batched={not entry.batched}" if other in params else "")
        raise TypeError(
            f"reward {entry.name!r} ({entry.where}) has no `{wanted}` parameter{hint}. "
            f"Expected e.g. def f({wanted}, answer) -> {'list[float]' if entry.batched else 'float | None'}"
        )
    return wanted


@dataclass(frozen=True)
class Binding:
    """How to call one reward function: where each argument comes from."""

    params: dict  # fixed keyword arguments from the recipe
    columns: tuple[tuple[str, str, bool], ...]  # (argument, column, required)
    facts: tuple[tuple[str, str], ...]  # (argument, fact)
    all_inputs: bool  # the function takes **kwargs: pass every column and fact


def bind(entry: RewardFn, params: dict, columns=None) -> Binding:
    """Match the function's signature against recipe params, rollout facts and dataset columns.

    Raises TypeError naming the problem (a column the dataset lacks, a param the function does not take)."""
    completion = _completion_param(entry)
    signature = _parameters(entry.fn)
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    bound_cols, bound_facts = [], []
    for arg, p in signature.items():
        if arg == completion or p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(f"reward {entry.name!r} ({entry.where}): parameter {arg!r} is positional-only; "
                            "rewards are called with keyword arguments")
        fact = arg if arg in FACTS else (_BATCHED_FACT_ALIASES.get(arg) if entry.batched else None)
        has_default = p.default is not inspect.Parameter.empty
        if arg in params:
            continue
        if fact is not None:
            bound_facts.append((arg, fact))
        elif columns is None or arg in columns:
            bound_cols.append((arg, arg, not has_default))
        elif not has_default:
            raise TypeError(
                f"reward {entry.name!r} ({entry.where}) needs {arg!r}, which is not a dataset column "
                f"(columns: {', '.join(sorted(columns)) or 'none'}), a rollout fact ({', '.join(FACTS)}) "
                f"or a param of this reward in the recipe"
            )
    unknown = [k for k in params if k not in signature or k == completion]
    if unknown and not accepts_kwargs:
        takes = [a for a in signature if a != completion]
        raise TypeError(
            f"reward {entry.name!r} ({entry.where}) does not take param(s) {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(takes) or 'nothing besides the completion'}"
        )
    return Binding(dict(params), tuple(bound_cols), tuple(bound_facts), accepts_kwargs)
