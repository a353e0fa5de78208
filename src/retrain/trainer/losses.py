"""The clipped policy-gradient loss of GRPO and its relatives: pure functions on tensors.

Shapes: `N` rollouts, `C` completion tokens (right-padded). `mask` is 1 on tokens the policy
generated and 0 on padding and environment text.

Per token (PPO-style clipping, Schulman et al. 2017, as used by GRPO):

    ratio_t = exp(logp_t - old_logp_t)
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (the k3 estimator, Schulman 2020)

With one optimizer update per generation `old_logp = logp.detach()`, so the ratio is 1 and the
gradient is the plain policy gradient. `epsilon_high > epsilon` is DAPO's clip-higher.

`loss_type` picks a per-token objective and an aggregation, in one table (`LOSS_TYPES`), with TRL's
meanings:
- `grpo`: clipped; mean over each sequence's tokens, then over sequences (Shao et al. 2024).
- `bnpo`: clipped; mean over all tokens of the local batch.
- `dr_grpo`: clipped; sum over tokens / (N * max_completion_length) (Liu et al. 2025, "Dr. GRPO").
- `dapo`: clipped; sum over tokens / active tokens in the global batch (Yu et al. 2025, "DAPO").
- `cispo`: `-sg(min(ratio, epsilon_high)) * A * logp`, the ratio clipped as a weight, not the
  update (MiniMax-M1, 2025); `dapo` aggregation. Here `epsilon_high` is the ratio cap itself.
- `sapo`: a smooth gate `sigmoid(tau * (ratio - 1)) * 4 / tau` instead of the hard clip, with
  `tau` = `sapo_temperature_pos` for A > 0 and `sapo_temperature_neg` for A < 0 (Gao et al. 2025,
  "SAPO"); `grpo` aggregation.

`importance_sampling_level="sequence"` replaces the per-token ratio with one per sequence, the
exponential of the mean token log-ratio (GSPO, Zheng et al. 2025).

With `beta > 0` the per-token KL is multiplied by the importance ratio (TRL's
`use_bias_correction_kl`, on by default), which matters only off-policy.

`entropy_mask` (from `high_entropy_mask`) keeps the policy term only on the highest-entropy tokens
(Wang et al. 2025, "Beyond the 80/20 rule"); the KL term is not masked, as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]


class LossStats(NamedTuple):
    kl: Optional[torch.Tensor]  # scalar, mean per-token KL over the mask (None when beta == 0)
    clip_ratio_low: torch.Tensor  # scalar, fraction of tokens clipped below (negative advantage)
    clip_ratio_high: torch.Tensor  # scalar, fraction of tokens clipped above (positive advantage)
    clip_ratio: torch.Tensor  # scalar, fraction of tokens clipped either way


@dataclass(frozen=True)
class ClipRange:
    low: float
    high: float
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (0 when the mask is empty); broadcasts `[N, 1]` values."""
    values, mask = torch.broadcast_tensors(values, mask)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate `exp(d) - d - 1`, `d = ref - logp`; `[N, C]`."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """`[N, C]` bool: policy tokens whose entropy is in the top `top_quantile` share of this batch.

    The threshold is the `1 - top_quantile` quantile of the masked entropies (TRL's rule).
    """
    values = entropy[mask.bool()]
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()  # quantile needs float; keep float64 as is so the threshold is exact
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(values, 1 - top_quantile)
    return (entropy * mask >= threshold) & mask.bool()


def log_importance_weights(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: ImportanceSamplingLevel = "token"
) -> torch.Tensor:
    """Log importance ratios: `[N, C]` per token, or `[N, 1]` per sequence (masked mean, GSPO)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {level!r}")


# Per-token objectives: (ratio, advantages, logps, clip) -> per-token loss to minimise.
def _clipped(ratio: torch.Tensor, adv: torch.Tensor, logps: torch.Tensor, clip: ClipRange) -> torch.Tensor:
    clipped = torch.clamp(ratio, 1 - clip.low, 1 + clip.high)
    return -torch.min(ratio * adv, clipped * adv)


def _cispo(ratio: torch.Tensor, adv: torch.Tensor, logps: torch.Tensor, clip: ClipRange) -> torch.Tensor:
    return -torch.clamp(ratio, max=clip.high).detach() * adv * logps


def _sapo(ratio: torch.Tensor, adv: torch.Tensor, logps: torch.Tensor, clip: ClipRange) -> torch.Tensor:
    tau = torch.where(adv > 0, clip.sapo_temperature_pos, clip.sapo_temperature_neg)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


# Aggregations: (per-token loss, mask, max_completion_length, num_items_in_batch) -> scalar.
def _per_sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, max_len: int, num_items: Optional[torch.Tensor]) -> torch.Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _local_token_mean(per_token: torch.Tensor, mask: torch.Tensor, max_len: int, num_items: Optional[torch.Tensor]) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _constant_length(per_token: torch.Tensor, mask: torch.Tensor, max_len: int, num_items: Optional[torch.Tensor]) -> torch.Tensor:
    return (per_token * mask).sum() / (per_token.size(0) * max_len)


def _global_token_mean(per_token: torch.Tensor, mask: torch.Tensor, max_len: int, num_items: Optional[torch.Tensor]) -> torch.Tensor:
    normalizer = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token.dtype)
    return (per_token * mask).sum() / normalizer.clamp(min=1.0)


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ClipRange], torch.Tensor]
Aggregation = Callable[[torch.Tensor, torch.Tensor, int, Optional[torch.Tensor]], torch.Tensor]

