"""Advantages from per-rollout rewards: pure functions, tensors in, tensors out.

Rollouts arrive grouped: the `G = group_size` rollouts of one prompt are consecutive, so a batch of
`N = B * G` rewards reshapes to `[B, G]`.

GRPO (Shao et al. 2024, "DeepSeekMath") centres each reward on its group's mean and, by default,
divides by the group's standard deviation. Following TRL, `scale_rewards` chooses the divisor: the
group std (`group`), the whole batch's std (`batch`, as in "PPO Lite", Liu et al. 2025), or none
(`none`, as Dr. GRPO recommends, Liu et al. 2025). The std is the unbiased one, computed with TRL's
`nanstd`, and `1e-4` keeps a zero-variance group's advantages at zero rather than NaN.

RLOO (Ahmadian et al. 2024, "Back to Basics") baselines each rollout with the mean reward of the
*other* rollouts of its group; TRL's `normalize_advantages` then standardises the advantages over
the batch. A KL penalty, when used, enters RLOO through the reward (`kl_penalized_rewards`).
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch
from trl.trainer.utils import nanstd

ScaleRewards = Literal["group", "batch", "none"]
STD_EPS = 1e-4


class Advantages(NamedTuple):
    advantages: torch.Tensor  # [N]
    group_mean: torch.Tensor  # [N] the mean reward of each rollout's group
    group_std: torch.Tensor  # [N] the (unbiased) reward std of each rollout's group


def _group_std(grouped: torch.Tensor) -> torch.Tensor:
    return nanstd(grouped, dim=1)  # [B]


def _batch_std(grouped: torch.Tensor) -> torch.Tensor:
    return nanstd(grouped.flatten()).expand(grouped.size(0))  # [B]


_SCALES: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "group": _group_std,
    "batch": _batch_std,
    "none": None,
}


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: ScaleRewards = "group") -> Advantages:
    """Group-normalised advantages.

    Args:
        rewards: `[N]` one reward per rollout, groups of `group_size` consecutive rollouts.
        group_size: rollouts per prompt (`num_generations`).
        scale_rewards: `group`, `batch` or `none` (see the module docstring).

    Returns:
        `Advantages` with `advantages[i] = (r_i - mean(group(i))) / (scale + 1e-4)` (no division
        for `none`), and each rollout's group mean and group std for logging.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, got {tuple(rewards.shape)}")
    if scale_rewards not in _SCALES:
        raise ValueError(f"scale_rewards must be one of {sorted(_SCALES)}, got {scale_rewards!r}")
    grouped = rewards.view(-1, group_size)  # [B, G]
    mean = grouped.mean(dim=1)  # [B]
    std = _group_std(grouped)  # [B]
    advantages = grouped - mean.unsqueeze(1)  # [B, G]
    scale = _SCALES[scale_rewards]
    if scale is not None:
        advantages = advantages / (scale(grouped).unsqueeze(1) + STD_EPS)
    # A group of size 1 has an undefined std (NaN); its advantage carries no signal.
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return Advantages(
        advantages=advantages.flatten(),
        group_mean=mean.repeat_interleave(group_size),
        group_std=std.repeat_interleave(group_size),
    )


def rloo_advantages(rewards: torch.Tensor, group_size: int, normalize: bool = False) -> Advantages:
    """Leave-one-out advantages `A_i = r_i - mean_{j != i} r_j` within each group.

    Args:
        rewards: `[N]`, groups of `group_size` consecutive rollouts (`group_size >= 2`).
        group_size: rollouts per prompt.
        normalize: then standardise over the batch, `(A - mean(A)) / (std(A) + 1e-4)`.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size or group_size < 2:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size} >= 2, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)  # [B, G]
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [B, G]
    advantages = (grouped - baseline).flatten()  # [N]
    if normalize:
        advantages = (advantages - advantages.mean()) / (nanstd(advantages) + STD_EPS)
    return Advantages(
        advantages=torch.nan_to_num(advantages, nan=0.0),
        group_mean=grouped.mean(dim=1).repeat_interleave(group_size),
        group_std=_group_std(grouped).repeat_interleave(group_size),
    )


def kl_penalized_rewards(
    rewards: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """`r - beta * sum_t (old_logp_t - ref_logp_t)` over each rollout's policy tokens (RLOO's KL in reward).

    The per-token term is the plain log-ratio (it can be negative), following the RLOO paper and TRL.
    Shapes: rewards `[N]`, log-probs and mask `[N, C]`.
    """
    return rewards - beta * ((old_logps - ref_logps) * mask).sum(-1)


def discounted_turn_returns(
    step_rewards: torch.Tensor, turn_mask: torch.Tensor, final_rewards: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Per-turn returns `G_t = sum_{k >= t} gamma^(k - t) s_k + gamma^(T - 1 - t) R`.

    Args:
        step_rewards: `[N, T]` each turn's step reward (0 past an episode's last turn).
        turn_mask: `[N, T]` 1 on the turns an episode has.
        final_rewards: `[N]` the rollout-level reward R, received after the last turn.
        gamma: the discount per turn.

    Returns:
        `[N, T]` returns (0 on padded turns).
    """
    n, t_max = step_rewards.shape
    returns = torch.zeros_like(step_rewards)
    running = torch.zeros(n, dtype=step_rewards.dtype, device=step_rewards.device)
    last = turn_mask.sum(-1).long() - 1  # [N] index of each episode's last turn
    for t in range(t_max - 1, -1, -1):
        is_last = (last == t).to(step_rewards.dtype)
        running = turn_mask[:, t] * (step_rewards[:, t] + gamma * running + is_last * final_rewards)
        returns[:, t] = running
    return returns


def turn_advantages(
    returns: torch.Tensor, turn_mask: torch.Tensor, group_size: int, scale_rewards: ScaleRewards = "group"
) -> torch.Tensor:
    """Per-turn advantages: each turn's return, centred and scaled by its group's *episode* returns.

    The baseline is the group's mean return from the first turn (the whole episode), so with no
    step rewards and `gamma = 1` every turn's advantage equals plain GRPO's rollout advantage.

    Args:
        returns: `[N, T]` from `discounted_turn_returns`.
        turn_mask: `[N, T]`.
        group_size: rollouts per prompt.
        scale_rewards: as in `group_advantages`, applied to the episode returns.

    Returns:
        `[N, T]` advantages (0 on padded turns).
    """
    grouped = returns[:, 0].view(-1, group_size)  # [B, G] episode returns
    advantages = returns - grouped.mean(dim=1).repeat_interleave(group_size).unsqueeze(1)  # [N, T]
    scale = _SCALES[scale_rewards]
    if scale is not None:
        advantages = advantages / (scale(grouped).repeat_interleave(group_size).unsqueeze(1) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0) * turn_mask
