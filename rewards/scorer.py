"""Scoring completions with several reward functions, weighted, isolated in worker processes.

    scorer = Scorer([RewardSpec("math_accuracy"), RewardSpec("format", weight=0.5, params={"strict": True})],
                    num_workers=2, timeout_s=5.0)
    result = scorer.score(completions, columns={"answer": answers}, facts={"num_tokens": lengths})
    result.total            # [N] weighted sum
    result.per_function     # name -> [N] float | None
    result.failures         # name -> Counter(kind -> samples)

Isolation. Functions run in `num_workers` processes started with the 'spawn' method (never 'fork': the trainer may
hold threads, CUDA contexts or process groups). Each call has a wall-clock timeout measured by the parent process,
which waits on pipes — no signals — so it works from any thread. A worker that overruns is killed and replaced. Once
a function has overrun in a `score` call, all its remaining calls there share one deadline `timeout_s` later (calls
still unstarted then are not run), so a function that always hangs costs about 2 x `timeout_s` per call of `score`,
not `timeout_s` per sample. A function whose every call timed out in `max_consecutive_timeouts` `score` calls in a row
is disabled (one `RewardWarning`; listed in `Scorer.disabled`; its samples score `None`, so the fallback). A call
that raises, times out, returns a non-finite number or a non-number, or (batched) a list of the wrong length, or kills
its worker, is a *failure*: that sample scores `None` in `per_function`, `fallback` in the total, is counted in
`failures[name][kind]`, and the first failure of each (function, kind) raises a `RewardWarning`.

`None` from a function means "cannot judge": it stays `None` in `per_function` (so means leave it out) and counts as
`fallback` in the total.

`num_workers=0` calls the functions in this process (for debugging): exceptions and bad values are still contained,
but timeouts cannot be enforced there and a hung function hangs the caller.
"""

import contextlib
import difflib
import itertools
import math
import numbers
import os
import signal
import threading
import time
import traceback
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing import connection, get_context

from thinkzero.rewards import registry

_IDLE = 1e300  # progress start time of a worker that is not running a call


class RewardWarning(RuntimeWarning):
    """A reward function failed on some samples (they got the fallback)."""


@dataclass
class RewardSpec:
    """One entry of a recipe's `rewards:` list."""

    name: str  # registered name, or 'package.module:function' / '/path/file.py:function'
    weight: float = 1.0
    params: dict = field(default_factory=dict)
    alias: str | None = None  # key in results/logs; needed when one function is listed twice

    @classmethod
    def from_dict(cls, d: dict) -> "RewardSpec":
        valid = ("name", "weight", "params", "alias")
        for key in d:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown key {key!r} in reward spec {d!r}{hint}; valid keys: {', '.join(valid)}")
        if "name" not in d:
            raise ValueError(f"reward spec {d!r} has no 'name'")
        return cls(**d)


@dataclass
class ScoreResult:
    total: list[float]
    per_function: dict[str, list]
    failures: dict[str, Counter]

    def means(self) -> dict[str, float]:
        """Per-function mean over the samples it judged (None and failures left out; nan if none)."""
        out = {}
        for name, values in self.per_function.items():
            judged = [v for v in values if v is not None]
            out[name] = sum(judged) / len(judged) if judged else math.nan
        return out


# --- calling one function (shared by workers and the in-process mode) ----------------------------------------------

def _check_value(value):
    """('ok', float | None) or ('fail', kind, message)."""
    if value is None:
        return ("ok", None)
    if isinstance(value, numbers.Real):
        f = float(value)
        if not math.isfinite(f):
            return ("fail", "non_finite", f"returned {f}")
        return ("ok", f)
    return ("fail", "wrong_type", f"returned {type(value).__name__} {value!r:.60}, expected a number or None")


def _call(fn, batched: bool, kwargs: dict, n: int):
    """Run one call; per-sample -> one result, batched -> list of n results or one failure."""
    try:
        out = fn(**kwargs)
    except Exception as err:  # noqa: BLE001 -- containing whatever a reward raises is the point
        return ("fail", "exception", f"{type(err).__name__}: {err}".splitlines()[0][:300])
    if not batched:
        return _check_value(out)
    if not isinstance(out, (list, tuple)) and not hasattr(out, "tolist"):
        return ("fail", "wrong_type", f"returned {type(out).__name__}, expected a list of {n} numbers")
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()
    if len(out) != n:
        return ("fail", "wrong_length", f"returned {len(out)} values for {n} completions")
    return [_check_value(v) for v in out]