LOSS_TYPES: dict[str, tuple[Objective, Aggregation]] = {
    "grpo": (_clipped, _per_sequence_mean),
    "bnpo": (_clipped, _local_token_mean),
    "dr_grpo": (_clipped, _constant_length),
    "dapo": (_clipped, _global_token_mean),
    "cispo": (_cispo, _global_token_mean),
    "sapo": (_sapo, _per_sequence_mean),
}


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
    importance_sampling_level: ImportanceSamplingLevel = "token",
    entropy_mask: Optional[torch.Tensor] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = True,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, LossStats]:
    """The GRPO-family loss (to minimise) and its statistics.

    Args:
        logps: `[N, C]` log-probs of the sampled tokens under the current policy (with grad).
        advantages: `[N]` one advantage per rollout (or `[N, C]` per token).
        mask: `[N, C]` 1.0 on policy tokens.
        old_logps: `[N, C]` log-probs at generation time; default `logps.detach()` (on-policy).
        ref_logps: `[N, C]` reference-policy log-probs; required when `beta > 0`.
        beta: KL coefficient.
        epsilon: lower clip range (and upper, unless `epsilon_high` is given).
        epsilon_high: upper clip range (DAPO clip-higher); for `cispo`, the ratio cap.
        loss_type: objective and aggregation, see the module docstring.
        importance_sampling_level: `token` ratios, or one `sequence` ratio (GSPO).
        entropy_mask: `[N, C]` bool, keep the policy term only where True (see `high_entropy_mask`).
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures.
        use_bias_correction_kl: multiply the per-token KL by the importance ratio, so the KL of
            off-policy tokens is estimated for the current policy (TRL's default).
        max_completion_length: the constant of `dr_grpo` (default: `C`).
        num_items_in_batch: active tokens per process in the global batch, for `dapo` and `cispo`
            (default: the local token count).
        token_weights: `[N, C]` or `[N, 1]` weights on the policy term (not the KL), without grad:
            the sampler correction and the off-policy mask (`retrain.trainer.off_policy`), as TRL
            applies its vLLM importance weights.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (reference-policy log-probs).")
    objective, aggregate = LOSS_TYPES[loss_type]
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [N, 1]
    clip = ClipRange(epsilon, epsilon if epsilon_high is None else epsilon_high, sapo_temperature_pos, sapo_temperature_neg)

    ratio = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))  # [N, C] or [N, 1]
    per_token = objective(ratio, advantages, logps, clip)  # [N, C]
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if token_weights is not None:
        per_token = per_token * token_weights
    kl = None
    if beta > 0:
        per_token_kl = kl_k3(logps, ref_logps)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + beta * per_token_kl
        kl = masked_mean(per_token_kl.detach(), mask)
    loss = aggregate(per_token, mask, max_completion_length or logps.size(1), num_items_in_batch)
    return loss, _clip_stats(ratio.detach(), advantages, mask, clip, loss_type, kl)


def _clip_stats(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: ClipRange, loss_type: str, kl: Optional[torch.Tensor]) -> LossStats:
    """Fractions of clipped tokens (of sequences, for sequence-level ratios), as TRL logs them."""
    if loss_type == "cispo":
        low = torch.zeros_like(ratio)
        high = ((ratio > clip.high) & (adv > 0)).to(mask.dtype)
    elif loss_type == "sapo":  # a smooth gate: nothing is clipped
        low = high = torch.zeros_like(ratio)
    else:
        low = ((ratio < 1 - clip.low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + clip.high) & (adv > 0)).to(mask.dtype)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean() if x.size(-1) == 1 else masked_mean(x, mask)

    return LossStats(kl=kl, clip_ratio_low=mean(low), clip_ratio_high=mean(high), clip_ratio=mean(torch.clamp(low + high, max=1.0)))


def rloo_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logps: Optional[torch.Tensor] = None,
    epsilon: float = 0.2,
    epsilon_high: Optional[float] = None,
) -> tuple[torch.Tensor, LossStats]:
    """RLOO's sequence-level clipped loss (TRL's `RLOOTrainer`), averaged over sequences.

    The ratio is `exp(sum_t logp_t - sum_t old_logp_t)` over each sequence's policy tokens; the KL
    penalty, if any, is already in the rewards (see `kl_penalized_rewards`).

    Args:
        logps: `[N, C]` current log-probs (with grad).
        advantages: `[N]` leave-one-out advantages.
        mask: `[N, C]` 1.0 on policy tokens.
        old_logps: `[N, C]` log-probs at generation time; default `logps.detach()`.
    """
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    clip = ClipRange(epsilon, epsilon if epsilon_high is None else epsilon_high)
    ratio = torch.exp((logps * mask).sum(-1) - (old_logps * mask).sum(-1))  # [N]
    per_sequence = _clipped(ratio, advantages, logps, clip)  # [N]
    ones = torch.ones_like(ratio)
    low = ((ratio < 1 - clip.low) & (advantages < 0)).to(ones.dtype).detach()
    high = ((ratio > 1 + clip.high) & (advantages > 0)).to(ones.dtype).detach()
    stats = LossStats(kl=None, clip_ratio_low=low.mean(), clip_ratio_high=high.mean(), clip_ratio=torch.clamp(low + high, max=1.0).mean())
    return per_sequence.mean(), stats
