"""Hand-checked values for the GRPO-family variants and the RLOO math (derivations in the comments).

The loss tests use log-probs of simple probabilities so that ratios are exact: `log(0.5) - log(0.25)`
gives a ratio of 2, and so on. Padded slots carry absurd values to show they never leak in.
"""

import math

import pytest
import torch

from retrain.trainer.advantages import STD_EPS, kl_penalized_rewards, rloo_advantages
from retrain.trainer.losses import high_entropy_mask, log_importance_weights, policy_loss, rloo_loss

LN2 = math.log(2.0)


def _logps(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64)).requires_grad_(True)


def _old(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------
# CISPO: loss_t = -sg(min(ratio_t, cap)) * A * logp_t, summed over tokens / token count (dapo)
# ---------------------------------------------------------------------------------------------------


def test_cispo_caps_the_ratio_as_a_detached_weight():
    # one rollout, two tokens: logp = log[0.5, 0.25], old = log[0.25, 0.25] -> ratio [2, 1]; cap 1.5
    # weights min(ratio, 1.5) = [1.5, 1]; A = 2
    # loss_t = -w_t * A * logp_t = [-1.5 * 2 * (-ln 2), -1 * 2 * (-2 ln 2)] = [3 ln 2, 4 ln 2]
    # dapo: sum / 2 tokens = 3.5 ln 2; gradient d/dlogp_t = -w_t * A / 2 = [-1.5, -1.0] (weights detached)
    logps = _logps([[0.5, 0.25]])
    loss, stats = policy_loss(logps, torch.tensor([2.0]), torch.ones(1, 2), old_logps=_old([[0.25, 0.25]]), epsilon_high=1.5, loss_type="cispo")
    assert loss.item() == pytest.approx(3.5 * LN2)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.5, -1.0]], dtype=torch.float64))
    # only the first token's ratio exceeds the cap, with A > 0: "clipped high"; cispo has no low side
    assert stats.clip_ratio_high.item() == pytest.approx(0.5)
    assert stats.clip_ratio_low.item() == 0.0
    assert stats.clip_ratio.item() == pytest.approx(0.5)


def test_cispo_caps_the_weight_for_negative_advantages_too_but_counts_no_clipping():
    # ratio 2 > cap 1.5, A = -1: weight 1.5, loss = -1.5 * (-1) * log 0.5 = -1.5 ln 2
    loss, stats = policy_loss(_logps([[0.5]]), torch.tensor([-1.0]), torch.ones(1, 1), old_logps=_old([[0.25]]), epsilon_high=1.5, loss_type="cispo")
    assert loss.item() == pytest.approx(-1.5 * LN2)
    assert stats.clip_ratio.item() == 0.0  # TRL counts cispo clipping only where A > 0


def test_cispo_uses_the_global_token_count():
    # same two tokens as above, num_items_in_batch = 7: 7 ln 2 / 7 = ln 2
    loss, _ = policy_loss(
        _logps([[0.5, 0.25]]), torch.tensor([2.0]), torch.ones(1, 2), old_logps=_old([[0.25, 0.25]]),
        epsilon_high=1.5, loss_type="cispo", num_items_in_batch=torch.tensor(7),
    )
    assert loss.item() == pytest.approx(LN2)


# ---------------------------------------------------------------------------------------------------
# SAPO: loss_t = -sigmoid(tau * (ratio_t - 1)) * 4 / tau * A, tau = tau_pos if A > 0 else tau_neg; grpo mean
# ---------------------------------------------------------------------------------------------------


def test_sapo_on_policy_value_and_plain_policy_gradient():
    # MASK rows of 2 and 1 tokens, A = [1, -1], on-policy (ratio 1, sigmoid(0) = 1/2):
    #   row 0: -(1/2) * 4 / 1.0 * 1 = -2 per token -> mean -2
    #   row 1: -(1/2) * 4 / 1.05 * (-1) = 2 / 1.05
    #   grpo: (-2 + 2 / 1.05) / 2
    # gradient: d/dlogp [-sigmoid(tau (r - 1)) * 4 / tau * A] at r = 1 is -(1/4) * tau * 4 / tau * A = -A,
    # whatever tau; grpo weights each token 1 / (len_i * N): row 0 -> -1/4 each, row 1 -> +1/2
    logps = _logps([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = policy_loss(logps, torch.tensor([1.0, -1.0]), mask, loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    assert loss.item() == pytest.approx((-2 + 2 / 1.05) / 2)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, -0.25, 0.0], [0.5, 0.0, 0.0]], dtype=torch.float64))


