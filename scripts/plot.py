"""Training curves from a run's metrics.jsonl into a PNG (reward, accuracy, KL, completion length).

    python scripts/plot.py RUN_DIR_OR_METRICS_JSONL [--out curves.png] [--smooth 5] [--title TEXT]

Needs matplotlib (`pip install -e '.[plot]'`). The panels are described in rl/plotting.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkzero.rl.plotting import plot, read_metrics


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run directory (holding metrics.jsonl) or a metrics.jsonl file")
    p.add_argument("--out", help="PNG path (default: <run dir>/curves.png)")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window in steps (1 = none)")
    p.add_argument("--title")
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        records = read_metrics(run)
        out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "curves.png"
        plot(records, out, smooth=args.smooth, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
