import math

import pytest
import torch

from retrain.trainer.losses import kl_k3, masked_mean, policy_loss

# Two rollouts, three completion slots; rollout 0 has 2 policy tokens, rollout 1 has 1.
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([1.0, -1.0])


def _on_policy_logps():
    return torch.log(torch.full((2, 3), 0.5)).requires_grad_(True)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        # on-policy the ratio is 1, so each token's loss is -A: row 0 -> -1 per token, row 1 -> +1
        ("grpo", 0.0),  # mean of per-sequence means: (-2/2 + 1/1) / 2
        ("bnpo", -1.0 / 3),  # (-1 - 1 + 1) / 3 tokens
        ("dr_grpo", -1.0 / 8),  # (-1 - 1 + 1) / (2 rollouts * max_completion_length 4)
        ("dapo", -1.0 / 3),  # local token count, as bnpo
    ],
)
def test_aggregations_hand_checked(loss_type, expected):
    loss, stats = policy_loss(_on_policy_logps(), ADV, MASK, loss_type=loss_type, max_completion_length=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.clip_ratio.item() == 0.0 and stats.kl is None


def test_dapo_uses_the_global_token_count_when_given():
    loss, _ = policy_loss(_on_policy_logps(), ADV, MASK, loss_type="dapo", num_items_in_batch=torch.tensor(6.0))
    assert loss.item() == pytest.approx(-1.0 / 6)


def test_grpo_gradient_weights_tokens_by_their_sequence_length():
    logps = _on_policy_logps()
    loss, _ = policy_loss(logps, ADV, MASK, loss_type="grpo")
    loss.backward()
    # d(-ratio*A)/dlogp = -A at ratio 1; grpo weights each token 1 / (len_i * N)
    expected = torch.tensor([[-1 / 4, -1 / 4, 0.0], [1 / 2, 0.0, 0.0]])
    torch.testing.assert_close(logps.grad, expected)


def test_clipping_stops_the_gradient_only_on_the_clipped_side():
    old = torch.log(torch.full((2, 1), 0.4))
    logps = torch.log(torch.full((2, 1), 0.6)).requires_grad_(True)  # ratio 1.5 > 1 + 0.2
    mask = torch.ones(2, 1)
    loss, stats = policy_loss(logps, ADV, mask, old_logps=old, epsilon=0.2, loss_type="bnpo")
    loss.backward()
    # A = +1: min(1.5, 1.2) = 1.2 -> clipped, no gradient; A = -1: min(-1.5, -1.2) = -1.5 -> gradient 1.5 / 2
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0], [0.75]]))
    assert stats.clip_ratio_high.item() == pytest.approx(0.5)
    assert stats.clip_ratio_low.item() == 0.0
    assert stats.clip_ratio.item() == pytest.approx(0.5)


def test_clip_higher_widens_only_the_upper_range():
    old = torch.log(torch.full((1, 1), 0.4))
    logps = torch.log(torch.full((1, 1), 0.6)).requires_grad_(True)  # ratio 1.5
    loss, stats = policy_loss(logps, torch.tensor([1.0]), torch.ones(1, 1), old_logps=old, epsilon=0.2, epsilon_high=0.6)
    assert loss.item() == pytest.approx(-1.5)  # 1.5 < 1 + 0.6: not clipped
    assert stats.clip_ratio.item() == 0.0


def test_kl_k3_hand_checked_and_added_with_beta():
    logps = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    # d = log(0.25 / 0.5) = -log 2: exp(d) - d - 1 = 0.5 + log 2 - 1
    expected_kl = 0.5 + math.log(2) - 1
    assert kl_k3(logps, ref).item() == pytest.approx(expected_kl)
    loss, stats = policy_loss(logps, torch.tensor([0.0]), torch.ones(1, 1), ref_logps=ref, beta=0.1, loss_type="bnpo")
    assert loss.item() == pytest.approx(0.1 * expected_kl)
    assert stats.kl.item() == pytest.approx(expected_kl)
    assert kl_k3(logps, logps).item() == 0.0


def test_masked_tokens_never_contribute():
    logps = _on_policy_logps()
    garbage = logps.detach().clone()
    garbage[0, 2] = 50.0  # a padded slot with an absurd old log-prob
    loss, _ = policy_loss(logps, ADV, MASK, old_logps=garbage, loss_type="bnpo")
    loss.backward()
    assert logps.grad[0, 2] == 0.0 and torch.isfinite(loss)


def test_invalid_calls_are_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(_on_policy_logps(), ADV, MASK, loss_type="ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(_on_policy_logps(), ADV, MASK, beta=0.1)


def test_masked_mean_of_empty_mask_is_zero():
    assert masked_mean(torch.ones(2, 2), torch.zeros(2, 2)).item() == 0.0
