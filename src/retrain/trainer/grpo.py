"""`GRPOTrainer`: Group Relative Policy Optimization (Shao et al. 2024) as a LightningModule.

One training step reads like the algorithm:

    experience = gather_experience(prompts)   # G rollouts per prompt, rewards, group advantages
    loss, stats = compute_loss(experience)    # one forward pass, clipped surrogate (+ beta * KL)

Options carry TRL `GRPOConfig` names and meanings, with one deliberate difference: the data
module's `batch_size` counts prompts per step, not completions; each prompt yields
`num_generations` rollouts, so a step trains on `batch_size * num_generations` completions.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
from transformers import get_scheduler

from retrain.data.records import PromptRecord
from retrain.environment.base import Environment
from retrain.environment.single_turn import SingleTurnEnvironment
from retrain.models.loading import PolicyConfig, ensure_tiny_model, load_policy, load_tokenizer
from retrain.reward.calculator import RewardCalculator
from retrain.trainer.advantages import ScaleRewards, group_advantages
from retrain.trainer.base import BaseTrainer
from retrain.trainer.experience import Experience, completion_logps, pack_trajectories
from retrain.trainer.losses import LossType, masked_mean, policy_loss
from retrain.trainer.rollout import RolloutEngine
from retrain.trainer.sampler import BatchingSampler

SchedulerType = Literal["constant", "constant_with_warmup", "linear", "cosine"]


class ConfigError(ValueError):
    """One or more trainer options are invalid; the message lists each with its fix."""


class GRPOTrainer(pl.LightningModule, BaseTrainer):
    """GRPO: sample a group of completions per prompt, reward them, push up the better ones.

    Args:
        policy: the model to train and how to load it.
        reward: the reward functions and verifiers that score each rollout.
        environment: the world each rollout happens in (default: one prompt, one completion).
        num_generations: rollouts per prompt (the group size G); at least 2.
        max_completion_length: the most tokens after the prompt in one rollout.
        temperature: sampling temperature; log-probs are taken at the same temperature.
        top_p: nucleus sampling threshold (1.0 = off).
        top_k: top-k sampling (0 = off).
        beta: KL coefficient to a frozen copy of the initial policy (0 = no reference model).
        epsilon: clip range of the importance ratio.
        epsilon_high: upper clip range (DAPO's clip-higher); default `epsilon`.
        loss_type: how per-token losses are averaged: grpo, bnpo, dr_grpo or dapo (TRL's meanings).
        scale_rewards: divide centred rewards by the group std, the batch std, or nothing.
        mask_truncated_completions: give rollouts that hit the token budget no loss.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        lr_scheduler_type: learning-rate schedule over `trainer.max_steps` (transformers' schedulers).
        warmup_steps: linear warm-up steps of the schedule.
        num_completions_to_keep: sample completions kept from each step for logging tables.
    """

    def __init__(
        self,
        policy: PolicyConfig,
        reward: RewardCalculator,
        environment: Optional[Environment] = None,
        num_generations: int = 8,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        loss_type: LossType = "dapo",
        scale_rewards: ScaleRewards = "group",
        mask_truncated_completions: bool = False,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        lr_scheduler_type: SchedulerType = "constant",
        warmup_steps: int = 0,
        num_completions_to_keep: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["reward", "environment"])
        _validate(self.hparams)
        self.policy_config = policy
        self.calculator = reward
        self.environment = environment or SingleTurnEnvironment()
        self.rollouts = RolloutEngine(self.environment, reward)
        self.policy: Optional[torch.nn.Module] = None
        self.ref_policy: Optional[torch.nn.Module] = None
        self.tokenizer = None
        self.last_samples: list[dict[str, Any]] = []
        self._last_trajectories: list = []
        self._step_started = 0.0

    # ----------------------------------------------------------------------------- model
    def prepare_data(self) -> None:
        """Once per node, before any rank loads: build the tiny local model if it is configured and missing."""
        ensure_tiny_model(self.policy_config)

    def configure_model(self) -> None:
        """Load the policy (and the frozen reference when `beta > 0`); Lightning calls this once."""
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.policy_config)
        self.policy = load_policy(self.policy_config).train()  # from_pretrained returns eval mode
        if self.hparams.beta > 0:
            self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False).eval()

    def configure_optimizers(self) -> Any:
        self.configure_model()
        optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.adam_betas),
        )
        total_steps = self._total_steps()
        scheduler = get_scheduler(
            self.hparams.lr_scheduler_type,
            optimizer,
            num_warmup_steps=self.hparams.warmup_steps,
            num_training_steps=total_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        if self.hparams.lr_scheduler_type in ("linear", "cosine"):
            raise ConfigError(f"lr_scheduler_type={self.hparams.lr_scheduler_type!r} needs trainer.max_steps to be set.")
        return 1

    # ----------------------------------------------------------------------------- experience
    def make_sampler(self) -> BatchingSampler:
        h = self.hparams
        return BatchingSampler(
            self.policy, self.tokenizer, max_new_tokens=h.max_completion_length,
            temperature=h.temperature, top_p=h.top_p, top_k=h.top_k,
        )

    def compute_advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(advantages [N], group_std [N])` from grouped rewards `[N]`."""
        result = group_advantages(rewards, self.hparams.num_generations, self.hparams.scale_rewards)
        return result.advantages, result.group_std

    @torch.no_grad()
    def gather_experience(self, records: Sequence[PromptRecord]) -> Experience:
        self.configure_model()
        h = self.hparams
        trajectories, scored = self.rollouts.collect(records, h.num_generations, self.make_sampler(), h.max_completion_length)
        input_ids, attention_mask, completion_mask = pack_trajectories(
            trajectories, self.tokenizer.pad_token_id, mask_truncated=h.mask_truncated_completions
        )
        rewards = torch.tensor(scored.total, dtype=torch.float32)
        advantages, group_std = self.compute_advantages(rewards)
        experience = Experience(
            input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
            rewards=rewards, advantages=advantages, group_std=group_std,
            trajectories=trajectories, reward_result=scored,
        ).to(self._policy_device())
        if self.ref_policy is not None:
            experience.ref_logps, _ = completion_logps(
                self.ref_policy, experience.input_ids, experience.attention_mask,
                experience.completion_width, temperature=h.temperature,
            )
        return experience

    def _policy_device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # ----------------------------------------------------------------------------- loss
    def compute_loss(self, experience: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = self.hparams
        logps, entropy = completion_logps(
            self.policy, experience.input_ids, experience.attention_mask, experience.completion_width,
            temperature=h.temperature, with_entropy=True,
        )
        mask = experience.completion_mask
        loss, stats = policy_loss(
            logps, experience.advantages, mask,
            old_logps=experience.old_logps, ref_logps=experience.ref_logps, beta=h.beta,
            epsilon=h.epsilon, epsilon_high=h.epsilon_high, loss_type=h.loss_type,
            max_completion_length=h.max_completion_length,
        )
        metrics = {
            "entropy": masked_mean(entropy, mask),
            "clip_ratio": stats.clip_ratio,
            "clip_ratio/low": stats.clip_ratio_low,
            "clip_ratio/high": stats.clip_ratio_high,
        }
        if stats.kl is not None:
            metrics["kl"] = stats.kl
        return loss, metrics

    # ----------------------------------------------------------------------------- Lightning
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: list[PromptRecord], batch_idx: int) -> torch.Tensor:
        experience = self.gather_experience(batch)
        loss, loss_metrics = self.compute_loss(experience)
        self._log_step(experience, loss, loss_metrics)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After backward and the optimizer step, so the rate counts the whole update.
        elapsed = time.perf_counter() - self._step_started
        tokens = sum(t.num_policy_tokens for t in self._last_trajectories)
        self.log("train/tokens_per_second", tokens / max(elapsed, 1e-9), on_step=True, batch_size=1)
        self.log("train/step_seconds", elapsed, on_step=True, batch_size=1)

    def on_fit_end(self) -> None:
        self.rollouts.close()

    def _log_step(self, experience: Experience, loss: torch.Tensor, loss_metrics: dict[str, torch.Tensor]) -> None:
        scored = experience.reward_result
        rewards = experience.rewards
        lengths = torch.tensor([float(t.num_policy_tokens) for t in experience.trajectories])
        metrics: dict[str, Any] = {
            "train/loss": loss.detach(),
            "train/reward": rewards.mean(),
            "train/reward_std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
            "train/completion_length": lengths.mean(),
            "train/frac_truncated": torch.tensor([float(t.truncated) for t in experience.trajectories]).mean(),
            "train/frac_reward_zero_std": (experience.group_std.abs() < 1e-8).float().mean(),
            "train/learning_rate": torch.tensor(self._current_lr()),
        }
        metrics.update({f"train/{k}": v.detach() for k, v in loss_metrics.items()})
        metrics.update({f"train/rewards/{k}": torch.tensor(v).mean() for k, v in scored.components.items()})
        metrics.update(
            {f"train/verifiers/{k}": torch.tensor(v, dtype=torch.float32).mean() for k, v in scored.verifier_passed.items()}
        )
        batch_size = len(experience.trajectories)
        self.log_dict(metrics, on_step=True, prog_bar=False, batch_size=batch_size)
        self.log("reward", rewards.mean(), prog_bar=True, on_step=True, logger=False, batch_size=batch_size)
        self._last_trajectories = experience.trajectories
        self.last_samples = [
            {"prompt": t.record.prompt, "completion": t.completion_text, "reward": r}
            for t, r in zip(experience.trajectories[: self.hparams.num_completions_to_keep], scored.total)
        ]

    def _current_lr(self) -> float:
        if self._trainer is None or not self.trainer.optimizers:
            return self.hparams.learning_rate
        return self.trainer.optimizers[0].param_groups[0]["lr"]


def _validate(h: Any) -> None:
    """Check option values together and report every problem at once."""
    problems = []
    if h.num_generations < 2:
        problems.append(f"num_generations={h.num_generations}: a group needs at least 2 rollouts to compare; use 2 or more.")
    if h.max_completion_length < 1:
        problems.append(f"max_completion_length={h.max_completion_length}: must be at least 1.")
    if not h.temperature > 0:
        problems.append(f"temperature={h.temperature}: must be > 0 (sampling is required for RL).")
    if not 0 < h.top_p <= 1:
        problems.append(f"top_p={h.top_p}: must be in (0, 1].")
    if h.top_k < 0:
        problems.append(f"top_k={h.top_k}: must be >= 0 (0 turns it off).")
    if h.beta < 0:
        problems.append(f"beta={h.beta}: must be >= 0.")
    if not h.epsilon > 0:
        problems.append(f"epsilon={h.epsilon}: must be > 0.")
    if h.epsilon_high is not None and h.epsilon_high < h.epsilon:
        problems.append(f"epsilon_high={h.epsilon_high} < epsilon={h.epsilon}: the upper clip range must be >= epsilon.")
    if h.learning_rate <= 0:
        problems.append(f"learning_rate={h.learning_rate}: must be > 0.")
    if h.warmup_steps < 0:
        problems.append(f"warmup_steps={h.warmup_steps}: must be >= 0.")
    if problems:
        raise ConfigError("Invalid GRPOTrainer options (model.init_args):\n  - " + "\n  - ".join(problems))
