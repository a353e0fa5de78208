"""Drawing next tokens from logits: the exact warped distribution, without work per vocabulary entry
that the draw does not need.

At a real vocabulary (32k-152k entries) the draw, not the model, can dominate CPU decoding:
`torch.multinomial` and the exponential race (`(p / Exponential(1)).argmax()`) both make one random
number per vocabulary entry, and `transformers`' top-p warper sorts the whole vocabulary of every
row at every token (`benchmarks/sampling.py` measures them side by side). Here:

- **Inverse CDF over blocks, one uniform per row.** The vocabulary is cut into blocks of
  `BLOCK` entries whose float32 sums are cheap; a uniform picks a block by the cumulative block
  sums (float64, one entry per block), and the same uniform, rescaled, picks the token by the
  block's own float64 cumulative sum. The float32 block sums are only bounds: each is inflated by
  `SLACK`, more than the rounding of any order of summing `BLOCK` non-negative float32 numbers
  (at most `BLOCK` x 2^-24 relative), and a uniform that lands in a block's slack is redrawn. So a
  token is drawn with probability exactly `p_i / sum(p)` up to float64 rounding, while the work per
  vocabulary entry is one float32 addition. A token of probability zero (masked by top-k, top-p or
  end-of-sequence suppression) is never drawn: no uniform lands on an empty interval.
- **Top-k** keeps `transformers`' rule (every logit at least the k-th largest): the draw is among
  the `topk` candidates alone, renormalized. When a row's k-th logit ties the next one, the batch
  takes the full-vocabulary path with `transformers`' own `TopKLogitsWarper`, so tied tokens stay in.
- **Top-p without a sort.** The nucleus of a row is its most probable tokens, in order, up to the
  first whose inclusive cumulative mass reaches `top_p` (at least one token): what
  `transformers`' `TopPLogitsWarper` keeps. It is found among the row's `CANDIDATES` most probable
  tokens (a partial `topk`) when they hold `top_p` of the mass, the normal case for a trained
  model; otherwise a probe for the probability above which `top_p` of the mass lies (one masked
  sum per probe) says how many candidates to take, and the row's nucleus comes from that many. Ties
  at the nucleus edge are resolved by `topk`'s order, as `transformers`' are by its sort's.

`draw` returns each token's log-probability under the distribution it was drawn from (the warped,
renormalized one), for the sampler's side of the off-policy metrics.
"""

from __future__ import annotations

from typing import Optional

import torch

BLOCK = 1024  # vocabulary entries per block of the inverse CDF
SLACK = 1e-3  # relative inflation of a float32 block sum: > BLOCK * 2**-24, the worst rounding of BLOCK additions
CANDIDATES = 64  # tokens a row's nucleus is first looked for among (a partial top-k)
_PROBE_STEP = 2.0  # each probe for a wide nucleus lowers the probability floor by this factor


