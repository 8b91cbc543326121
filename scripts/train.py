"""Train a policy with GRPO from a recipe.

    python scripts/train.py RECIPE.yaml [key.sub=value ...]
    accelerate launch --config_file recipes/accelerate/<cfg>.yaml scripts/train.py RECIPE.yaml [key.sub=value ...]

Overrides are applied on top of the recipe, e.g. `train.max_steps=3 train.output_dir=runs/smoke`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.config import ConfigError, load_config  # noqa: E402
from rl.trainer import TrainingStopped, train  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
