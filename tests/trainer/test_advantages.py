import math

import pytest
import torch

from retrain.trainer.advantages import STD_EPS, group_advantages


def test_group_scaling_hand_checked():
    # groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5)
    result = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2, scale_rewards="group")
    a = 0.5 / (math.sqrt(0.5) + STD_EPS)
    torch.testing.assert_close(result.advantages, torch.tensor([a, -a, -a, a]))
    torch.testing.assert_close(result.group_mean, torch.full((4,), 0.5))
    torch.testing.assert_close(result.group_std, torch.full((4,), math.sqrt(0.5)))


def test_batch_scaling_uses_the_whole_batch_std():
    # groups [3, 1] (mean 2) and [0, 0] (mean 0); batch [3, 1, 0, 0]: mean 1, unbiased var (4+0+1+1)/3 = 2
    result = group_advantages(torch.tensor([3.0, 1.0, 0.0, 0.0]), group_size=2, scale_rewards="batch")
    s = math.sqrt(2.0) + STD_EPS
    torch.testing.assert_close(result.advantages, torch.tensor([1 / s, -1 / s, 0.0, 0.0]))


def test_no_scaling_only_centres():
    result = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 2.0]), group_size=3, scale_rewards="none")
    # groups [3, 1, 2] (mean 2) and [2, 5, 2] (mean 3)
    torch.testing.assert_close(result.advantages, torch.tensor([1.0, -1.0, 0.0, -1.0, 2.0, -1.0]))


def test_zero_variance_group_gives_zero_advantage_not_nan():
    result = group_advantages(torch.tensor([1.0, 1.0, 0.2, 0.2]), group_size=2)
    assert torch.equal(result.advantages, torch.zeros(4))
    assert torch.equal(result.group_std, torch.zeros(4))


def test_advantages_sum_to_zero_within_each_group():
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(0))
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, group_size=6, scale_rewards=scale).advantages
        torch.testing.assert_close(adv.view(4, 6).sum(1), torch.zeros(4), atol=1e-5, rtol=0)


def test_bad_shapes_and_options_are_rejected():
    with pytest.raises(ValueError, match="divisible by group_size=4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), group_size=2, scale_rewards="median")  # type: ignore[arg-type]
