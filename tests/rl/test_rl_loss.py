"""Loss and KL estimators against hand-computed values (arithmetic in the comments)."""

import math

import pytest
import torch

from thinkzero.rl.loss import AGGREGATORS, KL_ESTIMATORS, policy_loss, rollout_correction

LN = math.log

# Shared tiny batch (eps = 0.2 -> ratio clipped to [0.8, 1.2]); old_logprobs are 0, so ratio = exp(logprobs).
#   row 0, A = +1, tokens with ratios 1.5, 0.5:
#       t0: min(1.5 * 1, 1.2 * 1) = 1.2 -> surrogate -1.2  (high-clipped, no gradient)
#       t1: min(0.5 * 1, 0.8 * 1) = 0.5 -> surrogate -0.5
#   row 1, A = -1, one real token with ratio 0.5 (second token is padding):
#       t0: min(0.5 * -1, 0.8 * -1) = -0.8 -> surrogate 0.8  (low-clipped, no gradient)
LOGPROBS = [[LN(1.5), LN(0.5)], [LN(0.5), 0.0]]
MASK = [[1.0, 1.0], [1.0, 0.0]]
ADV = [1.0, -1.0]


def _inputs():
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    return logprobs, torch.zeros(2, 2), torch.tensor(ADV), torch.tensor(MASK)


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        # per-sequence means: row0 (-1.2 - 0.5) / 2 = -0.85, row1 0.8 / 1 = 0.8; mean (-0.85 + 0.8) / 2 = -0.025
        ("grpo", {}, -0.025),
        # all local tokens: (-1.2 - 0.5 + 0.8) / 3 = -0.3
        ("bnpo", {}, -0.3),
        # token sum / (2 sequences * 4 max tokens) = -0.9 / 8 = -0.1125
        ("dr_grpo", {"max_completion_length": 4}, -0.1125),
        # token sum / global token count 6 = -0.9 / 6 = -0.15
        ("dapo", {"num_items_in_batch": 6}, -0.15),
        # without a global count the local 3 tokens are the batch: -0.9 / 3 = -0.3
        ("dapo", {}, -0.3),
        # grpo with a global sequence count 4: (-0.85 + 0.8) / 4 = -0.0125
        ("grpo", {"num_sequences": 4}, -0.0125),
    ],
)
def test_token_level_losses_by_hand(loss_type, kwargs, expected):
    logprobs, old, adv, mask = _inputs()
    loss, metrics = policy_loss(logprobs, old, None, adv, mask, loss_type=loss_type, epsilon=0.2, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(expected, abs=1e-6)
    # low: row1 t0 (ratio 0.5 < 0.8, A < 0); high: row0 t0 (1.5 > 1.2, A > 0); over 3 real tokens
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
    assert metrics["kl"].item() == 0.0


def test_grpo_gradient_only_through_unclipped_tokens():
    logprobs, old, adv, mask = _inputs()
    loss, _ = policy_loss(logprobs, old, None, adv, mask, loss_type="grpo", epsilon=0.2)
    loss.backward()
    # Only row0 t1 is unclipped: d(-ratio * A)/dlogp = -ratio * A = -0.5, times 1/2 (token mean) * 1/2 (seq mean).
    # Negative gradient: a descent step raises the log-prob of the positively rewarded token.
    expected = torch.tensor([[0.0, -0.125], [0.0, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_clip_higher_widens_upper_bound():
    logprobs, old, adv, mask = _inputs()
    # epsilon_high 0.6 -> upper bound 1.6: row0 t0 keeps ratio 1.5 -> surrogate -1.5
    # bnpo: (-1.5 - 0.5 + 0.8) / 3 = -0.4; nothing is high-clipped any more
    loss, metrics = policy_loss(logprobs, old, None, adv, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.6)
    assert loss.item() == pytest.approx(-0.4, abs=1e-6)
    assert metrics["clip_ratio/high_mean"].item() == 0.0
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)


def test_gspo_sequence_level_ratio_by_hand():
    logprobs, old, adv, mask = _inputs()
    loss, metrics = policy_loss(logprobs, old, None, adv, mask, loss_type="gspo", epsilon=0.2)
    # row0: s = exp((ln 1.5 + ln 0.5) / 2) = sqrt(0.75) = 0.866025 (inside [0.8, 1.2]); A = +1 -> -0.866025
    # row1: s = exp(ln 0.5 / 1) = 0.5; A = -1: min(-0.5, -0.8) = -0.8 -> +0.8 (clipped)
    # mean over sequences: (-0.866025 + 0.8) / 2 = -0.0330127
    assert loss.item() == pytest.approx((-math.sqrt(0.75) + 0.8) / 2, abs=1e-6)
    # clip fractions are token-weighted: row1's one token is low-clipped out of 3 tokens
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert metrics["clip_ratio/high_mean"].item() == 0.0
    loss.backward()
    # d/dlogp_t of -s0 = -s0 * (1/2) per token of row0 (s0 = exp(mean)); then 1/2 for the mean over sequences
    g = -math.sqrt(0.75) / 2 / 2
    torch.testing.assert_close(logprobs.grad, torch.tensor([[g, g], [0.0, 0.0]]))


def test_gspo_one_ratio_per_sequence_clips_whole_sequence():
    # Sequence mean log-ratio ln(1.5) > ln(1.2): the whole positive-advantage sequence is clipped -> no gradient,
    # even though token 1 alone (ratio 1.0) would be inside the region.
    logprobs = torch.tensor([[2 * LN(1.5), 0.0]], requires_grad=True)
    loss, metrics = policy_loss(logprobs, torch.zeros(1, 2), None, torch.tensor([1.0]), torch.ones(1, 2),
                                loss_type="gspo", epsilon=0.2)
    # loss = -min(1.5, 1.2) = -1.2
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert metrics["clip_ratio/high_mean"].item() == 1.0
    loss.backward()
    assert torch.all(logprobs.grad == 0)


@pytest.mark.parametrize(
    "estimator, expected",
    [
        # log_r = ref - logp = [ln 2, ln 0.5] = [0.693147, -0.693147]
        ("k1", [-0.693147, 0.693147]),  # -log_r
        ("k2", [0.240227, 0.240227]),  # 0.5 * 0.693147^2 = 0.5 * 0.480453
        ("k3", [0.306853, 0.193147]),  # exp(log_r) - log_r - 1: 2 - 0.693147 - 1 ; 0.5 + 0.693147 - 1
    ],
)
def test_kl_estimators_by_hand(estimator, expected):
    logprobs = torch.zeros(1, 2)
    ref = torch.tensor([[LN(2.0), LN(0.5)]])
    torch.testing.assert_close(KL_ESTIMATORS[estimator](logprobs, ref), torch.tensor([expected]), atol=1e-6, rtol=0)


def test_kl_estimators_zero_when_equal():
    x = torch.randn(3, 4)
    for fn in KL_ESTIMATORS.values():
        torch.testing.assert_close(fn(x, x), torch.zeros(3, 4))


@pytest.mark.parametrize(
    "estimator, kl_values, dkl",
    [
        # dk/dlogp with log_r = ref - logp: k1 -> +1 ; k2 -> -log_r ; k3 -> 1 - exp(log_r)
        ("k1", [-0.693147, 0.693147], [1.0, 1.0]),
        ("k2", [0.240227, 0.240227], [-0.693147, 0.693147]),
        ("k3", [0.306853, 0.193147], [1 - 2.0, 1 - 0.5]),
    ],
)
def test_beta_kl_term_in_loss_and_gradient(estimator, kl_values, dkl):
    # old_logprobs None -> ratio = exp(logp - logp.detach()) = 1 with gradient 1; A = 0.5 -> surrogate -0.5
    logprobs = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[LN(2.0), LN(0.5)]])
    beta = 0.1
    loss, metrics = policy_loss(logprobs, None, ref, torch.tensor([0.5]), torch.ones(1, 2), loss_type="grpo",
                                beta=beta, kl_estimator=estimator)
    kl_mean = sum(kl_values) / 2
    # loss = mean_t(-0.5 + beta * kl_t) = -0.5 + 0.1 * mean(kl)
    assert loss.item() == pytest.approx(-0.5 + beta * kl_mean, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(kl_mean, abs=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(-0.5, abs=1e-6)
    loss.backward()
    # per token: (-A + beta * dk/dlogp) / 2 tokens
    expected = torch.tensor([[(-0.5 + beta * d) / 2 for d in dkl]])
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_minibatch_losses_sum_to_full_batch(loss_type):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    logprobs = (torch.randn(B, T, generator=g) * 0.1 - 1).requires_grad_()
    old = logprobs.detach() + torch.randn(B, T, generator=g) * 0.1
    ref = logprobs.detach() + torch.randn(B, T, generator=g) * 0.1
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])
    mask = (torch.arange(T) < lengths[:, None]).float()
    common = {"loss_type": loss_type, "beta": 0.04, "max_completion_length": T,
              "num_items_in_batch": int(mask.sum()), "num_sequences": B}
    full, _ = policy_loss(logprobs, old, ref, adv, mask, **common)
    (full_grad,) = torch.autograd.grad(full, logprobs)
    parts = []
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):  # uneven mini-batches with different token counts
        part, _ = policy_loss(logprobs[rows], old[rows], ref[rows], adv[rows], mask[rows], **common)
        parts.append(part)
    total = torch.stack(parts).sum()
    (split_grad,) = torch.autograd.grad(total, logprobs)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(split_grad, full_grad)