@contextlib.contextmanager
def _signals_ignored():
    """SIGINT and SIGTERM ignored in this process meanwhile (where it can set handlers: the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_main(conn, progress, refs):
    """Worker process: load the functions, then run tasks until told to stop (None). It starts with SIGINT and
    SIGTERM ignored (_Worker): Ctrl-C and SIGTERM reach the whole process group, and the trainer owns the shutdown (it
    finishes the step, saves, then closes us), so a worker neither dies mid-score nor prints a KeyboardInterrupt."""
    try:
        fns = [registry.load_in_worker(module, qualname, file) for module, qualname, file in refs]
    except BaseException:  # noqa: BLE001 -- report any load failure to the parent, then exit
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        task_id, items = msg
        results = []
        for k, (fn_index, batched, kwargs, n) in enumerate(items):
            progress[1] = time.monotonic()  # start time first, then the index: the parent reads them the other way
            progress[0] = k
            results.append(_call(fns[fn_index], batched, kwargs, n))
        progress[1] = _IDLE
        conn.send((task_id, results))


# --- the pool -------------------------------------------------------------------------------------------------------

class _Worker:
    def __init__(self, ctx, refs):
        self.progress = ctx.RawArray("d", 2)
        self.progress[1] = _IDLE
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, self.progress, refs), daemon=True,
                                   name="reward-worker")
        with _signals_ignored():  # inherited through exec: a Ctrl-C while the worker imports is ignored there too
            self.process.start()
        child.close()
        self.ready = False
        self.task = None  # (task_id, items) while busy

    def kill(self):
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class _Run:
    """The bookkeeping of one `_Pool.run`. A task that loses an item (timed out, crashed, or skipped because its
    function is out of time) goes out again without it under a new id; `origin` maps that id to the original task and
    item indices, so that every result lands where it belongs."""

    def __init__(self, tasks: list[list]):
        self.tasks = tasks
        self.pending = deque(enumerate(tasks))
        self.partial: dict[int, dict] = {}  # task_id -> {item_index: result} for re-run pieces
        self.lost: list = []
        self.next_id = len(tasks)
        self.origin: dict[int, tuple[int, list[int]]] = {}  # re-run task id -> (original task id, item indices)
        # A function that overran once gets timeout_s more, shared by all its remaining calls in this run: a
        # function that always hangs costs about 2 * timeout_s per batch, not timeout_s per sample.
        self.fn_deadline: dict[int, float] = {}

    def origin_of(self, task_id: int, n: int) -> tuple[int, list[int]]:
        return self.origin.get(task_id, (task_id, list(range(n))))

    def _piece(self, base: int, indices: list[int]) -> int:
        """A new task id for the items `indices` of original task `base`."""
        self.origin[self.next_id] = (base, indices)
        self.next_id += 1
        return self.next_id - 1

    def requeue(self, task_id, items, skip):
        """Puts the task back without item `skip` (None: all of it); returns (original task, original index of skip)."""
        base, idx = self.origin_of(task_id, len(items))
        keep = [j for j in range(len(items)) if j != skip]
        if keep:
            self.pending.appendleft((self._piece(base, [idx[j] for j in keep]), [items[j] for j in keep]))
        return base, (idx[skip] if skip is not None else None)

    def next_task(self, timeout_s: float):
        """The next pending task less the calls whose function is out of time (recorded as lost); None if none is
        left."""
        while self.pending:
            task = self._without_expired(*self.pending.popleft(), timeout_s)
            if task is not None:
                return task
        return None

    def _without_expired(self, task_id, items, timeout_s: float):
        now = time.monotonic()
        expired = {j for j, item in enumerate(items) if self.fn_deadline.get(item[0], math.inf) <= now}
        if not expired:
            return task_id, items
        base, idx = self.origin_of(task_id, len(items))
        self.lost.extend((base, idx[j], "timeout", (f"not run: its function already overran by {timeout_s:g} s "
                                                    "in this batch")) for j in sorted(expired))
        keep = [j for j in range(len(items)) if j not in expired]
        if not keep:
            return None
        return self._piece(base, [idx[j] for j in keep]), [items[j] for j in keep]

    def results(self) -> tuple[dict, list]:
        for base, item, kind, message in self.lost:
            self.partial.setdefault(base, {})[item] = ("fail", kind, message)
        results = {}
        for task_id, task in enumerate(self.tasks):
            got = self.partial.get(task_id, {})
            results[task_id] = [got[j] for j in range(len(task))]
        return results, self.lost


class _Pool:
    def __init__(self, refs, num_workers: int, timeout_s: float, start_method: str):
        if start_method == "fork":
            raise ValueError("start_method 'fork' is not allowed: the trainer may hold threads and process groups")
        self.ctx = get_context(start_method)
        self.refs = refs
        self.timeout_s = timeout_s
        self.workers = [_Worker(self.ctx, refs) for _ in range(num_workers)]
        self.startup_failures = 0

    def _replace(self, w: _Worker):
        w.kill()
        self.workers[self.workers.index(w)] = _Worker(self.ctx, self.refs)

    def _deadline(self, w: _Worker, fn_deadline: dict[int, float]) -> float:
        """When the call `w` is running times out: its own timeout, or its function's shared one if sooner."""
        started = w.progress[1]
        if started == _IDLE:
            return _IDLE
        items = w.task[1]
        fn_index = items[min(int(w.progress[0]), len(items) - 1)][0]  # the index may lag a new task for a moment
        return min(started + self.timeout_s, fn_deadline.get(fn_index, math.inf))

    def run(self, tasks: list[list]) -> tuple[dict, list]:
        """Run tasks (lists of items). Returns ({task_id: results}, lost) where lost holds
        (task_id, item_index, kind, message) for items that timed out or crashed their worker."""
        run = _Run(tasks)
        while run.pending or any(w.task is not None for w in self.workers):
            self._dispatch(run)
            self._wait(run.fn_deadline)
            for w in list(self.workers):
                self._poll(w, run)
        return run.results()

    def _dispatch(self, run: _Run) -> None:
        """Hands the next pending task to every idle worker that is ready."""
        for w in self.workers:
            if not (w.ready and w.task is None):
                continue
            w.task = run.next_task(self.timeout_s)
            if w.task is None:
                continue
            try:
                w.conn.send(w.task)
            except (BrokenPipeError, OSError):
                run.pending.appendleft(w.task)
                w.task = None
                self._replace(w)

    def _wait(self, fn_deadline: dict[int, float]) -> None:
        """Sleeps until a worker answers or dies, the first running call's deadline, or 1 s."""
        now = time.monotonic()
        deadline = now + 1.0
        for w in self.workers:
            if w.task is not None:
                deadline = min(deadline, self._deadline(w, fn_deadline))
        waitables = [w.conn for w in self.workers] + [w.process.sentinel for w in self.workers]
        connection.wait(waitables, timeout=max(0.0, deadline - now) + 0.005)

    def _poll(self, w: _Worker, run: _Run) -> None:
        """Takes in what worker `w` sent, or handles its death or an overrun call (killed and replaced)."""
        msg = None
        try:
            if w.conn.poll():
                msg = w.conn.recv()
        except (EOFError, OSError):
            msg = None
        if msg is not None:
            if msg[0] == "ready":
                w.ready = True
                self.startup_failures = 0
            elif msg[0] == "init_error":
                self.close()
                raise RuntimeError(f"a reward worker could not load the reward functions:\n{msg[1]}")
            else:
                task_id, res = msg
                base, idx = run.origin_of(task_id, len(res))
                run.partial.setdefault(base, {}).update(zip(idx, res))
                w.task = None
            return
        if not w.process.is_alive():
            if not w.ready:
                self.startup_failures += 1
                if self.startup_failures > 3:
                    self.close()
                    raise RuntimeError("reward workers keep dying while starting up "
                                       f"(exit code {w.process.exitcode})")
            if w.task is not None:
                k = int(w.progress[0]) if w.progress[1] != _IDLE else None
                base, item = run.requeue(*w.task, k)
                if item is not None:
                    run.lost.append((base, item, "crash", f"the worker process died (exit code {w.process.exitcode})"))
            self._replace(w)
            return
        if w.task is not None and w.progress[1] != _IDLE:
            k = int(w.progress[0])
            now = time.monotonic()
            if now > self._deadline(w, run.fn_deadline):
                task_id, items = w.task
                run.fn_deadline.setdefault(items[k][0], now + self.timeout_s)
                base, item = run.requeue(task_id, items, k)
                run.lost.append((base, item, "timeout", f"took longer than {self.timeout_s:g} s"))
                self._replace(w)

    def close(self):
        asked = []
        for w in self.workers:
            try:
                if w.process.is_alive() and w.ready and w.task is None:
                    w.conn.send(None)
                    asked.append(w)
            except OSError:
                pass
        for w in asked:
            w.process.join(timeout=1)
        for w in self.workers:
            w.kill()
        self.workers = []


