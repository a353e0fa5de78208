"""Step rewards reach the loss: per-turn returns and per-token advantages, checked by hand."""

import math

import pytest
import torch

from retrain.core.records import PromptRecord
from retrain.environment.base import EnvironmentObservation, LLMAction, Trajectory, Turn
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardResult, RewardSpec
from retrain.trainer.advantages import STD_EPS, discounted_turn_returns, group_advantages, turn_advantages
from retrain.trainer.experience import Experience
from retrain.trainer.grpo import GRPOTrainer

# One prompt, G = 2 rollouts, gamma = 0.5.
# Rollout A: 3 turns with step rewards [1, 0, 2] and rollout reward R = 1:
#   G_2 = 2 + R = 3;  G_1 = 0 + 0.5 * 3 = 1.5;  G_0 = 1 + 0.5 * 1.5 = 1.75
# Rollout B: 1 turn, step reward [0], R = 0:  G_0 = 0
STEPS = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
TURNS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
FINAL = torch.tensor([1.0, 0.0])
RETURNS = torch.tensor([[1.75, 1.5, 3.0], [0.0, 0.0, 0.0]])


def test_discounted_returns_hand_checked():
    torch.testing.assert_close(discounted_turn_returns(STEPS, TURNS, FINAL, gamma=0.5), RETURNS)


def test_turn_advantages_centre_on_the_group_episode_return():
    # episode returns [1.75, 0] -> mean 0.875
    expected = torch.tensor([[0.875, 0.625, 2.125], [-0.875, 0.0, 0.0]])
    torch.testing.assert_close(turn_advantages(RETURNS, TURNS, 2, "none"), expected)
    # group scaling divides by the unbiased std of [1.75, 0] = 0.875 * sqrt(2)
    scaled = turn_advantages(RETURNS, TURNS, 2, "group")
    torch.testing.assert_close(scaled, expected / (0.875 * math.sqrt(2) + STD_EPS) * TURNS)


def test_without_step_rewards_and_discount_it_is_plain_grpo():
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.4])
    turns = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    returns = discounted_turn_returns(torch.zeros(4, 2), turns, rewards, gamma=1.0)
    per_turn = turn_advantages(returns, turns, 2, "group")
    plain = group_advantages(rewards, 2, "group").advantages
    torch.testing.assert_close(per_turn, plain.unsqueeze(1) * turns)


def _scripted_trajectory(turn_tokens, observation_tokens, step_rewards):
    """turn_tokens[t] policy tokens of turn t, observation_tokens[t] environment tokens after it."""
    t = Trajectory(record=PromptRecord(prompt="p"), prompt_ids=[1])
    for index, (n_policy, n_env, r) in enumerate(zip(turn_tokens, observation_tokens, step_rewards)):
        t.completion_ids += [5] * n_policy + [6] * n_env
        t.completion_mask += [1] * n_policy + [0] * n_env
        t.completion_turns += [index] * (n_policy + n_env)
        t.turns.append(Turn(LLMAction(text="x" * n_policy), EnvironmentObservation(reward=r)))
    return t


def test_grpo_gives_each_turns_tokens_that_turns_advantage():
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path="unused"),
        reward=RewardCalculator([RewardSpec(name="length_penalty")]),
        num_generations=2, scale_rewards="none", step_credit="discounted_return", gamma=0.5,
    )
    a = _scripted_trajectory([2, 1, 3], [2, 1, 0], [1.0, 0.0, 2.0])  # 3-turn episode, 9 tokens
    b = _scripted_trajectory([2], [0], [0.0])
    width = len(a.completion_ids)
    experience = Experience(
        input_ids=torch.zeros(2, 1 + width, dtype=torch.long), attention_mask=torch.ones(2, 1 + width, dtype=torch.long),
        completion_mask=torch.zeros(2, width), rewards=FINAL, advantages=torch.zeros(2), group_std=torch.zeros(2),
        trajectories=[a, b],
        reward_result=RewardResult(total=[1.0, 0.0], components={}, verifier_passed={}, step_total=[[1.0, 0.0, 2.0], [0.0]]),
    )
    advantages, group_std = algo.compute_advantages(FINAL, experience)
    # turn advantages: A -> [0.875, 0.625, 2.125], B -> [-0.875]; tokens: 2+2 of turn 0, 1+1 of turn 1, 3 of turn 2
    expected_a = [0.875] * 4 + [0.625] * 2 + [2.125] * 3
    torch.testing.assert_close(advantages[0], torch.tensor(expected_a))
    assert advantages[1, :2].tolist() == [-0.875, -0.875]
    assert group_std.tolist() == pytest.approx([0.875 * math.sqrt(2)] * 2)


def test_bad_credit_options_fail_at_construction():
    with pytest.raises(ValueError, match="gamma=1.5"):
        GRPOTrainer(policy=PolicyConfig(name_or_path="unused"), reward=RewardCalculator([RewardSpec(name="length_penalty")]), gamma=1.5)
