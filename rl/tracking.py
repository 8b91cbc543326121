"""Run monitoring: Weights & Biases, JSONL files in the output dir, and a console progress bar.

Only the main process writes (`is_main=False` makes every method a no-op), so the trainer can call the tracker
unconditionally. Files, always written on the main process:
    metrics.jsonl       one object per logged step: {"step": N, "<metric>": value, ...}
    completions.jsonl   one object per sampled completion row: {"step": N, "prompt": ..., "completion": ..., ...}
W&B runs `online` only when an API key is configured (WANDB_API_KEY or a ~/.netrc entry for the W&B host); otherwise
`offline` (sync later with `wandb sync`), or `disabled` when asked. Secret-looking keys never leave this module.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from thinkzero.rl.config import is_secret_key, strip_secrets

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
# metric key -> short label on the progress bar
CONSOLE_KEYS = {"reward": "reward", "kl": "kl", "completions/mean_length": "len", "timing/step_s": "s/step"}


def has_wandb_api_key(environ: Mapping[str, str] | None = None) -> bool:
    """True when W&B could authenticate: WANDB_API_KEY set, or a netrc entry with a password for the W&B host."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        auth = netrc.netrc(environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str, environ: Mapping[str, str] | None = None) -> str:
    """The W&B mode to run with. A recipe's 'disabled' always wins; then WANDB_MODE from the environment when it
    asks for less (offline / disabled); 'online' needs an API key, otherwise it becomes 'offline'."""
    environ = os.environ if environ is None else environ
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"W&B mode must be online, offline or disabled; got {mode!r}")
    if mode == "disabled":
        return "disabled"
    env_mode = environ.get("WANDB_MODE", "").lower()
    if env_mode in ("offline", "dryrun"):
        return "offline"
    if env_mode == "disabled":
        return "disabled"
    if mode == "offline":
        return "offline"
    return "online" if has_wandb_api_key(environ) else "offline"


def _plain(value: Any) -> Any:
    """Tensors / numpy scalars -> Python numbers; non-finite floats -> None (metrics.jsonl stays strict JSON)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Drop records logged after `keep_through_step` (they belong to a run that died after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= keep_through_step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class Tracker:
    """W&B + metrics.jsonl + completions.jsonl + console bar. Use as a context manager or call close()."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        is_main: bool,
        config: Mapping[str, Any] | None = None,
        project: str = "thinkzero",
        entity: str | None = None,
        run_name: str | None = None,
        tags: Sequence[str] = (),
        group: str | None = None,
        mode: str = "online",
        run_id: str | None = None,
        console: bool = True,
        total_steps: int | None = None,
        start_step: int = 0,
    ):
        """start_step: the step training (re)starts from; records after it in existing JSONL files are dropped.
        run_id: a W&B run id to continue (stored in checkpoints by the trainer; see `run_id`)."""
        self.is_main = is_main
        self.output_dir = Path(output_dir)
        self.wandb_mode = "disabled"
        self._run = None
        self.wandb_run_dir: Path | None = None  # offline runs: <output_dir>/wandb/offline-run-*
        self._table = None
        self._table_columns: list[str] | None = None
        self._bar = None
        self._last_time = time.perf_counter()
        self._last_step = start_step
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.completions_path = self.output_dir / COMPLETIONS_FILE
        for path in (self.metrics_path, self.completions_path):
            _truncate_jsonl(path, start_step)
        self.wandb_mode = resolve_wandb_mode(mode)
        if self.wandb_mode != "disabled":
            self._run = self._init_wandb({
                "project": project, "entity": entity, "name": run_name, "tags": list(tags) or None, "group": group,
                "config": strip_secrets(dict(config or {})), "dir": str(self.output_dir), "id": run_id,
                "resume": "allow" if run_id else None,
            })
            self.wandb_run_dir = Path(self._run.dir).parent
        if console:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def _init_wandb(self, kwargs: dict[str, Any]):
        import wandb

        try:
            return wandb.init(mode=self.wandb_mode, **kwargs)
        except Exception as e:  # an unreachable W&B server must not stop training
            if self.wandb_mode != "online":
                raise
            self.write(f"W&B online init failed ({e}); logging offline instead (sync later with `wandb sync`)")
            self.wandb_mode = "offline"
            return wandb.init(mode="offline", **kwargs)

    @property
    def run_id(self) -> str | None:
        return None if self._run is None else self._run.id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self.is_main:
            return
        clean = {k: _plain(v) for k, v in metrics.items() if not is_secret_key(k)}
        _append(self.metrics_path, [{"step": step, **clean}])
        if self._run is not None:
            self._run.log({k: v for k, v in clean.items() if v is not None}, step=step)
        if self._bar is not None:
            now = time.perf_counter()
            if "timing/step_s" not in clean and step > self._last_step:
                clean["timing/step_s"] = (now - self._last_time) / (step - self._last_step)
            self._last_time, self._last_step = now, step
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({label: _short(clean[k]) for k, label in CONSOLE_KEYS.items()
                                   if clean.get(k) is not None}, refresh=True)

    def log_completions(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Append sample rows (prompt, completion, each reward, advantage, ...) for this step. The JSONL keeps every
        row; the W&B table grows incrementally, so earlier rows are never overwritten."""
        if not self.is_main or not rows:
            return
        records = [{"step": step, **{k: _plain(v) for k, v in row.items() if not is_secret_key(k)}} for row in rows]
        _append(self.completions_path, records)
        if self._run is None:
            return
        import wandb

        if self._table is None:
            self._table_columns = list(records[0])
            self._table = wandb.Table(columns=self._table_columns, log_mode="INCREMENTAL")
        for record in records:
            self._table.add_data(*[record.get(c) for c in self._table_columns])
        self._run.log({"completions": self._table}, step=step)

    def write(self, message: str) -> None:
        """A console line that does not break the progress bar (main process only)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    # Opened per write: a kill between steps never leaves buffered lines behind.
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
