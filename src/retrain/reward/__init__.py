"""Scoring rollouts: reward functions, verifiers, and the calculator that combines them."""

from retrain.reward import builtins
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
