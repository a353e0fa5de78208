"""Optional pieces of the RL update, each a Lightning callback the config switches on.

- `EntropyBonus`: subtract `coef * mean token entropy` from the loss (exploration).
- `RefModelSync`: every N updates, pull the reference policy toward the current one,
  `ref = alpha * policy + (1 - alpha) * ref` (TR-DPO, Gorbatovski et al. 2024; TRL's
  `sync_ref_model`, `ref_model_mixup_alpha`, `ref_model_sync_steps`).
- `DynamicSampling`: DAPO's dynamic sampling (Yu et al. 2025). A group whose rollouts all got the
  same reward has zero advantages and teaches nothing; drop it and roll out fresh prompts in its
  place (a bounded number of rounds), so every update trains on groups with signal. TRL only logs
  `frac_reward_zero_std`.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterator, Optional, Sequence

import lightning.pytorch as pl
import torch

from retrain.core.records import PromptRecord
from retrain.core.episode import Trajectory
from retrain.reward.calculator import RewardResult
from retrain.trainer.losses import masked_mean
from retrain.trainer.module import LossInputs, RLTrainer


def _rl_module(callback: pl.Callback, pl_module: pl.LightningModule) -> RLTrainer:
    if not isinstance(pl_module, RLTrainer):
        raise TypeError(f"{type(callback).__name__} works with retrain's RL trainers, not {type(pl_module).__name__}.")
    return pl_module


class EntropyBonus(pl.Callback):
    """Add `-coef * H` to the loss, `H` the mean entropy of the policy's tokens.

    Args:
        coef: the bonus weight (TRL's `entropy_coef`).
    """

    def __init__(self, coef: float = 0.01) -> None:
        if coef < 0:
            raise ValueError(f"EntropyBonus.coef must be >= 0, got {coef}.")
        self.coef = coef
        self._module: Optional[RLTrainer] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        module = _rl_module(self, pl_module)
        if self._module is module:
            return
        module.extra_loss_terms.append(self.term)
        module.entropy_grad = True
        self._module = module

    def term(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        entropy = masked_mean(inputs.entropy, inputs.mask)
        return -self.coef * entropy, {"entropy_bonus": (self.coef * entropy).detach()}


class RefModelSync(pl.Callback):
    """Every `every_n_steps` optimizer updates, `ref = alpha * policy + (1 - alpha) * ref`.

    Args:
        alpha: the mix-up weight of the current policy (TRL's `ref_model_mixup_alpha`).
        every_n_steps: updates between syncs (TRL's `ref_model_sync_steps`).
    """

    def __init__(self, alpha: float = 0.6, every_n_steps: int = 512) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"RefModelSync.alpha must be in (0, 1], got {alpha}.")
        if every_n_steps < 1:
            raise ValueError(f"RefModelSync.every_n_steps must be >= 1, got {every_n_steps}.")
        self.alpha = alpha
        self.every_n_steps = every_n_steps
        self.syncs = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = _rl_module(self, pl_module)
        if module.ref_policy is None:
            why = "the reference is the LoRA base model, which stays fixed" if module.has_reference else "beta = 0"
            raise ValueError(f"RefModelSync needs a separate reference policy, and there is none because {why}: set model beta > 0 (without policy.lora).")

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        due = trainer.global_step // self.every_n_steps
        if due <= self.syncs:
            return
        module = _rl_module(self, pl_module)
        for ref, current in zip(module.ref_policy.parameters(), module.policy.parameters()):
            ref.mul_(1 - self.alpha).add_(current.detach(), alpha=self.alpha)
        self.syncs = due

    def state_dict(self) -> dict[str, Any]:
        return {"syncs": self.syncs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.syncs = int(state_dict["syncs"])


class DynamicSampling(pl.Callback):
    """Replace zero-reward-variance groups with groups of fresh prompts.

    Replacement prompts come from the data module's records in their own seeded order (the main
    stream's position is untouched). After `max_rounds` rounds, any remaining places are filled
    with dropped groups, so the batch size never changes. Logged per generation:
    `train/dynamic_sampling/dropped_groups`, `.../rounds`, `.../unfilled_groups`.

    Args:
        max_rounds: the most extra rollout rounds per generation.
        seed: the seed of the replacement prompts' order.
    """

    def __init__(self, max_rounds: int = 3, seed: int = 1234) -> None:
        if max_rounds < 0:
            raise ValueError(f"DynamicSampling.max_rounds must be >= 0, got {max_rounds}.")
        self.max_rounds = max_rounds
        self.seed = seed
        self._refill: Optional[Iterator[PromptRecord]] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _rl_module(self, pl_module).group_filter = self

    def _next_records(self, trainer: Optional[pl.Trainer], count: int, fallback: Sequence[PromptRecord]) -> list[PromptRecord]:
        if self._refill is None:
            from retrain.data.datamodule import PromptStream

            records = list(getattr(getattr(trainer, "datamodule", None), "records", None) or fallback)
            self._refill = iter(PromptStream(records, shuffle=True, seed=self.seed))
        return [next(self._refill) for _ in range(count)]

    def __call__(
        self, module: RLTrainer, records: Sequence[PromptRecord], trajectories: list[Trajectory], scored: RewardResult
    ) -> tuple[list[Trajectory], RewardResult]:
        g = module.hparams.num_generations
        wanted = len(trajectories) // g
        kept, dropped = _split_groups(trajectories, scored, g)
        rounds = 0
        while len(kept) < wanted and rounds < self.max_rounds:
            rounds += 1
            fresh = self._next_records(module._trainer, wanted - len(kept), records)
            more_kept, more_dropped = _split_groups(*module.rollout(fresh), g)
            kept += more_kept
            dropped += more_dropped
        unfilled = max(0, wanted - len(kept))
        groups = (kept + dropped[:unfilled])[:wanted]
        if module._trainer is not None:
            module.log_dict(
                {
                    "train/dynamic_sampling/dropped_groups": float(len(dropped)),
                    "train/dynamic_sampling/rounds": float(rounds),
                    "train/dynamic_sampling/unfilled_groups": float(unfilled),
                },
                on_step=True, batch_size=1,
            )
        return [t for group, _ in groups for t in group], RewardResult.concat([result for _, result in groups])


Group = tuple[list[Trajectory], RewardResult]


def _split_groups(trajectories: list[Trajectory], scored: RewardResult, g: int) -> tuple[list[Group], list[Group]]:
    """Groups with reward variance, and groups without."""
    kept: list[Group] = []
    dropped: list[Group] = []
    for start in range(0, len(trajectories), g):
        group = (trajectories[start : start + g], scored.select(range(start, start + g)))
        (kept if statistics.pstdev(scored.total[start : start + g]) > 0 else dropped).append(group)
    return kept, dropped
