"""Data-parallel training on CPU: 2 processes (DDP, DeepSpeed ZeRO-2, ZeRO-3 through `accelerate launch` and the
configs in recipes/accelerate) learn what 1 process learns from the same global batch and seed.

One module-scoped set of runs on a tiny model serves every assertion (each launch costs ~30-60 s of start-up on two
cores; the first DeepSpeed launch also JIT-builds a small shared-memory op, ~100 s, cached in TORCH_EXTENSIONS_DIR).

Tolerances: the runs sample the same tokens (per-prompt sampling streams) and differ only by float rounding: the
forward sees a different batch composition and gradients are summed across ranks in a different order. Per-step
metrics (reward, loss, kl, entropy, grad norm, lengths, clip ratio, expert load) agree to ~1e-6 relative (measured
1e-6 to 6e-6); we assert 1e-4. Adam turns tiny gradient differences into small weight differences, largest on a rarely
picked expert; we assert the final weights differ by less than 2% of how far 4 steps moved them (measured: DDP 5e-7,
ZeRO-3 5e-6, ZeRO-2 2e-3). A wrong gradient scale would show in grad_norm; a different sample, in everything.
The resumed ZeRO-2 run matches the straight one exactly (measured 0.0).
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_recipes import arithmetic_recipe, write_recipe

from thinkzero.model import load_model
from thinkzero.model.presets import write_random_model

ROOT = Path(__file__).resolve().parents[2]
REWARDS = Path(__file__).with_name("rewards_for_tests.py")
STEPS = 4
COMPARED = ("reward", "reward_std", "policy_loss", "kl", "entropy", "grad_norm", "completions/mean_length",
            "clip_ratio/region_mean", "moe/expert_load_cv/layer0")
LAUNCH_TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # the Makefile's cache of DS ops
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _train(recipe: Path, out: Path, accelerate_config: str | None, *overrides: str) -> Path:
    args = [str(ROOT / "scripts" / "train.py"), str(recipe), f"train.output_dir={out}", *overrides]
    if accelerate_config is None:
        _run([sys.executable, *args], recipe.parent)
    else:
        _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "recipes" / "accelerate" / accelerate_config), "--main_process_port", str(_free_port()),
              *args], recipe.parent)
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    write_random_model("tiny", root / "model", seed=0)
    recipe = {
        **arithmetic_recipe(root, 64, "train.jsonl"),
        "model": {"name_or_path": str(root / "model"), "dtype": "float32"},
        # 4 prompts x 4 completions; each of 2 ranks owns 2 whole groups. One optimizer step per step (with
        # several, N processes split the step into mini-batches differently: see rl/trainer.py); micro-batches of
        # 2 completions exercise gradient accumulation.
        "rollout": {"num_generations": 4, "prompts_per_step": 4, "max_new_tokens": 8},
        "algorithm": {"loss_type": "dapo", "beta": 0.04, "micro_batch_size": 2},
        "rewards": {"functions": [{"name": f"{REWARDS}:digit_fraction"}], "num_workers": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "train": {"max_steps": STEPS, "save_every": 2, "seed": 5},
        "logging": {"mode": "disabled", "completions_every": 0, "console": False},
    }
    path = write_recipe(recipe, root / "recipe.json")
    found = {"root": root, "start": _weights(root / "model")}
    found["single"] = _train(path, root / "single", None)
    found["ddp"] = _train(path, root / "ddp", "ddp-cpu.yaml")
    found["zero2"] = _train(path, root / "zero2", "zero2-cpu.yaml")
    found["zero3"] = _train(path, root / "zero3", "zero3-cpu.yaml")
    # Resume: a fresh output dir holding only the ZeRO-2 run's step-2 checkpoint, continued to step 4.
    resumed = root / "zero2-resumed"
    resumed.mkdir()
    shutil.copytree(found["zero2"] / "checkpoint-000002", resumed / "checkpoint-000002")
    found["zero2_resumed"] = _train(path, resumed, "zero2-cpu.yaml", "train.resume=auto")
    return found


def _assert_same_trajectory(expected: list[dict], got: list[dict], what: str) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in expected], what
    for want, have in zip(expected, got):
        for key in COMPARED:
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), f"{what}: step {want['step']} {key}"


def _assert_same_weights(expected: dict, got: dict, start: dict, what: str) -> None:
    assert expected.keys() == got.keys()
    moved = torch.sqrt(sum(((expected[k] - start[k]).double() ** 2).sum() for k in expected))
    differ = torch.sqrt(sum(((expected[k] - got[k]).double() ** 2).sum() for k in expected))
    assert moved > 1e-3, "training did not move the weights: the comparison proves nothing"
    assert differ < 0.02 * moved, f"{what}: final weights differ by {differ:.2e} (training moved them {moved:.2e})"


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3"])
def test_two_processes_learn_what_one_process_learns(runs, backend):
    single = _metrics(runs["single"])
    assert len({m["reward"] for m in single}) > 1 and all(m["grad_norm"] > 0 for m in single)
    _assert_same_trajectory(single, _metrics(runs[backend]), backend)
    final = f"checkpoint-{STEPS:06d}"
    _assert_same_weights(_weights(runs["single"] / final), _weights(runs[backend] / final), runs["start"], backend)


def test_every_rank_saves_its_rng_state_and_only_rank0_the_metadata(runs):
    ckpt = runs["zero2"] / "checkpoint-000002"
    assert (ckpt / "rng_rank0.pt").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert (ckpt / "deepspeed" / "latest").is_file()
    assert len(_metrics(runs["zero2"])) == STEPS  # one writer: a second would duplicate the lines


def test_zero2_resume_after_2_of_4_steps_reproduces_the_straight_run(runs):
    straight, resumed = _metrics(runs["zero2"]), _metrics(runs["zero2_resumed"])
    assert [m["step"] for m in resumed] == [3, 4]
    _assert_same_trajectory(straight[2:], resumed, "zero2 resumed")
    final = f"checkpoint-{STEPS:06d}"
    _assert_same_weights(_weights(runs["zero2"] / final), _weights(runs["zero2_resumed"] / final), runs["start"],
                         "zero2 resumed")


def test_zero3_checkpoint_is_a_consolidated_model_dir(runs):
    final = runs["zero3"] / f"checkpoint-{STEPS:06d}"
    assert (final / "deepspeed" / "latest").is_file()  # DeepSpeed's sharded state, for resume
    ours = load_model(final)
    saved = _weights(final)
    assert all(t.numel() > 0 for t in saved.values()), "a partitioned (empty) tensor was saved"
    assert any(not torch.equal(saved[k], runs["start"][k]) for k in saved)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.randint(4, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_zero2_drops_and_counts_a_non_finite_update(runs):
    """NaN losses at step 2 (every rank): DeepSpeed drops that update, the trainer counts it, training goes on."""
    root = runs["root"]
    out = root / "zero2-nan"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "zero2-cpu.yaml"), "--main_process_port", str(_free_port()),
           str(ROOT / "scripts" / "train.py"), str(root / "recipe.json"), f"train.output_dir={out}",
           "train.max_steps=3", "train.save_every=0"]
    proc = subprocess.run(cmd, cwd=root, env={**_env(), "THINKZERO_CHAOS_NAN_AT": "2"}, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = _metrics(out)
    assert [r["skipped_updates"] for r in records] == [0.0, 1.0, 1.0]
    assert records[1]["grad_norm"] is None or not math.isfinite(records[1]["grad_norm"])
    assert all(math.isfinite(r["grad_norm"]) for r in (records[0], records[2]))
    weights = _weights(out / "checkpoint-000003")
    assert all(torch.isfinite(t).all() for t in weights.values())


# --- no code runs from a multi-process checkpoint (issue 14.1) ---------------------------------------------------

@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_every_deepspeed_file_loads_through_the_safe_loader_and_a_planted_one_is_refused(runs, backend, tmp_path):
    from test_rl_resume import plant

    from thinkzero.rl.checkpoint import UnsafeCheckpointFile
    from thinkzero.rl.distributed import safe_deepspeed_load

    files = sorted((runs[backend] / "checkpoint-000002" / "deepspeed").rglob("*.pt"))
    assert len(files) >= 3, files  # model states and one optimizer state per rank
    marker = tmp_path / "PWNED"
    for file in files:
        safe_deepspeed_load(str(file))  # the allow-list covers what DeepSpeed writes
        bad = tmp_path / file.name
        plant(bad, marker)
        with pytest.raises(UnsafeCheckpointFile, match=f"refused to load {bad}: .*posix.system is not allowed"):
            safe_deepspeed_load(str(bad))
        assert not marker.exists()


@pytest.mark.parametrize("backend, planted", [
    ("ddp", "rng_rank1.pt"),  # read by rank 1 only
    ("zero2", "deepspeed/global_step2/mp_rank_00_model_states.pt"),  # the reproduction of issue 14.1
    ("zero3", "deepspeed/global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
])
def test_resuming_a_multi_process_checkpoint_with_a_planted_pickle_runs_nothing(runs, backend, planted):
    from test_rl_resume import plant

    root = runs["root"]
    out = root / f"{backend}-planted"
    shutil.copytree(runs[backend] / "checkpoint-000002", out / "checkpoint-000002")
    file = out / "checkpoint-000002" / planted
    marker = root / f"PWNED-{backend}"
    plant(file, marker)
    config = "ddp-cpu.yaml" if backend == "ddp" else f"{backend}-cpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / config), "--main_process_port", str(_free_port()),
           str(ROOT / "scripts" / "train.py"), str(root / "recipe.json"), f"train.output_dir={out}",
           "train.resume=auto", "train.max_steps=3"]
    proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          check=False)
    assert not marker.exists(), f"the pickle planted in {planted} ran"
    assert proc.returncode != 0
    assert f"error: refused to load {file}: it holds Python objects" in proc.stderr, proc.stderr[-6000:]