# --- the scorer -----------------------------------------------------------------------------------------------------

class Scorer:
    """Weighted, isolated scoring of completions. See the module docstring for the failure rules."""

    def __init__(self, specs, num_workers: int | None = None, timeout_s: float = 10.0, fallback: float = 0.0, *,
                 columns=None, start_method: str = "spawn", max_consecutive_timeouts: int = 3):
        specs = [s if isinstance(s, RewardSpec) else RewardSpec.from_dict(s) for s in specs]
        if not specs:
            raise ValueError("Scorer needs at least one reward spec")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_consecutive_timeouts < 1:
            raise ValueError(f"max_consecutive_timeouts must be >= 1, got {max_consecutive_timeouts}")
        if not math.isfinite(fallback):
            raise ValueError(f"fallback must be a finite number, got {fallback}")
        for s in specs:
            if not isinstance(s.weight, (int, float)) or not math.isfinite(s.weight):
                raise ValueError(f"reward {s.name!r}: weight must be a finite number, got {s.weight!r}")
            if not isinstance(s.params, dict):
                raise TypeError(f"reward {s.name!r}: params must be a mapping, got {type(s.params).__name__}")
        self.specs = specs
        self.timeout_s = timeout_s
        self.fallback = float(fallback)
        self.columns = set(columns) if columns is not None else None
        self.entries = [registry.resolve(s.name) for s in specs]
        self.bindings = [registry.bind(e, s.params, self.columns) for e, s in zip(self.entries, specs)]
        self.names = [s.alias or e.name for s, e in zip(specs, self.entries)]
        duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward(s) {', '.join(duplicates)} listed more than once; give each an `alias`")
        self._warned: set[tuple[str, str]] = set()
        self.max_consecutive_timeouts = max_consecutive_timeouts
        self._timeout_streak = [0] * len(specs)  # score() calls in a row in which every call of a function timed out
        self.disabled: set[str] = set()  # names of functions switched off for good; their samples score None
        if num_workers is None:
            num_workers = min(os.cpu_count() or 1, 8)
        self.num_workers = num_workers
        refs = [(e.module, e.qualname, e.file) for e in self.entries]
        self._pool = _Pool(refs, num_workers, timeout_s, start_method) if num_workers > 0 else None

    # inputs
    def _kwargs(self, binding: registry.Binding, batched: bool, idx, completions, columns, facts) -> dict:
        def pick(values):
            return [values[i] for i in idx] if batched else values[idx]

        kwargs = dict(binding.params)
        kwargs["completions" if batched else "completion"] = pick(completions)
        if binding.all_inputs:
            for name, values in {**columns, **facts}.items():
                kwargs.setdefault(name, pick(values))
            if batched and "prompt" in facts:
                kwargs.setdefault("prompts", pick(facts["prompt"]))
        for arg, fact in binding.facts:
            kwargs[arg] = pick(facts[fact])
        for arg, column, required in binding.columns:
            if column in columns:
                kwargs[arg] = pick(columns[column])
        return kwargs

    def _check_inputs(self, n: int, columns: dict, facts: dict):
        for name, values in {**columns, **facts}.items():
            if len(values) != n:
                raise ValueError(f"column/fact {name!r} has {len(values)} values for {n} completions")
        for name, entry, binding in zip(self.names, self.entries, self.bindings):
            for arg, fact in binding.facts:
                if fact not in facts:
                    raise ValueError(f"reward {name!r} needs rollout fact {fact!r}; facts given: {sorted(facts)}")
            for arg, column, required in binding.columns:
                if required and column not in columns:
                    raise ValueError(f"reward {name!r} ({entry.where}) needs column {column!r}; "
                                     f"columns given: {sorted(columns)}")

    def score(self, completions: list[str], columns: dict | None = None, facts: dict | None = None) -> ScoreResult:
        n = len(completions)
        columns = dict(columns or {})
        facts = dict(facts or {})
        if "num_tokens" not in facts and "completion_ids" in facts:
            facts["num_tokens"] = [len(ids) for ids in facts["completion_ids"]]
        self._check_inputs(n, columns, facts)
        # raw[f][i]: ('ok', value) or ('fail', kind, message)
        raw = [[("ok", None) if name in self.disabled else None] * n for name in self.names]
        if n:
            tasks, where = self._tasks(n, completions, columns, facts)
            if self._pool is None:
                outputs = {t: [_call(self.entries[fi].fn, b, kw, m) for fi, b, kw, m in items]
                           for t, items in enumerate(tasks)}
            else:
                outputs, _ = self._pool.run(tasks)
            for t, items in enumerate(tasks):
                for (fi, batched, _, m), out, samples in zip(items, outputs[t], where[t]):
                    if batched and isinstance(out, list):
                        for i, r in zip(samples, out):
                            raw[fi][i] = r
                    else:
                        for i in samples:
                            raw[fi][i] = out
        result = self._assemble(raw, n)
        self._disable_hung(result, n)
        return result

    def _disable_hung(self, result: ScoreResult, n: int):
        """A function whose every call timed out in max_consecutive_timeouts score() calls in a row is disabled."""
        for fi, name in enumerate(self.names):
            if name in self.disabled or not n:
                continue
            all_timed_out = result.failures[name]["timeout"] == n
            self._timeout_streak[fi] = self._timeout_streak[fi] + 1 if all_timed_out else 0
            if self._timeout_streak[fi] >= self.max_consecutive_timeouts:
                self.disabled.add(name)
                warnings.warn(
                    f"REWARD {name!r} DISABLED for the rest of the run: every call timed out (> {self.timeout_s:g} s) "
                    f"in {self._timeout_streak[fi]} scorings in a row (rewards.max_consecutive_timeouts="
                    f"{self.max_consecutive_timeouts}); its samples now score the fallback {self.fallback:g}.",
                    RewardWarning, stacklevel=3,
                )

    def _tasks(self, n, completions, columns, facts):
        """Batched functions get one call each; per-sample calls are chunked over the workers."""
        tasks, where = [], []
        per_sample = []
        for fi, (entry, binding) in enumerate(zip(self.entries, self.bindings)):
            if self.names[fi] in self.disabled:
                continue
            if entry.batched:
                idx = list(range(n))
                kw = self._kwargs(binding, True, idx, completions, columns, facts)
                tasks.append([(fi, True, kw, n)])
                where.append([idx])
            else:
                per_sample.append(fi)
        if per_sample:
            num_chunks = max(1, min(n, 2 * max(self.num_workers, 1)))
            bounds = [round(c * n / num_chunks) for c in range(num_chunks + 1)]
            for lo, hi in itertools.pairwise(bounds):
                items, samples = [], []
                for fi in per_sample:
                    for i in range(lo, hi):
                        kw = self._kwargs(self.bindings[fi], False, i, completions, columns, facts)
                        items.append((fi, False, kw, 1))
                        samples.append([i])
                tasks.append(items)
                where.append(samples)
        return tasks, where

    def _assemble(self, raw, n) -> ScoreResult:
        total = [0.0] * n
        per_function, failures = {}, {}
        for fi, (name, spec) in enumerate(zip(self.names, self.specs)):
            values, counts = [], Counter()
            for i, r in enumerate(raw[fi]):
                if r[0] == "ok":
                    values.append(r[1])
                else:
                    values.append(None)
                    counts[r[1]] += 1
                    if (name, r[1]) not in self._warned:
                        self._warned.add((name, r[1]))
                        warnings.warn(
                            f"reward {name!r}: {r[1]} ({r[2]}); the sample scores the fallback {self.fallback:g}. "
                            f"Further '{r[1]}' failures of {name!r} are counted in ScoreResult.failures, not reported.",
                            RewardWarning, stacklevel=3,
                        )
                v = values[-1]
                total[i] += spec.weight * (self.fallback if v is None else v)
            per_function[name] = values
            failures[name] = counts
        return ScoreResult(total, per_function, failures)

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001,S110 -- interpreter shutdown: nothing useful to do
            pass
