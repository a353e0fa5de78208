"""What a run reports about itself: the logged step, per-episode metrics, the one-line policy summary.

Pure functions over trajectories and scores (and one over the module, for the summary), kept out of
the LightningModule so `RLTrainer` stays the algorithm's loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from retrain.core.episode import Trajectory
from retrain.reward.calculator import RewardResult

if TYPE_CHECKING:
    from retrain.trainer.module import RLTrainer


def policy_summary(module: "RLTrainer") -> str:
    """One line on what trains: the algorithm, the policy's class, size, dtype and where it runs
    (instead of Lightning's module table, which lists internal modules and FLOPs it cannot count)."""
    params = list(module.policy.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    reference = ", a frozen reference copy" if module.ref_policy is not None else ""
    where = f"{module.device.type} x {module.trainer.world_size}" if module._trainer is not None else module.device.type
    return (
        f"retrain: {type(module).__name__} training {type(module.policy).__name__} ({get_human_readable_count(total)} "
        f"parameters, {get_human_readable_count(trainable)} trainable, {str(params[0].dtype).removeprefix('torch.') if params else '?'}{reference}) on {where}"
    )


def logged_step(global_step: int) -> torch.Tensor:
    """The x-axis of every logged row: the optimizer updates done (a "step" metric is Lightning's way to
    set it). Lightning's default, its count of batches, counts generations rather than updates (off by
    `num_iterations x steps_per_generation`), and after a resume from a checkpoint taken mid-batch (on an
    exception or Ctrl-C) it is one ahead of the uninterrupted run's; the update count is in every
    checkpoint, so row K is the state of checkpoint `step=K` in any run."""
    return torch.tensor(float(global_step))


def episode_metrics(trajectories: Sequence[Trajectory], scored: RewardResult) -> dict[str, torch.Tensor]:
    """Turns, step rewards, the policy-token share of the completions, environment and reward-fault counters."""
    turns = scored.step_total or [t.step_rewards for t in trajectories]
    steps = [r for episode in turns for r in episode]
    tokens = sum(len(t.completion_ids) for t in trajectories)
    metrics = {
        "train/turns": torch.tensor(sum(map(len, turns)) / max(1, len(turns))),
        "train/step_reward": torch.tensor(sum(steps) / max(1, len(steps))),
        "train/policy_token_fraction": torch.tensor(sum(t.num_policy_tokens for t in trajectories) / max(1, tokens)),
    }
    for label, count in scored.errors.items():
        metrics[f"train/reward_errors/{label}"] = torch.tensor(float(count))
    for label, values in scored.step_components.items():
        flat = [v for episode in values for v in episode]
        metrics[f"train/step_rewards/{label}"] = torch.tensor(sum(flat) / max(1, len(flat)))
    names = sorted({name for t in trajectories for name in t.metrics})
    for name in names:
        metrics[f"train/env/{name}"] = torch.tensor(sum(t.metrics.get(name, 0.0) for t in trajectories) / len(trajectories))
    return metrics