def test_bnpo_is_local_token_mean_not_invariant():
    # bnpo normalises by the local batch, so uneven mini-batches do NOT add up (why dapo takes a global count).
    logprobs = torch.tensor([[0.1, 0.0], [0.2, 0.3]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    adv = torch.tensor([1.0, 1.0])
    # old = None -> ratio 1 -> surrogate -1 per token; full bnpo = -3/3 = -1; halves: -1/1 + -2/2 = -2
    full, _ = policy_loss(logprobs, None, None, adv, mask, loss_type="bnpo")
    halves = sum(policy_loss(logprobs[i:i + 1], None, None, adv[i:i + 1], mask[i:i + 1], loss_type="bnpo")[0]
                 for i in range(2))
    assert full.item() == pytest.approx(-1.0)
    assert halves.item() == pytest.approx(-2.0)


def test_bad_inputs_are_explained():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'; choose one of grpo, bnpo"):
        policy_loss(lp, None, None, torch.zeros(2), m, loss_type="ppo")
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        policy_loss(lp, None, None, torch.zeros(2), m, kl_estimator="k4")
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        policy_loss(lp, None, None, torch.zeros(2), m, beta=0.1)
    with pytest.raises(ValueError, match=r"advantages \(3,\) must be \[B\]"):
        policy_loss(lp, None, None, torch.zeros(3), m)
    with pytest.raises(ValueError, match="dr_grpo' needs max_completion_length"):
        policy_loss(lp, None, None, torch.zeros(2), m, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(lp, torch.zeros(2, 2), None, torch.zeros(2), m)


def test_all_padding_row_is_harmless():
    logprobs = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "gspo"):
        loss, metrics = policy_loss(logprobs, None, torch.zeros(2, 2), torch.tensor([1.0, 1.0]), mask, loss_type=lt,
                                    beta=0.1, max_completion_length=2)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


# Rollout correction batch: r = pi_old / pi_rollout per token, cap 2 -> [1/2, 2]. Row 1's last token is padding;
# its old log-prob is junk (-5) that must not count, its rollout log-prob 0 (what the engine writes on padding).
#   row 0: old 0.3, 0.5, 0.1 / rollout 0.1, 0.5, 0.4 -> r = 3, 1, 0.25   product 0.75
#   row 1: old 0.4, 0.4      / rollout 0.1, 0.5      -> r = 4, 0.8       product 3.2
CORR_OLD = [[LN(0.3), LN(0.5), LN(0.1)], [LN(0.4), LN(0.4), -5.0]]
CORR_ROLLOUT = [[LN(0.1), LN(0.5), LN(0.4)], [LN(0.1), LN(0.5), 0.0]]
CORR_MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
# Level-independent metrics over the 5 real tokens:
#   |log r|: ln 3 + 0 + ln 4 + ln 4 + ln 1.25 = 1.098612 + 1.386294 + 1.386294 + 0.223144 = 4.094344; / 5
#   k3 = r - ln r - 1: 0.901388 + 0 + (0.25 + 1.386294 - 1) + (4 - 1.386294 - 1) + (0.8 + 0.223144 - 1)
#                    = 0.901388 + 0.636294 + 1.613706 + 0.023144 = 3.174532; / 5
CORR_ABS_DIFF = 4.094344 / 5
CORR_KL = 3.174532 / 5


def _corr(mode, level, cap=2.0):
    return rollout_correction(torch.tensor(CORR_OLD), torch.tensor(CORR_ROLLOUT), torch.tensor(CORR_MASK), mode,
                              level, cap)


@pytest.mark.parametrize(
    "mode, level, weights, loss_mask, ratio_stats, frac",
    [
        # min(r, 2) per token: 3 -> 2, 4 -> 2 truncated (2 of 5 tokens); padding's weight is 1 (r of a masked token)
        ("tis", "token", [[2.0, 1.0, 0.25], [2.0, 0.8, 1.0]], CORR_MASK,
         # mean (3 + 1 + 0.25 + 4 + 0.8) / 5 = 9.05 / 5
         (9.05 / 5, 0.25, 4.0), ("mismatch/truncated_frac", 2 / 5)),
        # one weight per sequence: min(0.75, 2) = 0.75; min(3.2, 2) = 2 (row 1's 2 tokens truncated)
        ("tis", "sequence", [[0.75, 0.75, 0.75], [2.0, 2.0, 2.0]], CORR_MASK,
         # each sequence's r once per token: (3 * 0.75 + 2 * 3.2) / 5 = 8.65 / 5
         (8.65 / 5, 0.75, 3.2), ("mismatch/truncated_frac", 2 / 5)),
        # r outside [0.5, 2] masked: 3, 0.25, 4 -> 3 of 5 tokens
        ("mis", "token", None, [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
         (9.05 / 5, 0.25, 4.0), ("mismatch/masked_frac", 3 / 5)),
        # row 1's product 3.2 > 2: the whole sequence goes (2 of 5 tokens); row 0's 0.75 stays
        ("mis", "sequence", None, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
         (8.65 / 5, 0.75, 3.2), ("mismatch/masked_frac", 2 / 5)),
    ],
)
def test_rollout_correction_by_hand(mode, level, weights, loss_mask, ratio_stats, frac):
    got_weights, got_mask, metrics = _corr(mode, level)
    if weights is None:
        assert got_weights is None
    else:
        torch.testing.assert_close(got_weights, torch.tensor(weights))
    torch.testing.assert_close(got_mask, torch.tensor(loss_mask))
    assert metrics["mismatch/abs_logprob_diff_mean"].item() == pytest.approx(CORR_ABS_DIFF, abs=1e-6)
    assert metrics["mismatch/kl"].item() == pytest.approx(CORR_KL, abs=1e-6)
    mean, lo, hi = ratio_stats
    assert metrics["mismatch/ratio_mean"].item() == pytest.approx(mean, abs=1e-6)
    assert metrics["mismatch/ratio_min"].item() == pytest.approx(lo, abs=1e-6)
    assert metrics["mismatch/ratio_max"].item() == pytest.approx(hi, abs=1e-6)
    name, value = frac
    assert metrics[name].item() == pytest.approx(value, abs=1e-6)
    other = {"mismatch/truncated_frac", "mismatch/masked_frac"} - {name}
    assert not other & metrics.keys()


def test_rollout_correction_none_keeps_the_loss_bitwise():
    # mode "none" through the same path the trainer takes (weights and mask from rollout_correction into
    # policy_loss) gives exactly today's loss and gradient; fails if "none" returned a rebuilt mask or weights.
    g = torch.Generator().manual_seed(0)
    B, T = 4, 5
    mask = (torch.arange(T) < torch.tensor([5, 2, 4, 1])[:, None]).float()
    old = torch.randn(B, T, generator=g) * 0.1 - 1
    rollout = old + torch.randn(B, T, generator=g) * 0.1
    weights, loss_mask, metrics = rollout_correction(old, rollout, mask, "none", "token", 2.0)
    assert weights is None and loss_mask is mask
    assert metrics["mismatch/abs_logprob_diff_mean"] > 0  # the diagnostics are still there
    ref = old + torch.randn(B, T, generator=g) * 0.1
    adv = torch.randn(B, generator=g)
    for loss_type in AGGREGATORS:
        common = {"loss_type": loss_type, "beta": 0.04, "max_completion_length": T}
        logprobs = (old + torch.randn(B, T, generator=g) * 0.1).requires_grad_()
        today, m_today = policy_loss(logprobs, old, ref, adv, mask, **common)
        (g_today,) = torch.autograd.grad(today, logprobs)
        corrected, m_corr = policy_loss(logprobs, old, ref, adv, loss_mask, token_weights=weights, **common)
        (g_corr,) = torch.autograd.grad(corrected, logprobs)
        assert torch.equal(today, corrected) and torch.equal(g_today, g_corr)
        assert all(torch.equal(m_today[k], m_corr[k]) for k in m_today)



def test_token_weights_scale_the_surrogate_by_hand():
    # The shared batch's surrogates -1.2, -0.5 (row 0), 0.8 (row 1); weights 2, 0.5 / 0.25, padding's 7 unused.
    logprobs, old, adv, mask = _inputs()
    weights = torch.tensor([[2.0, 0.5], [0.25, 7.0]])
    loss, metrics = policy_loss(logprobs, old, None, adv, mask, loss_type="grpo", epsilon=0.2, token_weights=weights)
    # row 0: (-1.2 * 2 - 0.5 * 0.5) / 2 = -2.65 / 2 = -1.325; row 1: 0.8 * 0.25 = 0.2; (-1.325 + 0.2) / 2 = -0.5625
    assert loss.item() == pytest.approx(-0.5625, abs=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(-0.5625, abs=1e-6)
    # dapo over 3 real tokens, normaliser unchanged: (-2.4 - 0.25 + 0.2) / 3
    dapo, _ = policy_loss(logprobs, old, None, adv, mask, loss_type="dapo", token_weights=weights)
    assert dapo.item() == pytest.approx(-2.45 / 3, abs=1e-6)
    loss.backward()
    # only row 0 t1 is unclipped: -ratio * A * w = -0.5 * 1 * 0.5, times 1/2 (token mean) * 1/2 (sequence mean)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.0625], [0.0, 0.0]]))


def test_token_weights_leave_the_kl_term_alone():
    # ratio 1, A = 0.5 -> surrogate -0.5 per token; weights 2, 0.5; k3 KL to ref [ln 2, ln 0.5] = 0.306853, 0.193147
    logprobs = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[LN(2.0), LN(0.5)]])
    loss, metrics = policy_loss(logprobs, None, ref, torch.tensor([0.5]), torch.ones(1, 2), loss_type="grpo",
                                beta=0.1, token_weights=torch.tensor([[2.0, 0.5]]))
    # ((-0.5 * 2 + 0.1 * 0.306853) + (-0.5 * 0.5 + 0.1 * 0.193147)) / 2 = (-1.25 + 0.05) / 2 = -0.6
    # (a weighted KL would give (-1 + 0.0613706 - 0.25 + 0.0096574) / 2 = -0.589486)
    assert loss.item() == pytest.approx(-0.6, abs=1e-6)
    assert metrics["policy_loss"].item() == pytest.approx(-1.25 / 2, abs=1e-6)


def test_rollout_correction_is_detached_and_finite_on_long_sequences():
    # 1000 tokens with log r = 1 each: the product e^1000 overflows float32, the log-space weight is exactly cap.
    old = torch.ones(1, 1000, requires_grad=True)
    rollout = torch.zeros(1, 1000)
    mask = torch.ones(1, 1000)
    weights, _, metrics = rollout_correction(old, rollout, mask, "tis", "sequence", 2.0)
    assert not weights.requires_grad
    torch.testing.assert_close(weights, torch.full((1, 1000), 2.0))
    assert all(torch.isfinite(v) for v in metrics.values())
    assert metrics["mismatch/truncated_frac"].item() == 1.0
    _, kept, metrics = rollout_correction(old, rollout, mask, "mis", "sequence", 2.0)
    assert kept.sum() == 0 and metrics["mismatch/masked_frac"].item() == 1.0


def test_rollout_correction_bad_inputs_are_explained():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown rollout correction mode 'is'; choose one of none, tis, mis"):
        rollout_correction(x, x, x, "is", "token", 2.0)
    with pytest.raises(ValueError, match="unknown rollout correction level 'batch'; choose one of token, sequence"):
        rollout_correction(x, x, x, "tis", "batch", 2.0)
    with pytest.raises(ValueError, match="cap must be > 1; got 1.0"):
        rollout_correction(x, x, x, "tis", "token", 1.0)
    with pytest.raises(ValueError, match="must all be the same"):
        rollout_correction(x, torch.zeros(2, 2), x, "tis", "token", 2.0)
    with pytest.raises(ValueError, match="token_weights"):
        policy_loss(x, None, None, torch.zeros(2), torch.ones(2, 3), token_weights=torch.ones(2, 2))
