"""Drawing next tokens from logits: the exact warped distribution, without work per vocabulary entry
that the draw does not need.

At a real vocabulary (32k-152k entries) the draw, not the model, can dominate CPU decoding:
`torch.multinomial` and the exponential race (`(p / Exponential(1)).argmax()`) both make one random
number per vocabulary entry, and `transformers`' top-p warper sorts the whole vocabulary of every
row at every token (`benchmarks/sampling.py` measures them side by side). Here:

- **Inverse CDF.** One uniform per row: `u ~ U[0, total)`, token = the first index whose cumulative
  probability exceeds `u`. The cumulative sum runs in float64, so its rounding (~1e-16 relative)
  is far below the float32 precision of the probabilities themselves: each token is drawn with its
  float32 probability, renormalized, exactly as far as float32 can say. A token of probability zero
  (masked by top-k, top-p or end-of-sequence suppression) can never be drawn: its cumulative value
  equals its predecessor's, so no `u` lands on it.
- **Top-k** is `transformers`' rule (keep every logit at least the k-th largest, ties included),
  computed with a partial `topk`, as `transformers` does.
- **Top-p without a sort.** The nucleus of a row is the most probable tokens, in order, up to the
  first whose inclusive cumulative mass reaches `top_p` (at least one token): the set
  `transformers`' `TopPLogitsWarper` keeps. It is everything with probability at least a threshold
  `t`, the probability of that last token. `t` comes from the row's `candidates` most probable
  tokens (a partial `topk`) when they already hold `top_p` of the mass, which is the normal case
  for a trained model; otherwise (a flat distribution, e.g. an untrained model) from an exact
  radix select over the float32 bits of the probabilities (four passes of 8 bits, each a mass
  histogram of 256 bins), which finds the same `t` with no sort. Where several tokens tie at
  exactly `t`, all are kept (`transformers` keeps whichever its sort puts first).

`draw` returns each token's log-probability under the distribution it was drawn from (the warped,
renormalized one), from the same probabilities, for the sampler's side of the off-policy metrics.
"""

from __future__ import annotations

from typing import Optional

import torch

CANDIDATES = 64  # tokens a row's nucleus is first looked for among (a partial top-k)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """`logits` `[B, V]` with every entry below its row's `top_k`-th largest set to -inf (ties kept)."""
    if not 0 < top_k < logits.size(-1):
        return logits
    kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def nucleus_threshold(probs: torch.Tensor, top_p: float, candidates: int = CANDIDATES) -> torch.Tensor:
    """`[B, 1]` per row the probability `t` such that `probs >= t` is the row's top-p nucleus.

    `probs` `[B, V]`, non-negative rows (each summing to 1 up to rounding). A `top_p` above a row's
    total mass keeps every token of positive probability.
    """
    total = probs.sum(-1, dtype=torch.float64, keepdim=True)  # [B, 1]
    target = total.clamp(max=top_p)  # [B, 1]
    k = min(candidates, probs.size(-1))
    values = probs.topk(k, dim=-1).values  # [B, k], descending
    mass = values.cumsum(-1, dtype=torch.float64)  # [B, k]
    covered = mass[:, -1:] >= target  # [B, 1]: the nucleus lies within the candidates
    last = (mass < target).sum(-1, keepdim=True).clamp(max=k - 1)  # index of the first token reaching top_p
    threshold = values.gather(1, last)
    flat = ~covered.squeeze(1)
    if bool(flat.any()):
        threshold[flat] = _radix_threshold(probs[flat], target[flat])
    return threshold


def _radix_threshold(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`[b, 1]` the largest probability `t` with `sum(probs[probs >= t]) >= target`, exactly.

    Non-negative float32 values order like their bit patterns read as integers, so `t`'s bits can be
    chosen 8 at a time, most significant first: at each pass, histogram (by mass) the next 8 bits
    of the entries that share the bits chosen so far, and take the largest digit that still leaves
    at least `target` at or above it. Four passes of `[b, V]` work, no sort.
    """
    bits = probs.float().contiguous().view(torch.int32).long()  # [b, V], monotone in the value
    weight = probs.double()  # [b, V]
    prefix = torch.zeros_like(bits[:, :1])  # [b, 1] the bits chosen so far
    above = torch.zeros_like(target)  # [b, 1] mass of the entries known to lie above t
    for shift in (24, 16, 8, 0):
        digit = (bits >> shift) & 255  # [b, V]
        share = weight if shift == 24 else torch.where((bits >> (shift + 8)) == prefix, weight, 0.0)
        hist = torch.zeros(bits.size(0), 256, dtype=torch.float64, device=bits.device).scatter_add_(1, digit, share)
        at_or_above = above + hist.flip(-1).cumsum(-1).flip(-1)  # [b, 256]: mass at this digit or a larger one
        # at_or_above falls with the digit, so the qualifying digits are 0..chosen (rounding may leave
        # none: then 0, keeping the whole group)
        chosen = ((at_or_above >= target).sum(-1, keepdim=True) - 1).clamp(min=0)  # [b, 1]
        above = torch.where(chosen < 255, at_or_above.gather(1, (chosen + 1).clamp(max=255)), above)
        prefix = (prefix << 8) | chosen
    return prefix.int().view(torch.float32).to(probs.dtype)


def inverse_cdf(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one index per row of `probs` `[B, V]` (non-negative, rows with positive mass, not
    necessarily normalized) with probability `probs / row total`, from one uniform per row.

    Returns `[B]` long indices and the `[B]` float64 row totals.
    """
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [B, V]
    total = cdf[:, -1:]  # [B, 1]
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # keep u < total under rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(1), total.squeeze(1)


def draw(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` `[B, V]` from softmax(logits / temperature) restricted to the
    top-k, then to the top-p nucleus (`generate`'s order), renormalized.

    Returns `[B]` long tokens and their `[B]` float32 log-probabilities under that distribution.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logits = top_k_filter(logits, top_k)
    probs = logits.softmax(-1)  # [B, V]
    if top_p < 1.0:
        probs = probs.masked_fill(probs < nucleus_threshold(probs, top_p), 0.0)
    tokens, total = inverse_cdf(probs, generator)
    chosen = probs.gather(1, tokens[:, None]).squeeze(1).double()  # [B]
    return tokens, (chosen.log() - total.log()).float()
