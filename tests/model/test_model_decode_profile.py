"""scripts/profile_decode.py on the tiny preset: it runs, and the matrix products it replays as the step's floor are
all of the step's, with the MoE layer's routed experts as one call per projection (not a loop over experts)."""

import re
import subprocess
import sys
from pathlib import Path

from thinkzero.model.config import ModelConfig
from thinkzero.model.presets import preset

ROOT = Path(__file__).resolve().parents[2]


def test_profile_decode_sees_every_matrix_product_of_the_step():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_decode.py"), "--preset", "tiny",
                           "--batch", "4", "--context", "6", "--threads", "1", "--repeats", "3"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    found = re.search(r"(\d+) aten ops, (\d+) of them matrix products", proc.stdout)
    assert found, proc.stdout
    cfg = ModelConfig.from_dict(preset("tiny"))
    moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    dense = cfg.num_hidden_layers - moe
    per_layer_attention = 4 + 4  # q_a, q_b, kv_a, o_proj; absorbed: q_nope->latent, scores, weighted latent, ->values
    per_moe = 1 + 2 + 3  # router, routed experts (grouped gate_up and down), shared expert
    expected = cfg.num_hidden_layers * per_layer_attention + dense * 3 + moe * per_moe + 1  # + output layer
    assert int(found.group(2)) == expected, proc.stdout
    assert int(found.group(1)) > expected
    for part in ("matmuls alone", "weights read", "routed experts", "sampling"):
        assert part in proc.stdout, proc.stdout