def test_sapo_off_policy_gate_and_its_gradient():
    # ratio 2 (logp log 0.5, old log 0.25), A = 1, tau_pos = 0.5:
    #   loss = -sigmoid(0.5 * (2 - 1)) * 4 / 0.5 = -8 sigmoid(0.5)
    #   d/dlogp = -8 * sigmoid'(0.5) * 0.5 * ratio = -8 * s (1 - s) * 0.5 * 2 = -8 s (1 - s), s = sigmoid(0.5)
    logps = _logps([[0.5]])
    loss, _ = policy_loss(logps, torch.tensor([1.0]), torch.ones(1, 1), old_logps=_old([[0.25]]), loss_type="sapo", sapo_temperature_pos=0.5)
    s = _sigmoid(0.5)
    assert loss.item() == pytest.approx(-8 * s)
    loss.backward()
    assert logps.grad.item() == pytest.approx(-8 * s * (1 - s))


def test_sapo_picks_the_negative_temperature_for_negative_advantages():
    # ratio 0.5, A = -2, tau_neg = 2: loss = -sigmoid(2 * (0.5 - 1)) * 4 / 2 * (-2) = 4 sigmoid(-1)
    loss, _ = policy_loss(
        _logps([[0.25]]), torch.tensor([-2.0]), torch.ones(1, 1), old_logps=_old([[0.5]]), loss_type="sapo",
        sapo_temperature_pos=100.0, sapo_temperature_neg=2.0,
    )
    assert loss.item() == pytest.approx(4 * _sigmoid(-1.0))


# ---------------------------------------------------------------------------------------------------
# Sequence-level importance sampling (GSPO): one ratio per rollout, exp(mean_t of the log-ratios)
# ---------------------------------------------------------------------------------------------------


def test_sequence_level_ratio_is_the_masked_mean_log_ratio():
    # row 0: log-ratios [ln 2, 0] -> mean ln 2 / 2 -> ratio sqrt(2); row 1: [ln 0.5] (padded slots ignored)
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.25, 0.9, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.25, 0.01], [0.5, 0.01, 0.01]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    log_w = log_importance_weights(logps, old, mask, "sequence")
    assert log_w.shape == (2, 1)
    torch.testing.assert_close(log_w.exp().squeeze(1), torch.tensor([math.sqrt(2), 0.5]))
    assert log_importance_weights(logps, old, mask, "token").shape == (2, 3)


def test_sequence_level_clipping_acts_on_the_whole_rollout():
    # A = [1, 1], eps = 0.2, bnpo (sum over the 3 policy tokens / 3):
    #   row 0: ratio sqrt(2) > 1.2 -> clipped: both tokens -1.2, no gradient
    #   row 1: ratio 0.5 (A > 0, min(0.5, 0.8) = 0.5) -> -0.5, gradient d/dlogp (-ratio) / 3 = -0.5 / 3
    #   loss = (-1.2 - 1.2 - 0.5) / 3
    # At token level row 0 would split: token 0 ratio 2 (clipped, -1.2), token 1 ratio 1 (-1).
    logps = _logps([[0.5, 0.25, 0.9], [0.25, 0.9, 0.9]])
    old = _old([[0.25, 0.25, 0.01], [0.5, 0.01, 0.01]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 1.0])
    loss, _ = policy_loss(logps, adv, mask, old_logps=old, epsilon=0.2, loss_type="bnpo", importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-2.9 / 3)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, 0.0], [-0.5 / 3, 0.0, 0.0]], dtype=torch.float64))
    token_loss, _ = policy_loss(logps, adv, mask, old_logps=old, epsilon=0.2, loss_type="bnpo", importance_sampling_level="token")
    assert token_loss.item() == pytest.approx((-1.2 - 1.0 - 0.5) / 3)


def test_sequence_level_unclipped_gradient_spreads_over_the_rollout():
    # one rollout, log-ratios [ln 1.1, 0] -> ratio sqrt(1.1) (inside [0.8, 1.2]), A = 1, grpo:
    #   loss = -sqrt(1.1) (every token carries the same -ratio * A, mean over 2 tokens)
    #   d ratio / d logp_t = ratio / 2 for each token -> gradient -sqrt(1.1) / 2 on both tokens
    logps = _logps([[0.55, 0.5]])
    loss, _ = policy_loss(logps, torch.tensor([1.0]), torch.ones(1, 2), old_logps=_old([[0.5, 0.5]]), loss_type="grpo", importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-math.sqrt(1.1))
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.full((1, 2), -math.sqrt(1.1) / 2, dtype=torch.float64))


