"""`RLOOTrainer`: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics").

Each rollout's baseline is the mean reward of the other rollouts of its prompt; the loss is TRL's
sequence-level clipped ratio (`losses.rloo_loss`). As in TRL's `RLOOTrainer`, the KL to the
reference (`beta`, default 0.05) is not a loss term but a penalty on the reward: the sum over the
rollout's tokens of `old_logp - ref_logp`. Unlike TRL 1.16, RLOO here runs every environment GRPO
runs, multi-turn and tools included, since rollouts come from the shared `RLTrainer`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator
from retrain.trainer.advantages import kl_penalized_rewards, rloo_advantages
from retrain.trainer.experience import Experience
from retrain.trainer.losses import LossStats, masked_mean, rloo_loss
from retrain.trainer.module import RLTrainer

__all__ = ["RLOOTrainer"]


class RLOOTrainer(RLTrainer):
    """RLOO: leave-one-out baselines, sequence-level clipped updates, KL in the reward.

    Args:
        policy: the model to train and how to load it.
        reward: the reward functions and verifiers that score each rollout.
        beta: KL penalty coefficient, applied to the reward (TRL's RLOO default 0.05).
        normalize_advantages: standardise the advantages over the generation batch.
        **kwargs: the options shared by every algorithm (`RLTrainer`).
    """

    def __init__(
        self,
        policy: PolicyConfig,
        reward: RewardCalculator,
        beta: float = 0.05,
        normalize_advantages: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, reward, beta=beta, **kwargs)
        self._batch_kl: Optional[torch.Tensor] = None

    def option_problems(self) -> list[str]:
        h, problems = self.hparams, super().option_problems()
        if h.get("epsilon_high") is not None and h.epsilon_high < h.epsilon:
            problems.append(f"epsilon_high={h.epsilon_high} < epsilon={h.epsilon}: the upper clip range must be >= epsilon.")
        return problems

    @property
    def needs_generation_logps(self) -> bool:
        # The KL penalty uses the policy's log-probs at generation time.
        return super().needs_generation_logps or self.hparams.beta > 0

    def compute_advantages(self, rewards: torch.Tensor, experience: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hparams
        if h.beta > 0:  # each row's -beta * KL, summed over an episode's rows
            penalties = kl_penalized_rewards(torch.zeros_like(experience.rewards), experience.old_logps, experience.ref_logps, experience.completion_mask, h.beta)
            rewards = rewards + experience.episode_sum(penalties)
            per_token = experience.old_logps - experience.ref_logps
            self._batch_kl = masked_mean(per_token, experience.completion_mask)
        result = rloo_advantages(rewards, h.num_generations, h.normalize_advantages)  # [E]
        return experience.per_row(result.advantages), experience.per_row(result.group_std)

    def policy_objective(
        self, logps: torch.Tensor, entropy: torch.Tensor, experience: Experience, num_items_in_batch: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, LossStats]:
        h = self.hparams
        loss, stats = rloo_loss(
            logps, experience.advantages, experience.completion_mask,
            old_logps=experience.old_logps, epsilon=h.epsilon, epsilon_high=h.epsilon_high,
        )
        return loss, stats._replace(kl=self._batch_kl)
