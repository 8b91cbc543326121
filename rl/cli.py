"""How the command-line scripts report a mistake in what the user gave them: one paragraph on stderr and exit status 2,
without a traceback (set THINKZERO_TRACEBACK=1 to see it anyway)."""

import os
import sys

from thinkzero.model.checkpoint import CheckpointError
from thinkzero.rl.config import ConfigError
from thinkzero.rl.data import DataError

# User errors: what the user gave us is wrong, and the message says what and where. These three exist only for that,
# wherever they are raised.
USER_ERRORS = (ConfigError, DataError, CheckpointError)
# While a script builds its model, data and reward functions from what the user named, model/ and rewards/ report bad
# input with these built-in types (an unsupported model_type, an unknown reward name, a reward module that fails to
# import, an unusable signature, a missing file). Raised later, in a training loop, they are bugs and keep their
# traceback.
SETUP_ERRORS = (ValueError, TypeError, KeyError, ImportError, OSError)


def message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)  # str(KeyError) adds quotes
    return str(text).strip() or type(err).__name__


def fail(err: BaseException) -> int:
    """Prints the error for a person and returns the exit status (2)."""
    if os.environ.get("THINKZERO_TRACEBACK"):
        raise err
    print(f"error: {message(err)}", file=sys.stderr)
    return 2