def test_unknown_importance_sampling_level_is_rejected():
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(_logps([[0.5]]), torch.tensor([1.0]), torch.ones(1, 1), importance_sampling_level="batch")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# High-entropy mask: keep policy tokens with entropy >= the (1 - top_quantile) quantile of the batch
# ---------------------------------------------------------------------------------------------------

ENTROPY = torch.tensor([[0.1, 0.5, 0.9, 7.0], [0.3, 0.7, 9.0, 9.0]])
ENTROPY_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def test_high_entropy_mask_hand_checked():
    # policy entropies sorted: [0.1, 0.3, 0.5, 0.7, 0.9]; top 40% -> quantile 0.6 at position 0.6 * 4 = 2.4:
    # 0.5 + 0.4 * (0.7 - 0.5) = 0.58 -> keep 0.7 and 0.9; the padded 7.0 and 9.0 never count
    kept = high_entropy_mask(ENTROPY, ENTROPY_MASK, 0.4)
    assert kept.tolist() == [[False, False, True, False], [False, True, False, False]]


def test_high_entropy_mask_keeps_everything_at_one_and_nothing_on_an_empty_mask():
    assert torch.equal(high_entropy_mask(ENTROPY, ENTROPY_MASK, 1.0), ENTROPY_MASK.bool())
    assert not high_entropy_mask(ENTROPY, torch.zeros_like(ENTROPY_MASK), 0.5).any()
    # all-equal entropies: the threshold equals them, and ">=" keeps them all
    assert high_entropy_mask(torch.full((2, 2), 0.3), torch.ones(2, 2), 0.1).all()


def test_high_entropy_mask_boundary_token_is_kept_for_float64_entropies():
    # [0.1, 0.2, 0.3], top half: the median 0.2 is the threshold itself and must be kept (">="), whatever
    # the dtype completion_logps returns (float64 for a float64 model)
    mask = torch.ones(1, 3)
    for dtype in (torch.float32, torch.float64):
        kept = high_entropy_mask(torch.tensor([[0.1, 0.2, 0.3]], dtype=dtype), mask, 0.5)
        assert kept.tolist() == [[False, True, True]], dtype
    # top_quantile = 0: only the maximum survives
    assert high_entropy_mask(torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64), mask, 0.0).tolist() == [[False, False, True]]


def test_entropy_mask_removes_the_policy_term_but_not_the_kl():
    # bnpo, on-policy, A = 1: policy term -1 per token; keep only token 0 -> policy sum -1
    # KL: ref = log 0.25, logp = log 0.5 -> d = -ln 2, k3 = 0.5 + ln 2 - 1 on both tokens (not masked)
    # loss = (-1 + beta * 2 * k3) / 2
    logps = _logps([[0.5, 0.5]])
    ref = _old([[0.25, 0.25]])
    keep = torch.tensor([[True, False]])
    loss, _ = policy_loss(logps, torch.tensor([1.0]), torch.ones(1, 2), ref_logps=ref, beta=0.1, loss_type="bnpo", entropy_mask=keep)
    k3 = 0.5 + LN2 - 1
    assert loss.item() == pytest.approx((-1 + 0.1 * 2 * k3) / 2)


# ---------------------------------------------------------------------------------------------------
# RLOO advantages: A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_group)
# ---------------------------------------------------------------------------------------------------


def test_rloo_advantages_hand_checked():
    # group [1, 2, 3]: baselines [2.5, 2, 1.5] -> [-1.5, 0, 1.5]
    # group [0, 0, 6]: baselines [3, 3, 0]     -> [-3, -3, 6]
    result = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), group_size=3)
    torch.testing.assert_close(result.advantages, torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))
    # logging: group means 2 and 2; unbiased stds 1 and sqrt((4 + 4 + 16) / 2) = sqrt(12)
    torch.testing.assert_close(result.group_mean, torch.full((6,), 2.0))
    torch.testing.assert_close(result.group_std, torch.tensor([1.0] * 3 + [math.sqrt(12)] * 3))


def test_rloo_advantages_normalized_over_the_batch():
    # advantages above sum to 0 (mean 0); unbiased variance (2.25 + 0 + 2.25 + 9 + 9 + 36) / 5 = 11.7
    result = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), group_size=3, normalize=True)
    expected = torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]) / (math.sqrt(11.7) + STD_EPS)
    torch.testing.assert_close(result.advantages, expected)


def test_rloo_advantages_with_two_rollouts_are_the_difference():
    result = rloo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2)
    torch.testing.assert_close(result.advantages, torch.tensor([-2.0, 2.0, 0.0, 0.0]))


