"""Several optimizer steps per rollout, on the tiny model on CPU: the logged ratio and clip fractions equal the values
the test computes itself from forwards of the policy before and between the optimizer steps (issue 13.2, 13.4), and
`algorithm.mask_truncated_completions` takes truncated rows out of the gradient."""

from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from tiny_recipes import arithmetic_recipe, write_recipe

from thinkzero.rl.config import load_config
from thinkzero.rl.trainer import Trainer

REWARDS = Path(__file__).with_name("rewards_for_tests.py")
EPSILON = 1e-3  # small enough that one step at lr 0.01 moves many tokens out of [1 - eps, 1 + eps]


def _trainer(tmp_path: Path, rollout: dict | None = None, **algorithm) -> Trainer:
    """2 prompts x 4 completions = 8 rows per step; digit_fraction varies within groups, so advantages are non-zero."""
    recipe = arithmetic_recipe(
        tmp_path, 16,
        rollout={"num_generations": 4, "prompts_per_step": 2, "max_new_tokens": 12, **(rollout or {})},
        rewards={"functions": [{"name": f"{REWARDS}:digit_fraction"}], "num_workers": 0},
        algorithm={"loss_type": "grpo", "beta": 0.0, "epsilon": EPSILON, **algorithm},
        optim={"lr": 0.01},
        train={"max_steps": 1, "output_dir": str(tmp_path / "out"), "save_every": 0, "seed": 3},
        logging={"mode": "disabled", "completions_every": 0, "console": False},
    )
    return Trainer(load_config(write_recipe(recipe, tmp_path / "recipe.json")))


def _close(trainer: Trainer) -> None:
    trainer.scorer.close()
    trainer.tracker.close()


@torch.no_grad()
def _policy_logprobs(trainer: Trainer, rb, rows: slice) -> torch.Tensor:
    """The completion tokens' log-probs under the policy as it is now (B, Tc): a plain forward, no prefix sharing."""
    Tp = rb.prompt_ids.shape[1]
    out = trainer.policy(rb.input_ids[rows], rb.attention_mask[rows], target_ids=rb.completion_ids[rows],
                         target_start=Tp - 1, temperature=trainer.cfg.rollout.temperature or 1.0)
    return out.logprobs


