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
  model. Otherwise (a flat row: an untrained model, a high temperature) the edge is bracketed by
  bisection over a sorted strided sample of `SAMPLE` of the row's values, each step one exact
  "mass above this value" (two passes over the row, no copy), and only the ~V / `SAMPLE` tokens
  inside the final bracket are sorted. Ties at the nucleus edge are resolved by `topk`'s order
  among the candidates and by vocabulary index in the bracket, as `transformers`' are by its sort's.
  Masses are float32 sums (blocked, so their error stays near float32 rounding), the precision of
  the probabilities themselves.

`draw` returns each token's log-probability under the distribution it was drawn from (the warped,
renormalized one), for the sampler's side of the off-policy metrics.
"""

from __future__ import annotations

from typing import Optional

import torch

BLOCK = 1024  # vocabulary entries per block of the inverse CDF
SLACK = 1e-3  # relative inflation of a float32 block sum: > BLOCK * 2**-24, the worst rounding of BLOCK additions
CANDIDATES = 64  # tokens a row's nucleus is first looked for among (a partial top-k)
SAMPLE = 256  # entries of a row (strided) whose values a wide nucleus's edge is bisected over
_SORT_BELOW = 4096  # vocabularies up to this size sort a wide row instead (faster there)


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


def _mass_above(probs: torch.Tensor, floor: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """`[b, 1]` float64 mass of the entries of `probs` `[b, V]` strictly above each row's `floor`
    `[b, 1]`: sum(max(p - floor, 0)) + floor x count(p > floor), the count as the sum of the signs of
    the same temporary (p - floor is 0 only where p == floor, under IEEE subtraction). In place on one
    temporary and summed in float32 (torch's reductions sum in blocks, so the error stays near float32
    rounding): a masked copy or a float64 or integer reduction would first copy the whole input.
    `scratch`: a tensor like `probs` to hold the temporary (fresh [b, V] memory costs page faults)."""
    excess = torch.sub(probs, floor, out=scratch).clamp_(min=0)  # [b, V]
    mass = excess.sum(-1, keepdim=True).double()
    return mass + floor.double() * excess.sign_().sum(-1, keepdim=True).double()


def _edge_bracket(probs: torch.Tensor, head: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `probs` `[b, V]`, probabilities `lo < hi` `[b, 1]` with the exact mass above `hi`
    below `target` `[b, 1]` and the mass above `lo` at least the target, and that mass above `hi`
    (float64 `[b, 1]`). `lo` and `hi` are neighbours in a sorted strided sample of `SAMPLE` entries,
    found by bisection on exact masses, so about V / SAMPLE entries lie between them. The sample is
    bounded by the smallest candidate (`head` `[b, K]`, which hold less than the target) and by 0."""
    stride = max(1, probs.size(-1) // SAMPLE)
    sample = probs[:, ::stride].sort(-1, descending=True).values  # [b, S]
    ladder = torch.cat([head[:, -1:], sample, torch.zeros_like(head[:, :1])], dim=1)  # [b, S + 2], non-increasing
    below = torch.zeros_like(target, dtype=torch.long)  # ladder index whose mass above is < target
    reach = torch.full_like(below, ladder.size(1) - 1)  # ladder index whose mass above reaches it
    scratch = torch.empty_like(probs)
    above_hi = torch.where(head > head[:, -1:], head, 0.0).sum(-1, keepdim=True, dtype=torch.float64)  # mass above ladder[:, 0]
    while bool((reach - below > 1).any()):
        middle = (below + reach) // 2
        mass = _mass_above(probs, ladder.gather(1, middle), scratch)
        reached = mass >= target
        reach, below = torch.where(reached, middle, reach), torch.where(reached, below, middle)
        above_hi = torch.where(reached, above_hi, mass)
    return ladder.gather(1, reach), ladder.gather(1, below), above_hi


def _wide_nucleus(probs: torch.Tensor, head: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`probs` `[b, V]` with everything outside each row's nucleus set to 0, for rows whose `CANDIDATES`
    most probable tokens (`head` `[b, K]`, descending) hold less than `target` `[b, 1]` (float64).

    Every token above the bracket's `hi` is in the nucleus (their mass is below the target) and none at
    or below `lo` is (the mass above `lo` reaches it); only the tokens in between are sorted, which
    resolves the edge exactly (ties by vocabulary index)."""
    rows, vocab = probs.shape
    if vocab <= _SORT_BELOW:  # a small vocabulary: one sort costs less than the bisection's passes
        values, indices = probs.sort(dim=-1, descending=True, stable=True)  # [b, V]; stable: ties by index, as below
        before = values.cumsum(-1, dtype=torch.float64) - values  # the mass before each token
        return torch.zeros_like(probs).scatter_(1, indices, values * (before < target))
    lo, hi, above_hi = _edge_bracket(probs, head, target)
    # the bracket's tokens, sorted by row, then by probability descending (stably: ties by index)
    out = probs.masked_fill(probs <= lo, 0.0)
    row, column = ((probs > lo) & (probs <= hi)).nonzero(as_tuple=True)  # [n] each, row-major
    if not row.numel():
        return out
    values = probs[row, column]
    by_value = values.sort(descending=True, stable=True).indices  # stable: ties stay in index order
    order = by_value[row[by_value].sort(stable=True).indices]  # then by row, keeping that order
    row, column, values = row[order], column[order], values[order].double()
    before = values.cumsum(0) - values  # [n] mass of the bracket tokens before each one, over all rows
    counts = torch.bincount(row, minlength=rows)
    starts = counts.cumsum(0) - counts  # [b] each row's first position
    before = before - before[starts.clamp(max=row.numel() - 1)][row]  # within its row
    dropped = above_hi.squeeze(1)[row] + before >= target.squeeze(1)[row]  # its predecessors already hold the target
    out[row[dropped], column[dropped]] = 0.0
    return out


def _candidates(probs: torch.Tensor, top_p: float, candidates: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's `candidates` most probable tokens (`[B, K]` values, descending, and indices), its
    target mass `[B, 1]` (float64: top_p, or the row's whole mass if that is less), and `[B]` whether
    the candidates reach it."""
    target = probs.sum(-1, keepdim=True).double().clamp(max=top_p)  # [B, 1]
    values, indices = probs.topk(min(candidates, probs.size(-1)), dim=-1)  # [B, K], descending
    covered = (values.sum(-1, keepdim=True, dtype=torch.float64) >= target).squeeze(1)  # [B]
    return values, indices, target, covered


def _truncate(values: torch.Tensor, top_p: float) -> torch.Tensor:
    """Candidates `values` `[b, K]` (probabilities, descending) with everything after each row's
    top-p nucleus set to zero; a row whose candidates hold less than `top_p` keeps them all."""
    mass = values.cumsum(-1, dtype=torch.float64)  # [b, K]
    target = mass[:, -1:].clamp(max=top_p)
    last = (mass < target).sum(-1, keepdim=True).clamp(max=values.size(1) - 1)  # the first to reach top_p
    return values * (torch.arange(values.size(1), device=values.device) <= last)


def nucleus(probs: torch.Tensor, top_p: float, candidates: int = CANDIDATES) -> torch.Tensor:
    """`probs` `[B, V]` (rows summing to 1 up to rounding) with everything outside each row's top-p
    nucleus set to 0, without a sort of the vocabulary (`candidates`: how many tokens are looked
    among first). `draw` uses the same steps, without this full-vocabulary form for rows whose
    nucleus lies within the candidates."""
    values, indices, target, covered = _candidates(probs, top_p, candidates)
    out = torch.zeros_like(probs)
    out[covered] = out[covered].scatter(1, indices[covered], _truncate(values[covered], top_p))
    if not bool(covered.all()):
        out[~covered] = _wide_nucleus(probs[~covered], values[~covered], target[~covered])
    return out


def truncation_mask(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> Optional[torch.Tensor]:
    """`[N, V]` bool: the tokens `draw` can draw from `logits` `[N, V]` (already divided by the
    temperature) under top-k, then top-p, by the same rules; None when neither truncates. For the
    trainer's log-probs under the distribution the sampler draws from (`truncated_logps`)."""
    keep = None
    if 0 < top_k < logits.size(-1):
        keep = logits >= logits.topk(top_k, dim=-1).values[:, -1:]  # transformers' rule: ties at the k-th stay
    if top_p < 1.0:
        probs = (logits if keep is None else logits.masked_fill(~keep, float("-inf"))).float().softmax(-1)
        keep = nucleus(probs, top_p) > 0
    return keep


def _draw_full(probs: torch.Tensor, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from whole rows `probs` `[b, V]` (zeros excluded): tokens `[b]` and float32 log-probs `[b]`
    under the rows' renormalized distribution."""
    tokens, total = inverse_cdf(probs, generator)
    chosen = probs.gather(1, tokens[:, None]).squeeze(1).double()  # [b]
    return tokens, (chosen.log() - total.log()).float()


def _draw_among(values: torch.Tensor, indices: torch.Tensor, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw among candidates `values` `[b, K]` (probabilities, zeros excluded) at `indices`: tokens
    `[b]` and float32 log-probs `[b]` under the candidates' renormalized distribution."""
    local, logprobs = _draw_full(values, generator)
    return indices.gather(1, local[:, None]).squeeze(1), logprobs


def draw(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` `[B, V]` from softmax(logits / temperature) restricted to the
    top-k, then to the top-p nucleus (`generate`'s order), renormalized.

    Returns `[B]` long tokens and their `[B]` float32 log-probabilities under that distribution.
    `overwrite`: `logits` is the caller's scratch, and the temperature and softmax are applied to it in
    place (a fresh [B, V] tensor per token costs page faults at a real vocabulary).
    """
    in_place = overwrite or logits.dtype != torch.float32  # .float() below makes a copy, ours
    logits = logits.float()
    if temperature != 1.0:
        logits = logits.div_(temperature) if in_place else logits / temperature
        in_place = True
    vocab = logits.size(-1)
    if 0 < top_k < vocab:
        values, indices = logits.topk(top_k + 1, dim=-1)  # [B, k + 1], descending
        if not bool((values[:, top_k] == values[:, top_k - 1]).any()):  # no tie at the k-th: the k candidates are the set
            kept = values[:, :top_k].softmax(-1)  # [B, k] the top-k distribution, descending
            return _draw_among(_truncate(kept, top_p) if top_p < 1.0 else kept, indices[:, :top_k], generator)
        from transformers.generation.logits_process import TopKLogitsWarper

        logits = TopKLogitsWarper(top_k)(None, logits)  # a tie at the k-th: transformers' mask keeps every tied token
        in_place = True
    probs = torch.softmax(logits, -1, out=logits) if in_place else logits.softmax(-1)  # [B, V]
    if top_p < 1.0:
        values, indices, target, covered = _candidates(probs, top_p, CANDIDATES)
        if bool(covered.all()):
            return _draw_among(_truncate(values, top_p), indices, generator)
        tokens = torch.empty(probs.size(0), dtype=torch.long, device=probs.device)
        logprobs = torch.empty(probs.size(0), dtype=torch.float32, device=probs.device)
        if bool(covered.any()):
            tokens[covered], logprobs[covered] = _draw_among(_truncate(values[covered], top_p), indices[covered], generator)
        wide = ~covered
        kept = _wide_nucleus(probs[wide] if bool(covered.any()) else probs, values[wide], target[wide])  # [b, V]
        tokens[wide], logprobs[wide] = _draw_full(kept, generator)
        return tokens, logprobs
    return _draw_full(probs, generator)
