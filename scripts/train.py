"""Train a policy with GRPO from a recipe.

    python scripts/train.py RECIPE.yaml [key.sub=value ...]
    accelerate launch --config_file recipes/accelerate/<cfg>.yaml scripts/train.py RECIPE.yaml [key.sub=value ...]

Overrides are applied on top of the recipe, e.g. `train.max_steps=3 train.output_dir=runs/smoke`.

Exit status: 0 finished; 1 stopped on purpose (e.g. too many non-finite updates; the state was saved); 2 a recipe,
data set, model, reward function or checkpoint the run cannot use (including a checkpoint file refused because loading
it could run code), explained in one paragraph without a traceback (set THINKZERO_TRACEBACK=1 to see it anyway);
3 a checkpoint could not be written (e.g. a full disk): the previous checkpoint is intact, resume with
train.resume=auto once there is space; 4 stopped by SIGTERM or SIGINT (Ctrl-C) after finishing the step in progress
(or abandoning its rollout) and saving a checkpoint of the last finished step: continue with train.resume=auto. A
second signal, sent more than 2 s after the first, exits at once, by the signal itself (shell status 128 + its number).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkzero.rl.cli import SETUP_ERRORS, USER_ERRORS, fail  # noqa: E402
from thinkzero.rl.config import config_help, load_config  # noqa: E402
from thinkzero.rl.trainer import (  # noqa: E402
    CheckpointWriteFailed,
    CollectiveTimeout,
    SignalStop,
    Trainer,
    TrainingStopped,
)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Recipe keys (YAML sections, or key.sub=value overrides), with their defaults:\n")
        print(config_help())
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except USER_ERRORS as e:
        return fail(e)
    try:
        trainer = Trainer(cfg)
    except (*USER_ERRORS, *SETUP_ERRORS) as e:
        return fail(e)
    try:
        trainer.train()
    except CheckpointWriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except SignalStop as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 4
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except CollectiveTimeout as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