def inverse_cdf(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one index per row of `probs` `[B, V]` (non-negative, rows with positive mass, not
    necessarily normalized) with probability `probs / row total`, from (almost always) one uniform
    per row. Returns `[B]` long indices and the `[B]` float64 totals of the rows' blocks (the total
    up to float32 rounding), for log-probabilities.
    """
    rows, vocab = probs.shape
    if vocab <= BLOCK:  # one block: its float64 cumulative sum is the whole story
        cdf = probs.cumsum(-1, dtype=torch.float64)  # [B, V]
        total = cdf[:, -1:]
        u = torch.rand(total.shape, dtype=torch.float64, device=probs.device, generator=generator) * total
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total under rounding
        return torch.searchsorted(cdf, u, right=True).squeeze(1), total.squeeze(1)
    full = vocab // BLOCK * BLOCK
    sums = probs[:, :full].reshape(rows, -1, BLOCK).sum(-1)  # [B, full / BLOCK], float32
    if full < vocab:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], dim=1)  # [B, blocks]
    bounds = sums.double() * (1 + SLACK)  # [B, blocks]: never below a block's exact sum
    block_cdf = bounds.cumsum(-1)  # [B, blocks]
    offsets = torch.arange(BLOCK, device=probs.device)  # [BLOCK]
    tokens = torch.empty(rows, dtype=torch.long, device=probs.device)
    todo = torch.arange(rows, device=probs.device)
    while todo.numel():
        cdf_rows, bound_rows = block_cdf[todo], bounds[todo]  # [b, blocks]
        u = torch.rand((todo.numel(), 1), dtype=torch.float64, device=probs.device, generator=generator) * cdf_rows[:, -1:]
        block = torch.searchsorted(cdf_rows, u, right=True).clamp(max=cdf_rows.size(1) - 1)  # [b, 1]
        u = (u - (cdf_rows.gather(1, block) - bound_rows.gather(1, block))).clamp(min=0.0)  # uniform on [0, the block's bound)
        index = block * BLOCK + offsets  # [b, BLOCK]
        source = probs if todo.numel() == rows else probs[todo]
        entries = source.gather(1, index.clamp(max=vocab - 1)) * (index < vocab)  # [b, BLOCK]
        within = entries.cumsum(-1, dtype=torch.float64)  # [b, BLOCK]
        local = torch.searchsorted(within, u, right=True)  # [b, 1]; BLOCK: u fell in the slack
        accepted = (local < BLOCK).squeeze(1)
        tokens[todo[accepted]] = (block * BLOCK + local)[accepted].squeeze(1)
        todo = todo[~accepted]
    return tokens, sums.double().sum(-1)


def _nucleus_size(probs: torch.Tensor, values: torch.Tensor, target: torch.Tensor) -> int:
    """At least how many of their most probable tokens hold `target` of the rows' mass: probes a
    probability floor, halving it from the smallest candidate, until the entries above it hold the
    target in every row (one floor for all rows, so that a probe is a single comparison)."""
    vocab = probs.size(-1)
    floor = float(values[:, -1].min())
    above = torch.empty_like(probs)  # one buffer for every probe: a fresh [b, V] tensor costs more in page faults than the probe
    zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
    while floor > 0:
        floor /= _PROBE_STEP
        torch.where(probs > floor, probs, zero, out=above)  # [b, V]: entries above the floor, else 0
        if bool((above.sum(-1, keepdim=True).double() * (1 + 1e-6) >= target).all()):
            return min(vocab, max(int(above.sign_().sum(-1).max()) + 1, values.size(1) + 1))
    return vocab


def _truncate(values: torch.Tensor, top_p: float) -> torch.Tensor:
    """Candidates `values` `[b, K]` (probabilities, descending) with everything after each row's
    top-p nucleus set to zero; a row whose candidates hold less than `top_p` keeps them all."""
    mass = values.cumsum(-1, dtype=torch.float64)  # [b, K]
    target = mass[:, -1:].clamp(max=top_p)
    last = (mass < target).sum(-1, keepdim=True).clamp(max=values.size(1) - 1)  # the first to reach top_p
    return values * (torch.arange(values.size(1), device=values.device) <= last)


def nucleus(probs: torch.Tensor, top_p: float, candidates: int = CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top-p nucleus of `probs` `[B, V]` (rows summing to 1 up to rounding), without a
    sort: `[B, K]` probabilities, descending and zero after the nucleus, and their `[B, K]` indices
    (`candidates`: how many tokens are looked among first)."""
    target = probs.sum(-1, keepdim=True).double().clamp(max=top_p)  # [B, 1]
    values, indices = probs.topk(min(candidates, probs.size(-1)), dim=-1)  # [B, K], descending
    covered = (values.sum(-1, keepdim=True, dtype=torch.float64) >= target).squeeze(1)  # [B]
    if bool(covered.all()):
        return _truncate(values, top_p), indices
    flat = ~covered
    rows = probs[flat]  # [b, V]
    size = _nucleus_size(rows, values[flat], target[flat])
    wide_values, wide_indices = rows.topk(size, dim=-1)
    if size < rows.size(-1) and bool((wide_values.sum(-1, keepdim=True, dtype=torch.float64) < target[flat]).any()):
        wide_values, wide_indices = rows.topk(rows.size(-1), dim=-1)  # rounding left a row short of top_p: take it all
    out_values = torch.zeros(probs.size(0), wide_values.size(1), dtype=probs.dtype, device=probs.device)
    out_indices = torch.zeros(probs.size(0), wide_values.size(1), dtype=torch.long, device=probs.device)
    out_values[covered, : values.size(1)], out_indices[covered, : values.size(1)] = values[covered], indices[covered]
    out_values[flat], out_indices[flat] = wide_values, wide_indices
    return _truncate(out_values, top_p), out_indices


def _draw_among(values: torch.Tensor, indices: torch.Tensor, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw among candidates `values` `[b, K]` (probabilities, zeros excluded) at `indices`: tokens
    `[b]` and float32 log-probs `[b]` under the candidates' renormalized distribution."""
    local, total = inverse_cdf(values, generator)
    chosen = values.gather(1, local[:, None]).squeeze(1).double()
    return indices.gather(1, local[:, None]).squeeze(1), (chosen.log() - total.log()).float()


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
    vocab = logits.size(-1)
    if 0 < top_k < vocab:
        values, indices = logits.topk(top_k + 1, dim=-1)  # [B, k + 1], descending
        if not bool((values[:, top_k] == values[:, top_k - 1]).any()):  # no tie at the k-th: the k candidates are the set
            kept = values[:, :top_k].softmax(-1)  # [B, k] the top-k distribution, descending
            return _draw_among(_truncate(kept, top_p) if top_p < 1.0 else kept, indices[:, :top_k], generator)
        from transformers.generation.logits_process import TopKLogitsWarper

        logits = TopKLogitsWarper(top_k)(None, logits)  # a tie at the k-th: transformers' mask keeps every tied token
    probs = logits.softmax(-1)  # [B, V]
    if top_p < 1.0:
        return _draw_among(*nucleus(probs, top_p), generator)
    tokens, total = inverse_cdf(probs, generator)
    chosen = probs.gather(1, tokens[:, None]).squeeze(1).double()  # [B]
    return tokens, (chosen.log() - total.log()).float()
