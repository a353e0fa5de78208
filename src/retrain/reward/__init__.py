"""Scoring rollouts: reward functions, verifiers, and the calculator that combines them."""

from retrain.reward import builtins, format_rewards, math_rewards, tool_rewards
from retrain.reward import reasoning_gym  # noqa: F401  (registers reasoning_gym_score; the package loads lazily)
from retrain.reward.calculator import RewardCalculator, RewardError, RewardResult, RewardSpec, VerifierSpec
from retrain.reward.registry import REWARDS, VERIFIERS, Registry, reward, verifier

__all__ = [
    "REWARDS",
    "VERIFIERS",
    "Registry",
    "RewardCalculator",
    "RewardError",
    "RewardResult",
    "RewardSpec",
    "VerifierSpec",
    "builtins",
    "reward",
    "verifier",
]
