"""The RL engines: one LightningModule per algorithm, plus the pure advantage and loss math."""

from retrain.trainer.advantages import Advantages, group_advantages
from retrain.trainer.base import BaseTrainer
from retrain.trainer.experience import Experience, completion_logps, pack_trajectories
from retrain.trainer.grpo import ConfigError, GRPOTrainer
from retrain.trainer.losses import AGGREGATIONS, LossStats, kl_k3, masked_mean, policy_loss
from retrain.trainer.rollout import RolloutEngine
from retrain.trainer.sampler import BatchingSampler

__all__ = [
    "AGGREGATIONS",
    "Advantages",
    "BaseTrainer",
    "BatchingSampler",
    "ConfigError",
    "Experience",
    "GRPOTrainer",
    "LossStats",
    "RolloutEngine",
    "completion_logps",
    "group_advantages",
    "kl_k3",
    "masked_mean",
    "pack_trajectories",
    "policy_loss",
]
