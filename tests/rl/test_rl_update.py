"""The update's view of the rollout engine, on a tiny random model on CPU: the engine seam samples by per-prompt seeds,
routing drift is measured against the rollout's experts, and the train-inference mismatch correction reaches the
loss (a no-op with mode none, which the bitwise recipe runs check)."""

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_recipes import arithmetic_recipe, write_recipe

from thinkzero.rl.config import load_config
from thinkzero.rl.distributed import Collectives
from thinkzero.rl.engine import ThinkzeroEngine
from thinkzero.rl.trainer import Trainer

REWARDS = Path(__file__).with_name("rewards_for_tests.py")


def _trainer(tmp_path: Path, **algorithm) -> Trainer:
    recipe = arithmetic_recipe(
        tmp_path, 32, "train.jsonl",
        rollout={"num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 8},
        rewards={"functions": [{"name": f"{REWARDS}:digit_fraction"}], "num_workers": 0},
        algorithm={"loss_type": "dapo", "beta": 0.0, **algorithm},
        train={"max_steps": 1, "output_dir": str(tmp_path / "out"), "save_every": 0, "seed": 3},
        logging={"mode": "disabled", "console": False, "completions_every": 0},
    )
    return Trainer(load_config(write_recipe(recipe, tmp_path / "recipe.json")))


def _close(trainer: Trainer) -> None:
    trainer.scorer.close()
    trainer.tracker.close()
    trainer.engine.close()


def test_engine_samples_a_prompt_the_same_whatever_its_batch_mates(tmp_path):
    trainer = _trainer(tmp_path)
    try:
        engine = trainer.engine
        assert isinstance(engine, ThinkzeroEngine)
        prompts = [ex["prompt_ids"] for ex in trainer.examples[:3]]
        both = engine.sample(prompts[:2], 2, trainer.sampling, seeds=[11, 12])
        alone = engine.sample(prompts[1:2], 2, trainer.sampling, seeds=[12])
        other_seed = engine.sample(prompts[1:2], 2, trainer.sampling, seeds=[13])
        width = alone.completion_ids.shape[1]
        assert torch.equal(both.completion_ids[2:, :width], alone.completion_ids)
        assert not torch.equal(other_seed.completion_ids, alone.completion_ids)
        assert both.group_index.tolist() == [0, 0, 1, 1]
    finally:
        _close(trainer)


@pytest.mark.parametrize("replay, expected", [(False, 1.0), (True, 0.0)])
def test_routing_mismatch_frac_measures_drift_from_the_rollouts_experts(tmp_path, replay, expected):
    """Every rollout expert id shifted by one (k=2 of 8 experts: no token keeps its set): without replay the update's
    forward routes every completion token differently (fraction 1); with replay it uses the shifted experts (0)."""
    trainer = _trainer(tmp_path, moe={"routing_replay": replay})
    try:
        trainer.sampling = dataclasses.replace(trainer.sampling, return_routing=True)  # as a routing-capturing engine
        step, _, _ = trainer.collect()
        E = trainer.policy.config.n_routed_experts
        assert trainer.policy.config.num_experts_per_tok < E
        step.rollout.routing = [(r + 1) % E for r in step.rollout.routing]
        metrics = trainer.update(step)
        assert metrics["moe/routing_mismatch_frac"] == expected
    finally:
        _close(trainer)


def test_no_routing_mismatch_metric_without_captured_routing(tmp_path):
    trainer = _trainer(tmp_path)
    try:
        step, _, _ = trainer.collect()
        assert step.rollout.routing is None
        assert "moe/routing_mismatch_frac" not in trainer.update(step)
    finally:
        _close(trainer)


def _update_with_rollout_logprobs_shifted(tmp_path, shift: float, **correction) -> dict:
    trainer = _trainer(tmp_path, rollout_correction=correction)
    try:
        step, _, _ = trainer.collect()
        step.rollout.sampling_logprobs = step.rollout.sampling_logprobs + shift * step.rollout.completion_mask
        return trainer.update(step)
    finally:
        _close(trainer)


def test_tis_weights_and_mis_mask_reach_the_loss(tmp_path):
    """The rollout's log-probs lowered by 1: r = pi_old / pi_rollout = e on every token. tis with cap 2 weights every
    token's surrogate by 2, so (one iteration, ratio 1) the policy loss is exactly twice mode none's on the same
    rollout; mis with cap 2 drops every token (e > 2), so nothing is left to learn from."""
    none = _update_with_rollout_logprobs_shifted(tmp_path / "none", -1.0, mode="none")
    tis = _update_with_rollout_logprobs_shifted(tmp_path / "tis", -1.0, mode="tis", cap=2.0)
    mis = _update_with_rollout_logprobs_shifted(tmp_path / "mis", -1.0, mode="mis", cap=2.0)
    assert none["policy_loss"] != 0
    assert tis["policy_loss"] == 2 * none["policy_loss"]
    assert tis["mismatch/truncated_frac"] == 1.0
    assert none["mismatch/ratio_min"] == pytest.approx(torch.e, rel=1e-5)
    assert mis["mismatch/masked_frac"] == 1.0
    assert mis["policy_loss"] == 0.0 and mis["grad_norm"] == 0.0


def test_on_main_in_one_process_returns_or_raises():
    class One:
        num_processes, device, is_main_process = 1, torch.device("cpu"), True

    dist = Collectives(One())
    assert dist.on_main(lambda: 7) == 7
    with pytest.raises(ValueError, match="from rank 0"):
        dist.on_main(lambda: (_ for _ in ()).throw(ValueError("from rank 0")))
