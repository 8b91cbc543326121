"""Group-relative advantages and group statistics against hand-computed values."""

import math

import pytest
import torch

from thinkzero.rl.advantages import (
    ADVANTAGE_EPS,
    SCALERS,
    group_advantages,
    group_reward_stats,
    group_rows,
    nonconstant_groups,
)

# Two prompts, G = 2:  group 0 rewards [1, 0], group 1 rewards [3, 3].
REWARDS = torch.tensor([1.0, 0.0, 3.0, 3.0])


def test_group_scaling_by_hand():
    adv = group_advantages(REWARDS, 2, "group")
    # group 0: mean 0.5, unbiased std sqrt(((0.5)^2 + (0.5)^2) / 1) = 0.707107 -> +-0.5 / (0.707107 + 1e-4)
    # group 1: all equal -> 0 / (0 + 1e-4) = 0
    a = 0.5 / (math.sqrt(0.5) + ADVANTAGE_EPS)
    torch.testing.assert_close(adv, torch.tensor([a, -a, 0.0, 0.0]))


def test_batch_scaling_by_hand():
    adv = group_advantages(REWARDS, 2, "batch")
    # centred by group mean: [0.5, -0.5, 0, 0]; batch std of [1, 0, 3, 3]: mean 1.75,
    # squared deviations 0.5625 + 3.0625 + 1.5625 + 1.5625 = 6.75, / 3 = 2.25 -> std 1.5
    a = 0.5 / (1.5 + ADVANTAGE_EPS)
    torch.testing.assert_close(adv, torch.tensor([a, -a, 0.0, 0.0]))


def test_no_scaling_is_dr_grpo():
    # Dr. GRPO: only the group mean is subtracted
    adv = group_advantages(torch.tensor([2.0, 0.0, 1.0, 5.0, 5.0, 2.0]), 3, "none")
    # group means 1 and 4: [1, -1, 0, 1, 1, -2]
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 1.0, 1.0, -2.0]))


def test_grouped_input_keeps_shape_and_matches_flat():
    flat = group_advantages(REWARDS, 2, "group")
    grouped = group_advantages(REWARDS.view(2, 2), 2, "group")
    assert grouped.shape == (2, 2)
    torch.testing.assert_close(grouped.flatten(), flat)


def test_advantages_sum_to_zero_per_group():
    r = torch.rand(5 * 4, generator=torch.Generator().manual_seed(0))
    for name in SCALERS:
        adv = group_advantages(r, 4, name).view(5, 4)
        torch.testing.assert_close(adv.sum(1), torch.zeros(5), atol=1e-5, rtol=0)


def test_stats_and_dynamic_sampling_filter():
    stats = group_reward_stats(REWARDS, 2)
    assert stats["reward"] == pytest.approx(1.75)
    # per-group stds 0.707107 and 0 -> mean 0.353553
    assert stats["reward_std"] == pytest.approx(math.sqrt(0.5) / 2, abs=1e-6)
    assert stats["frac_reward_zero_std"] == pytest.approx(0.5)
    keep = nonconstant_groups(REWARDS, 2)
    assert keep.tolist() == [True, False]
    assert group_rows(keep, 2).tolist() == [0, 1]
    assert group_rows(torch.tensor([False, True, True]), 2).tolist() == [2, 3, 4, 5]


def test_bad_shapes_and_names():
    with pytest.raises(ValueError, match="cannot be split into groups of num_generations=3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="do not have num_generations=3 columns"):
        group_advantages(torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="unknown scale_rewards 'std'; choose one of group, batch, none"):
        group_advantages(torch.zeros(4), 2, "std")
