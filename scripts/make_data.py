"""Write the arithmetic word-problem splits (train / held-out test / cold-start SFT) as jsonl.

    python scripts/make_data.py --out runs/demo/data [--seed 0] [--train 2000] [--test 200] [--sft 200]
                                [--min-ops 1] [--max-ops 2] [--max-value 9] [--ops +-] [--direct-fraction 0.5]

Splits of size 0 are skipped. Each row: question, answer (an integer, as text), solution (<think>…</think>
<answer>…</answer> text: worked steps, or a bare answer for the --direct-fraction share of the SFT rows), num_ops;
SFT rows also say their style ('worked' | 'direct').
The splits are disjoint (no question in two of them) and the same for the same arguments.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkzero.rl.arithmetic import Difficulty, make_splits, mix_styles, write_jsonl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=2000, help="RL prompts")
    p.add_argument("--test", type=int, default=200, help="held-out evaluation problems")
    p.add_argument("--sft", type=int, default=200, help="worked examples for cold-start SFT")
    p.add_argument("--min-ops", type=int, default=None, help="fewest operations per problem (default: --max-ops)")
    p.add_argument("--max-ops", type=int, default=2, help="most operations per problem")
    p.add_argument("--max-value", type=int, default=9, help="largest operand")
    p.add_argument("--ops", default="+-", help="operations to use, from '+-*'")
    p.add_argument("--prefix", default="", help="file name prefix: <out>/<prefix><split>.jsonl")
    p.add_argument("--direct-fraction", type=float, default=0.0,
                   help="fraction of the SFT examples that answer without working (style 'direct')")
    args = p.parse_args(argv)
    try:
        difficulty = Difficulty(num_ops=args.max_ops, min_ops=args.min_ops, max_value=args.max_value, ops=args.ops)
    except ValueError as e:
        p.error(str(e))
    # Test first: the held-out set stays the same when the other splits change size.
    sizes = {"test": args.test, "train": args.train, "sft": args.sft}
    splits = make_splits(sizes, args.seed, difficulty)
    splits["sft"] = mix_styles(splits["sft"], args.direct_fraction, args.seed)
    for name, rows in splits.items():
        if rows:
            path = write_jsonl(rows, Path(args.out) / f"{args.prefix}{name}.jsonl")
            print(f"{name:>5}: {len(rows):>6} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
