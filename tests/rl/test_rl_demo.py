"""The CPU demo end to end at smoke-test sizes (scripts/demo.py --quick): every stage writes its artefacts, and the
evaluation numbers are computed from the completions the models actually wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thinkzero.rl.data import load_rows
from thinkzero.rl.evaluation import grade, summarize

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--quick", "--out", str(out)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_every_stage_writes_its_artefacts(demo_run):
    out, stdout = demo_run
    # data: three disjoint splits that `datasets` loads
    splits = {name: load_rows(str(out / "data" / f"{name}.jsonl")) for name in ("train", "test", "sft")}
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 32, "test": 8, "sft": 16}
    test_questions = set(splits["test"]["question"])
    assert not test_questions & set(splits["train"]["question"]) and not test_questions & set(splits["sft"]["question"])
    # SFT: a model directory in the checkpoint format, with its training log
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "sft_config.yaml"):
        assert (out / "sft" / name).is_file(), name
    # GRPO: the final checkpoint, per-step metrics (with the in-training held-out eval), the plot
    assert (out / "grpo" / "checkpoint-000002" / "COMPLETE").is_file()
    records = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
    assert any("eval/math_accuracy/mean" in r for r in records)
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"sft", "grpo", "seconds", "plot"}
    assert "held-out accuracy" in stdout and "curves.png" in stdout


@pytest.mark.slow
def test_evaluation_numbers_come_from_the_completions(demo_run):
    out, _ = demo_run
    for name in ("eval_sft.json", "eval_grpo.json"):
        report = json.loads((out / name).read_text())
        records = report["records"]
        assert len(records) == 8 and all(len(r["samples"]) == 2 for r in records)
        # re-grade the stored completions: same grades, same summary
        for r in records:
            for c in [r["greedy"], *r["samples"]]:
                assert {k: c[k] for k in ("correct", "formatted", "answer")} == grade(c["text"], r["answer"])
        recomputed = summarize(records, num_samples=2)
        assert recomputed == {k: report["summary"][k] for k in recomputed}


@pytest.mark.slow
def test_an_untrained_model_scores_zero(demo_run):
    """scripts/evaluate.py on the random-init model the SFT stage started from: near-zero accuracy, no format."""
    out, _ = demo_run
    result = out / "eval_init.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(out / "init"), "--data",
         str(out / "data" / "test.jsonl"), "--prompt-column", "question", "--template", "{prompt}\n",
         "--num-samples", "2", "--max-new-tokens", "24", "--out", str(result), "--quiet"],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(result.read_text())["summary"]
    assert summary["greedy/pass@1"] <= 0.125 and summary["sampled/pass@1"] <= 0.125  # at most 1 of 8 by chance
    assert summary["greedy/format"] == 0.0
    assert "greedy/pass@1" in proc.stdout  # the printed table