def test_rloo_advantages_reject_bad_shapes():
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(5), group_size=2)


# ---------------------------------------------------------------------------------------------------
# KL in the reward (RLOO): r - beta * sum_t (old_t - ref_t) over policy tokens
# ---------------------------------------------------------------------------------------------------


def test_kl_penalized_rewards_hand_checked():
    # row 0: (old - ref) = [-1 - -1.5, -2 - -1] = [0.5, -1] -> sum -0.5 (a negative token term is kept)
    #        1.0 - 0.1 * (-0.5) = 1.05; the padded slot (old -9, ref 0) is ignored
    # row 1: [-0.5 - -1] = [0.5] -> 0.5 - 0.1 * 0.5 = 0.45
    rewards = torch.tensor([1.0, 0.5])
    old = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(kl_penalized_rewards(rewards, old, ref, mask, beta=0.1), torch.tensor([1.05, 0.45]))
    torch.testing.assert_close(kl_penalized_rewards(rewards, old, ref, mask, beta=0.0), rewards)


# ---------------------------------------------------------------------------------------------------
# RLOO loss: one ratio per rollout, exp(sum_t (logp_t - old_t)), PPO-clipped, mean over rollouts
# ---------------------------------------------------------------------------------------------------

# row 0: log-ratios [ln 1.5, 0] -> ratio 1.5 (a *sum*, not a mean); row 1 and row 2: [ln 0.5] -> 0.5
RLOO_LOGPS = [[0.75, 0.5, 0.9], [0.25, 0.9, 0.9], [0.25, 0.9, 0.9]]
RLOO_OLD = [[0.5, 0.5, 0.01], [0.5, 0.01, 0.01], [0.5, 0.01, 0.01]]
RLOO_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
RLOO_ADV = torch.tensor([1.0, 1.0, -1.0])


def test_rloo_loss_hand_checked():
    # eps 0.2: row 0 (A = 1, ratio 1.5 > 1.2) clipped -> -1.2, no gradient
    #          row 1 (A = 1, ratio 0.5: min(0.5, 0.8)) -> -0.5, gradient -ratio * A / 3 = -0.5 / 3
    #          row 2 (A = -1, ratio 0.5 < 0.8: min(-0.5, -0.8) = -0.8) clipped -> +0.8, no gradient
    # loss = (-1.2 - 0.5 + 0.8) / 3 = -0.3
    logps = _logps(RLOO_LOGPS)
    loss, stats = rloo_loss(logps, RLOO_ADV, RLOO_MASK, old_logps=_old(RLOO_OLD), epsilon=0.2)
    assert loss.item() == pytest.approx(-0.3)
    loss.backward()
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[1, 0] = -0.5 / 3
    torch.testing.assert_close(logps.grad, expected)
    assert stats.clip_ratio_high.item() == pytest.approx(1 / 3)  # row 0
    assert stats.clip_ratio_low.item() == pytest.approx(1 / 3)  # row 2
    assert stats.clip_ratio.item() == pytest.approx(2 / 3)


def test_rloo_loss_clip_higher():
    # epsilon_high 0.6: row 0's ratio 1.5 < 1.6 is no longer clipped -> -1.5, and its gradient reaches
    # both tokens: d ratio / d logp_t = ratio -> -1.5 / 3 = -0.5 each. loss = (-1.5 - 0.5 + 0.8) / 3 = -0.4
    logps = _logps(RLOO_LOGPS)
    loss, stats = rloo_loss(logps, RLOO_ADV, RLOO_MASK, old_logps=_old(RLOO_OLD), epsilon=0.2, epsilon_high=0.6)
    assert loss.item() == pytest.approx(-0.4)
    loss.backward()
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[0, :2] = -0.5
    expected[1, 0] = -0.5 / 3
    torch.testing.assert_close(logps.grad, expected)
    assert stats.clip_ratio_high.item() == 0.0


def test_rloo_loss_on_policy_is_minus_the_mean_advantage():
    # old = logp.detach(): ratio 1, loss = -mean(A) = -(1 + 1 - 1) / 3; gradient -A_i / 3 on every policy token
    logps = _logps(RLOO_LOGPS)
    loss, stats = rloo_loss(logps, RLOO_ADV, RLOO_MASK)
    assert loss.item() == pytest.approx(-1 / 3)
    loss.backward()
    torch.testing.assert_close(logps.grad, (-RLOO_ADV.double().unsqueeze(1) / 3) * RLOO_MASK.double())
    assert stats.clip_ratio.item() == 0.0
