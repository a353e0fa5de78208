"""The RL engines: one LightningModule per algorithm, plus the pure advantage and loss math."""

from retrain.trainer.advantages import Advantages, group_advantages, kl_penalized_rewards, rloo_advantages
from retrain.trainer.base import BaseTrainer
from retrain.trainer.experience import Experience, completion_logps, pack_trajectories
from retrain.trainer.grpo import GRPOTrainer
from retrain.trainer.module import ConfigError, LossInputs, RLTrainer
from retrain.trainer.rloo import RLOOTrainer
from retrain.trainer.losses import LOSS_TYPES, LossStats, high_entropy_mask, kl_k3, masked_mean, policy_loss, rloo_loss
from retrain.rollout.engine import RolloutEngine
from retrain.rollout.sampler import BatchingSampler

__all__ = [
    "LOSS_TYPES",
    "Advantages",
    "BaseTrainer",
    "BatchingSampler",
    "ConfigError",
    "Experience",
    "GRPOTrainer",
    "LossInputs",
    "RLOOTrainer",
    "RLTrainer",
    "LossStats",
    "RolloutEngine",
    "completion_logps",
    "group_advantages",
    "high_entropy_mask",
    "kl_penalized_rewards",
    "rloo_advantages",
    "rloo_loss",
    "kl_k3",
    "masked_mean",
    "pack_trajectories",
    "policy_loss",
]
