"""Training curves from a run's metrics.jsonl drawn into a PNG, for people without W&B (matplotlib, imported lazily:
`pip install -e '.[plot]'`).

Panels, each drawn when the run logged it: reward; accuracy (the math_accuracy reward on training samples, and the
held-out eval accuracy when the trainer evaluated); KL to the reference model; mean completion length. Raw values are
drawn faintly with a trailing moving average on top.
"""

from __future__ import annotations

import json
from pathlib import Path

# panel title -> [(metric key, legend label)]
PANELS = {
    "reward": [("reward", "reward (train samples)")],
    "accuracy": [("rewards/math_accuracy/mean", "train samples"), ("eval/math_accuracy/mean", "held-out (greedy)")],
    "KL(policy || reference)": [("kl", "kl")],
    "completion length (tokens)": [("completions/mean_length", "mean length")],
}


def read_metrics(path: Path) -> list[dict]:
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [float(v) for _, v in points]


def plot(records: list[dict], out: Path, smooth: int = 5, title: str | None = None,
         extra_points: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """Draws the panels into `out`. extra_points: metric key -> [(step, value)] added to that metric's series, e.g.
    the starting model's held-out accuracy at step 0, measured before training."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    if extra_points:
        records = [{"step": step, key: value} for key, points in extra_points.items() for step, value in points] + \
            list(records)
        records.sort(key=lambda r: r["step"])
    panels = {name: [(k, label) for k, label in keys if series(records, k)[0]] for name, keys in PANELS.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    if not panels:
        raise ValueError(f"none of {', '.join(k for keys in PANELS.values() for k, _ in keys)} was logged")
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels.items()):
        if name.startswith("KL") and not any(series(records, "kl")[1]):  # beta = 0 logs kl = 0 every step
            ax.text(0.5, 0.5, "not computed: beta = 0 (no reference model)", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
            keys = []
        for i, (key, label) in enumerate(keys):
            steps, values = series(records, key)
            color = f"C{i}"
            if len(steps) >= 4 * smooth > 4:  # dense per-step series: faint raw values, moving average on top
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, moving_average(values, smooth), color=color, label=label, linewidth=1.6)
            else:  # sparse (periodic evaluations): the points themselves
                ax.plot(steps, values, color=color, label=label, marker="o", markersize=4)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
