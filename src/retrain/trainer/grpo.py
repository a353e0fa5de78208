"""`GRPOTrainer`: Group Relative Policy Optimization (Shao et al. 2024) and its variants.

Advantages are group-normalised rewards (`group_advantages`); the loss is the clipped surrogate of
`losses.policy_loss` with TRL's `loss_type`, `importance_sampling_level` (GSPO) and
`top_entropy_quantile` options. Options carry TRL `GRPOConfig` names and meanings, with one
deliberate difference: `data.batch_size` counts prompts per generation, not completions; each
prompt yields `num_generations` rollouts.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch

from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator
from retrain.trainer.advantages import ScaleRewards, discounted_turn_returns, group_advantages, turn_advantages
from retrain.trainer.experience import Experience, pack_step_rewards, pack_turns
from retrain.trainer.losses import LOSS_TYPES, ImportanceSamplingLevel, LossStats, LossType, high_entropy_mask, policy_loss
from retrain.trainer.module import ConfigError, RLTrainer
from retrain.trainer.off_policy import SamplerCorrection, off_policy_sequence_mask, sampler_correction_weights

__all__ = ["ConfigError", "GRPOTrainer"]


class GRPOTrainer(RLTrainer):
    """GRPO: sample a group of completions per prompt, reward them, push up the better ones.

    Args:
        policy: the model to train and how to load it.
        reward: the reward functions and verifiers that score each rollout.
        loss_type: per-token objective and aggregation: grpo, bnpo, dr_grpo, dapo, cispo or sapo
            (TRL's meanings; see src/retrain/trainer/README.md).
        scale_rewards: divide centred rewards by the group std, the batch std, or nothing.
        importance_sampling_level: per-token ratios, or one ratio per sequence (GSPO).
        top_entropy_quantile: train only on this top share of tokens by entropy (1.0 = all).
        sapo_temperature_pos: SAPO gate temperature for positive advantages.
        sapo_temperature_neg: SAPO gate temperature for negative advantages.
        use_bias_correction_kl: weight the per-token KL by the importance ratio (TRL's default),
            which corrects the KL estimate for rollouts reused off-policy.
        step_credit: how multi-turn step rewards reach the loss. `rollout_only`: plain GRPO, every
            token gets its rollout's advantage from the rollout-level reward. `discounted_return`:
            each turn's tokens get the advantage of that turn's return (its own and later step
            rewards, discounted by `gamma`, plus the rollout reward at the end), centred and scaled
            by the group's episode returns (see src/retrain/trainer/README.md).
        gamma: per-turn discount of `discounted_return`.
        sampler_correction: reweight the loss by the importance ratio between the trainer and the
            sampler (retrain's decoder, generate, an inference engine) on the sampled tokens: per
            token or per sequence, truncated to or masked outside `[clip_min, clip_max]` (TRL's
            `vllm_importance_sampling_correction` + `vllm_importance_sampling_mode`, for any
            backend). None (default) applies none; the mismatch is logged either way
            (`train/sampler/...`). Turning it on computes the trainer's log-probs at sampling time
            (one extra forward pass per generation when rollouts are not reused anyway).
        sampler_correction_clip_min: the lower bound (TRL's `vllm_importance_sampling_clip_min`).
        sampler_correction_clip_max: the upper bound (TRL's `vllm_importance_sampling_clip_max`).
        off_policy_mask_threshold: drop sequences with a negative advantage whose mean per-token KL
            from the sampler exceeds this (DeepSeek-V3.2; TRL's option of the same name). None: off.
        **kwargs: the options shared by every algorithm (`RLTrainer`): num_generations,
            max_completion_length, temperature, beta, epsilon, num_iterations, learning_rate, ...
    """

    def __init__(
        self,
        policy: PolicyConfig,
        reward: RewardCalculator,
        loss_type: LossType = "dapo",
        scale_rewards: ScaleRewards = "group",
        importance_sampling_level: ImportanceSamplingLevel = "token",
        top_entropy_quantile: float = 1.0,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        use_bias_correction_kl: bool = True,
        step_credit: Literal["rollout_only", "discounted_return"] = "rollout_only",
        gamma: float = 1.0,
        sampler_correction: Optional[SamplerCorrection] = None,
        sampler_correction_clip_min: Optional[float] = None,
        sampler_correction_clip_max: Optional[float] = 3.0,
        off_policy_mask_threshold: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, reward, **kwargs)

    def option_problems(self) -> list[str]:
        h, problems = self.hparams, super().option_problems()
        if h.loss_type not in LOSS_TYPES:
            problems.append(f"loss_type={h.loss_type!r}: use one of {', '.join(sorted(LOSS_TYPES))}.")
        if h.scale_rewards not in ("group", "batch", "none"):
            problems.append(f"scale_rewards={h.scale_rewards!r}: use group, batch or none.")
        if h.importance_sampling_level not in ("token", "sequence"):
            problems.append(f"importance_sampling_level={h.importance_sampling_level!r}: use token or sequence.")
        if not 0 < h.top_entropy_quantile <= 1:
            problems.append(f"top_entropy_quantile={h.top_entropy_quantile}: must be in (0, 1]; 1.0 trains on every token.")
        if h.loss_type == "cispo":
            if h.get("epsilon_high") is None:
                problems.append("loss_type='cispo' caps the ratio at epsilon_high, which is unset: set epsilon_high (e.g. 5.0).")
        elif h.get("epsilon_high") is not None and h.epsilon_high < h.epsilon:
            problems.append(f"epsilon_high={h.epsilon_high} < epsilon={h.epsilon}: the upper clip range must be >= epsilon.")
        if h.step_credit not in ("rollout_only", "discounted_return"):
            problems.append(f"step_credit={h.step_credit!r}: use rollout_only or discounted_return.")
        if not 0 <= h.gamma <= 1:
            problems.append(f"gamma={h.gamma}: must be in [0, 1].")
        if h.sapo_temperature_pos <= 0 or h.sapo_temperature_neg <= 0:
            problems.append("sapo_temperature_pos and sapo_temperature_neg must be > 0.")
        modes = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
        if h.sampler_correction is not None and h.sampler_correction not in modes:
            problems.append(f"sampler_correction={h.sampler_correction!r}: use one of {', '.join(modes)}, or null for none.")
        low, high = h.sampler_correction_clip_min, h.sampler_correction_clip_max
        if low is not None and high is not None and low > high:
            problems.append(f"sampler_correction_clip_min={low} > sampler_correction_clip_max={high}: the range is empty.")
        if str(h.sampler_correction).endswith("truncate") and low is None and high is None:
            problems.append(f"sampler_correction={h.sampler_correction!r} truncates to [clip_min, clip_max], and both are null: set one.")
        if h.sampler_correction is not None and h.get("old_logps_from_sampler"):
            problems.append("sampler_correction with old_logps_from_sampler=true: the correction compares the trainer's log-probs "
                            "with the sampler's, so they cannot be the sampler's; turn one off.")
        if h.off_policy_mask_threshold is not None and h.off_policy_mask_threshold < 0:
            problems.append(f"off_policy_mask_threshold={h.off_policy_mask_threshold}: a KL threshold is >= 0 (null turns it off).")
        return problems

    @property
    def needs_generation_logps(self) -> bool:
        # The correction weighs the trainer's log-probs at sampling time against the sampler's.
        return super().needs_generation_logps or self.hparams.sampler_correction is not None

    def gather_experience(self, records: Any) -> Experience:
        experience = super().gather_experience(records)
        h = self.hparams
        if h.sampler_correction is not None:
            if experience.sampler_logps is None:
                raise ConfigError(
                    "sampler_correction needs the sampler's log-probs, and this run's rollouts carry none (an environment "
                    "whose parse_action changes the tokens, or a backend that does not report them); set sampler_correction: null."
                )
            experience.sampler_weights = sampler_correction_weights(
                experience.old_logps, experience.sampler_logps, experience.completion_mask,
                h.sampler_correction, h.sampler_correction_clip_min, h.sampler_correction_clip_max,
            )
        return experience

    def compute_advantages(self, rewards: torch.Tensor, experience: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hparams
        if h.step_credit == "rollout_only":
            result = group_advantages(rewards, h.num_generations, h.scale_rewards)  # [E]
            return experience.per_row(result.advantages), experience.per_row(result.group_std)
        steps, turn_mask = pack_step_rewards(experience.reward_result.step_total)
        steps, turn_mask = steps.to(rewards.device), turn_mask.to(rewards.device)
        returns = discounted_turn_returns(steps, turn_mask, rewards, h.gamma)  # [E, T]
        per_turn = turn_advantages(returns, turn_mask, h.num_generations, h.scale_rewards)  # [E, T]
        turns = pack_turns(experience.trajectories, experience.completion_width).to(rewards.device)  # [N, C]
        group_std = group_advantages(returns[:, 0], h.num_generations, "none").group_std
        per_turn = experience.per_row(per_turn)  # [N, T]: a row's turn indices are its episode's
        return per_turn.gather(1, turns.clamp(max=per_turn.size(1) - 1)), experience.per_row(group_std)

    def micro_batch_weight(self, micro: Experience, chunk: Experience) -> float:
        loss_type = self.hparams.loss_type
        if loss_type in ("dapo", "cispo"):  # already normalised by the step's token count
            return 1.0
        if loss_type == "bnpo":  # a token mean over the local batch
            return float(micro.completion_mask.sum() / chunk.completion_mask.sum().clamp(min=1.0))
        return len(micro) / len(chunk)  # grpo, sapo: sequence means; dr_grpo: divides by the row count

    def policy_objective(
        self, logps: torch.Tensor, entropy: torch.Tensor, experience: Experience, num_items_in_batch: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, LossStats]:
        h = self.hparams
        mask = experience.completion_mask
        entropy_mask = None
        if h.top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(entropy.detach(), mask, h.top_entropy_quantile)
        weights = experience.sampler_weights
        if h.off_policy_mask_threshold is not None:  # against what sampled the tokens, as TRL does
            sampled = next(x for x in (experience.sampler_logps, experience.old_logps, logps.detach()) if x is not None)
            keep = off_policy_sequence_mask(experience.advantages, logps, sampled, mask, h.off_policy_mask_threshold)
            weights = keep if weights is None else weights * keep
        return policy_loss(
            logps, experience.advantages, mask, token_weights=weights,
            old_logps=experience.old_logps, ref_logps=experience.ref_logps, beta=h.beta,
            epsilon=h.epsilon, epsilon_high=h.epsilon_high, loss_type=h.loss_type,
            importance_sampling_level=h.importance_sampling_level, entropy_mask=entropy_mask,
            sapo_temperature_pos=h.sapo_temperature_pos, sapo_temperature_neg=h.sapo_temperature_neg,
            use_bias_correction_kl=h.use_bias_correction_kl,
            max_completion_length=h.max_completion_length, num_items_in_batch=num_items_in_batch,
        )
