"""The clipped policy-gradient loss of GRPO and its relatives: pure functions on tensors.

Shapes: `N` rollouts, `C` completion tokens (right-padded). `mask` is 1 on tokens the policy
generated and 0 on padding and environment text.

Per token (PPO-style clipping, Schulman et al. 2017, as used by GRPO):

    ratio_t = exp(logp_t - old_logp_t)
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (the k3 estimator, Schulman 2020)

With one optimizer update per generation `old_logp = logp.detach()`, so the ratio is 1 and the
gradient is the plain policy gradient. `epsilon_high > epsilon` is DAPO's clip-higher.

`loss_type` only changes how per-token losses are averaged (TRL's meanings):
- `grpo`: mean over each sequence's tokens, then over sequences (Shao et al. 2024).
- `bnpo`: mean over all tokens of the local batch.
- `dr_grpo`: sum over tokens / (N * max_completion_length) (Liu et al. 2025, "Dr. GRPO").
- `dapo`: sum over tokens / active tokens in the global batch (Yu et al. 2025, "DAPO").
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple, Optional

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


class LossStats(NamedTuple):
    kl: Optional[torch.Tensor]  # scalar, mean per-token KL over the mask (None when beta == 0)
    clip_ratio_low: torch.Tensor  # scalar, fraction of tokens clipped below (negative advantage)
    clip_ratio_high: torch.Tensor  # scalar, fraction of tokens clipped above (positive advantage)
    clip_ratio: torch.Tensor  # scalar, fraction of tokens clipped either way


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate `exp(d) - d - 1`, `d = ref - logp`; `[N, C]`."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def _grpo(per_token: torch.Tensor, mask: torch.Tensor, max_len: int, num_items: Optional[torch.Tensor]) -> torch.Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _bnpo(per_token: torch.Tensor, mask: torch.Tensor, max_len: int, num_items: Optional[torch.Tensor]) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _dr_grpo(per_token: torch.Tensor, mask: torch.Tensor, max_len: int, num_items: Optional[torch.Tensor]) -> torch.Tensor:
    return (per_token * mask).sum() / (per_token.size(0) * max_len)


def _dapo(per_token: torch.Tensor, mask: torch.Tensor, max_len: int, num_items: Optional[torch.Tensor]) -> torch.Tensor:
    normalizer = mask.sum() if num_items is None else num_items
    return (per_token * mask).sum() / normalizer.clamp(min=1.0)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {"grpo": _grpo, "bnpo": _bnpo, "dr_grpo": _dr_grpo, "dapo": _dapo}


def policy_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
    loss_type: LossType = "dapo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, LossStats]:
    """The clipped surrogate loss (to minimise) and its statistics.

    Args:
        logps: `[N, C]` log-probs of the sampled tokens under the current policy (with grad).
        advantages: `[N]` one advantage per rollout (or `[N, C]` per token).
        mask: `[N, C]` 1.0 on policy tokens.
        old_logps: `[N, C]` log-probs at generation time; default `logps.detach()` (on-policy).
        ref_logps: `[N, C]` reference-policy log-probs; required when `beta > 0`.
        beta: KL coefficient.
        epsilon: lower clip range (and upper, unless `epsilon_high` is given).
        epsilon_high: upper clip range (DAPO clip-higher).
        loss_type: aggregation, see the module docstring.
        max_completion_length: the constant of `dr_grpo` (default: `C`).
        num_items_in_batch: active tokens per process in the global batch, for `dapo` (default:
            the local token count).
    """
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"loss_type must be one of {sorted(AGGREGATIONS)}, got {loss_type!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (reference-policy log-probs).")
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [N, 1]
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high

    ratio = torch.exp(logps - old_logps)  # [N, C]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # [N, C]

    kl = None
    if beta > 0:
        per_token_kl = kl_k3(logps, ref_logps)
        per_token = per_token + beta * per_token_kl
        kl = masked_mean(per_token_kl.detach(), mask)

    loss = AGGREGATIONS[loss_type](per_token, mask, max_completion_length or logps.size(1), num_items_in_batch)

    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (advantages < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (advantages > 0)).to(mask.dtype)
        stats = LossStats(
            kl=kl,
            clip_ratio_low=masked_mean(low, mask),
            clip_ratio_high=masked_mean(high, mask),
            clip_ratio=masked_mean(torch.clamp(low + high, max=1.0), mask),
        )
    return loss, stats