def _clip_counts(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Tokens whose gradient the clip removed (as policy_loss counts them): (low, high) over the masked tokens."""
    mask = mask.bool()
    adv = advantages[:, None].expand_as(ratio)  # (B, T)
    low = (ratio < 1 - EPSILON) & (adv < 0) & mask
    high = (ratio > 1 + EPSILON) & (adv > 0) & mask
    return float(low.sum()), float(high.sum())


def test_second_mini_batch_ratio_and_clip_fraction_equal_computed_values(tmp_path):
    """num_iterations 1, mini_batch_size 4 of 8 rows: optimizer step 1 trains rows 0-3 on-policy (ratio exactly 1),
    step 2 trains rows 4-7 with the weights step 1 left, against the log-probs before any update. The logged
    token means must equal those computed here. Fails if the second mini-batch's old log-probs are its current ones
    (ratio 1, no clipping: issue 13.2), or are computed after the first step."""
    trainer = _trainer(tmp_path, mini_batch_size=4)
    try:
        step, _, _ = trainer.collect()
        rb = step.rollout
        first, second = slice(0, 4), slice(4, 8)
        old = _policy_logprobs(trainer, rb, slice(0, 8))  # before any update: pi_old for every row
        after_first = []
        # torch's global step hook: the test sees the weights between the two optimizer steps.
        hook = register_optimizer_step_post_hook(
            lambda opt, args, kwargs: after_first.append(_policy_logprobs(trainer, rb, second)))
        try:
            metrics = trainer.update(step)
        finally:
            hook.remove()
        assert len(after_first) == 2  # one hook call per optimizer step; the first is what step 2's forward sees

        mask = rb.completion_mask.float()  # (8, Tc)
        n_first, n_second = float(mask[first].sum()), float(mask[second].sum())
        ratio = torch.exp(after_first[0] - old[second])  # (4, Tc)
        # ratio/mean is a token mean over both mini-batches: n_first tokens at 1, then step 2's ratios.
        expected_mean = (n_first + float((ratio * mask[second]).sum())) / (n_first + n_second)
        low, high = _clip_counts(ratio, step.advantages[second], mask[second])
        assert low + high > 0, "no token of the second mini-batch left the clip region: the test proves nothing"
        assert metrics["ratio/mean"] == pytest.approx(expected_mean, abs=1e-6)
        assert metrics["clip_ratio/low_mean"] == pytest.approx(low / (n_first + n_second), abs=1e-6)
        assert metrics["clip_ratio/high_mean"] == pytest.approx(high / (n_first + n_second), abs=1e-6)
        assert metrics["clip_ratio/region_mean"] == pytest.approx((low + high) / (n_first + n_second), abs=1e-6)
    finally:
        _close(trainer)


def test_several_iterations_first_ratio_is_exactly_one_then_clipping_fires(tmp_path):
    """num_iterations 2 on one mini-batch: iteration 1's forward is the old log-probs' computation on the same
    weights (ratio exactly 1 on every token, seen through a hook on the update's forward), iteration 2 runs after
    one optimizer step, so with a small epsilon tokens are clipped and the logged fractions are half of iteration
    2's. Fails if old log-probs are the current ones (ratio 1 in iteration 2, no clipping) or if they are not the
    same computation as the update's (iteration 1 not exactly 1)."""
    trainer = _trainer(tmp_path, num_iterations=2)
    try:
        step, _, _ = trainer.collect()
        rb = step.rollout
        mask = rb.completion_mask.bool()
        seen = []
        hook = trainer.policy.register_forward_hook(lambda mod, args, out: seen.append(out.logprobs.detach()))
        try:
            metrics = trainer.update(step)
        finally:
            hook.remove()
        assert len(seen) == 2  # one forward per iteration (one micro-batch of 8 rows)
        first = torch.exp(seen[0] - step.old_logprobs)
        assert torch.equal(first[mask], torch.ones_like(first[mask])), float((first[mask] - 1).abs().max())
        second = torch.exp(seen[1] - step.old_logprobs)
        n = float(mask.sum())
        low, high = _clip_counts(second, step.advantages, mask)
        assert low + high > 0, "nothing clipped in iteration 2"
        # Token means over both iterations (n tokens each): iteration 1 contributes no clipped token.
        assert metrics["clip_ratio/region_mean"] == pytest.approx((low + high) / (2 * n), abs=1e-6)
        assert metrics["ratio/mean"] == pytest.approx((n + float(second[mask].sum())) / (2 * n), abs=1e-6)
    finally:
        _close(trainer)


def test_truncated_completions_carry_no_gradient(tmp_path):
    """mask_truncated_completions: the update equals one where the truncated rows' advantages are 0 (grpo's
    normalisers count sequences, so both losses are the same sum). Stop strings end some random completions early,
    the rest hit max_new_tokens. Fails if the flag only changes the metrics (truncated rows still push the weights)
    or masks every row (no update at all)."""
    # 'a' and 'e' stop a few of these seed-3 completions before their 12th token; the others are truncated.
    stops = {"stop_strings": ["a", "e"]}
    masked = _trainer(tmp_path / "masked", stops, mask_truncated_completions=True)
    zeroed = _trainer(tmp_path / "zeroed", stops)
    try:
        start = {k: v.clone() for k, v in masked.policy.state_dict().items()}
        step_m, _, _ = masked.collect()
        step_z, _, _ = zeroed.collect()
        assert torch.equal(step_m.rollout.completion_ids, step_z.rollout.completion_ids)  # the same rollout
        truncated = torch.tensor([f == "length" for f in step_z.rollout.finish_reasons])  # (8,)
        assert 0 < int(truncated.sum()) < 8, step_z.rollout.finish_reasons
        assert step_z.advantages[truncated].abs().sum() > 0, "truncated rows had no advantage: test proves nothing"
        assert step_m.rollout.completion_mask[truncated].sum() == 0
        torch.testing.assert_close(step_m.rollout.completion_mask[~truncated], step_z.rollout.completion_mask[~truncated])

        step_z.advantages = torch.where(truncated, 0.0, step_z.advantages)
        masked.update(step_m)
        zeroed.update(step_z)
        after_m, after_z = masked.policy.state_dict(), zeroed.policy.state_dict()
        assert any(not torch.equal(start[k], after_m[k]) for k in start), "the finished rows moved nothing"
        for name in start:
            torch.testing.assert_close(after_m[name], after_z[name], rtol=0, atol=1e-7, msg=name)
    finally:
        _close(masked)
        _close(zeroed)
