"""Write a random-init model directory (config.json, model.safetensors, tokenizer files) from a preset.

    python scripts/make_model.py --preset w1 runs/models/w1 [--seed 0] [--model-type deepseek_v3]

The directory loads with model.load_model / model.load_tokenizer, and with transformers' from_pretrained.
The tokenizer is character-level with exactly the model's vocab_size tokens.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from thinkzero.model.presets import PRESETS, write_random_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-type", choices=("deepseek_v2", "deepseek_v3"), default=None,
                        help="override the preset's architecture (default: the preset's, deepseek_v3)")
    args = parser.parse_args()
    model = write_random_model(args.preset, args.out_dir, args.seed, args.model_type)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir} ({model.config.model_type}, preset {args.preset}, {n_params / 1e6:.2f}M parameters)")


if __name__ == "__main__":
    main()
