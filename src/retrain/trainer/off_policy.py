"""How far the sampler's distribution is from the trainer's, on the tokens the sampler drew.

The tokens of a rollout are drawn by the sampler (retrain's decoder, `generate`, an inference
engine) from a distribution mu, and the loss reads the trainer's log-probs pi of the same tokens.
The two differ by numerics (bf16, kernels, a different engine) and, when rollouts are reused or
produced asynchronously, by staleness. These metrics measure it per step; the corrections that
reweight or mask tokens by the ratio build on the same quantities.

    log_ratio = log pi(x) - log mu(x)          per generated token x ~ mu
    ratio     = exp(log_ratio)                 the importance weight pi/mu
    kl        = mean(ratio - 1 - log_ratio)    k3 estimate of KL(mu || pi): unbiased for x ~ mu, >= 0
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from retrain.trainer.losses import masked_mean


def sampler_mismatch(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`sampler/kl`, `sampler/ratio_mean`, `sampler/ratio_max`, `sampler/ratio_min` over the masked tokens.

    Args:
        trainer_logps: `[N, C]` the trainer's log-probs of the completion tokens.
        sampler_logps: `[N, C]` the sampler's log-probs of the same tokens (any value where `mask` is 0).
        mask: `[N, C]` 1 on tokens the sampler generated.
    """
    on = mask > 0
    log_ratio = torch.where(on, trainer_logps.detach().float() - sampler_logps.float(), torch.zeros((), device=mask.device))
    ratio = log_ratio.exp()
    if not bool(on.any()):
        one, zero = torch.ones((), device=mask.device), torch.zeros((), device=mask.device)
        return {"sampler/kl": zero, "sampler/ratio_mean": one, "sampler/ratio_max": one, "sampler/ratio_min": one}
    return {
        "sampler/kl": masked_mean(ratio - 1 - log_ratio, mask),
        "sampler/ratio_mean": masked_mean(ratio, mask),
        "sampler/ratio_max": ratio[on].max(),
        "sampler/ratio_min": ratio[on].min(),
    }


SamplerCorrection = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def sampler_correction_weights(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: SamplerCorrection,
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = 3.0,
) -> torch.Tensor:
    """Importance weights pi/mu that correct the loss for tokens drawn by the sampler (TRL's
    `vllm_importance_sampling_*`, applied to whichever backend sampled).

    `token_*` weights each token by its ratio (`[N, C]`), `sequence_*` each sequence by the product
    of its tokens' ratios (`[N, 1]`). `*_truncate` clamps the weight to `[clip_min, clip_max]`
    (truncated IS); `*_mask` sets weights outside that range to 0 (the token or sequence gets no
    loss). Tokens without a sampler log-prob (NaN) count as ratio 1.

    Args:
        trainer_logps: `[N, C]` the trainer's log-probs at sampling time (no grad).
        sampler_logps: `[N, C]` the sampler's log-probs of the same tokens.
        mask: `[N, C]` 1 on the policy's tokens.
    """
    diff = torch.nan_to_num((trainer_logps.detach() - sampler_logps) * mask, nan=0.0)  # [N, C]
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)  # [N, 1]
    ratio = diff.exp()
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def off_policy_sequence_mask(
    advantages: torch.Tensor, logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, threshold: float
) -> torch.Tensor:
    """`[N, 1]` DeepSeek-V3.2's off-policy sequence mask (TRL's `off_policy_mask_threshold`): drop a
    sequence with a negative advantage whose mean per-token KL from the sampler, log mu - log pi,
    exceeds `threshold`; keep everything else.

    Args:
        advantages: `[N]` or `[N, 1]`.
        logps: `[N, C]` the current policy's log-probs.
        sampler_logps: `[N, C]` the log-probs the tokens were sampled with.
        mask: `[N, C]` 1 on the policy's tokens.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    kl = torch.nan_to_num(sampler_logps - logps.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # [N, 1]
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)
