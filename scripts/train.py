"""Train a policy with GRPO from a recipe.

    python scripts/train.py RECIPE.yaml [key.sub=value ...]
    accelerate launch --config_file recipes/accelerate/<cfg>.yaml scripts/train.py RECIPE.yaml [key.sub=value ...]

Overrides are applied on top of the recipe, e.g. `train.max_steps=3 train.output_dir=runs/smoke`.

Exit status: 0 finished; 1 stopped on purpose (e.g. too many non-finite updates; the state was saved); 2 a recipe,
data set, model or reward function the run cannot use, explained in one paragraph without a traceback (set
THINKZERO_TRACEBACK=1 to see it anyway).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import CheckpointError
from rl.config import ConfigError, load_config
from rl.data import DataError
from rl.trainer import Trainer, TrainingStopped

# User errors: what the user gave us is wrong, and the message says what and where. These three exist only for that,
# wherever they are raised.
USER_ERRORS = (ConfigError, DataError, CheckpointError)
# While the trainer is being built from the recipe it reads the user's model (config.json, tokenizer), data and
# reward modules; model/ and rewards/ report bad input there with these built-in types (an unsupported model_type,
# an unknown reward name, a reward module that fails to import, an unusable signature, a missing file). Raised later,
# in the training loop, they are bugs and keep their traceback.
SETUP_ERRORS = (ValueError, TypeError, KeyError, ImportError, OSError)


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # str(KeyError) adds quotes
    return str(text).strip() or type(err).__name__


def _fail(err: BaseException) -> int:
    if os.environ.get("THINKZERO_TRACEBACK"):
        raise err
    print(f"error: {_message(err)}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        return _fail(e)
    try:
        trainer = Trainer(cfg)
    except (*USER_ERRORS, *SETUP_ERRORS) as e:
        return _fail(e)
    try:
        trainer.train()
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        return _fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
