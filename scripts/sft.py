"""Cold-start supervised fine-tuning from a recipe (completion-only loss); writes a model directory GRPO can start from.

    python scripts/sft.py recipes/demo/sft.yaml [key.sub=value ...]

e.g. `train.epochs=2 train.output_dir=runs/sft-smoke`. The output directory holds config.json, model.safetensors and
the tokenizer (plus metrics.jsonl and sft_config.yaml), so `model.name_or_path` of a GRPO recipe can point at it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkzero.rl.cli import USER_ERRORS, fail  # noqa: E402
from thinkzero.rl.config import config_help  # noqa: E402
from thinkzero.rl.sft import SFTConfig, load_sft_config, train_sft  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("Recipe keys (YAML sections, or key.sub=value overrides), with their defaults:\n")
        print(config_help(SFTConfig))
        return 0 if argv else 2
    try:
        train_sft(load_sft_config(argv[0], argv[1:]))
    except USER_ERRORS as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
