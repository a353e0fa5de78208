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
  `transformers`' `TopPLogitsWarper` keeps. It is looked for among the row's 64, then (except on a
  CPU at vocabularies of 16,384 or more, where the search below costs less) 1,024 most probable
  tokens (`CANDIDATES`, partial `topk`s) when they can hold `top_p` of the mass, the normal case
  for a trained model; a size is skipped when even the tokens counted so far plus the rest at the
  largest value not yet counted fall short (a flat row skips them all). Otherwise (a flat row: an untrained model, a high
  temperature) the edge is bracketed between neighbours of a sorted strided sample of `SAMPLE` of
  the row's values by an interpolation search on exact masses (each step one "mass above this
  value"; on a CPU a row at a time, so that the row stays in cache across its probes), and only the
  ~V / `SAMPLE` tokens inside the final bracket are sorted. Such a nucleus is drawn from by
  rejection: a token drawn from the whole row is kept if it is in the nucleus, which is an exact
  draw from the nucleus, and keeps most draws since the nucleus holds top_p of the mass (a row
  still without a token after `REDRAWS` rounds draws from its nucleus copied out). Ties at the
  nucleus edge are resolved by `topk`'s order among the candidates and by vocabulary index in the
  bracket, as `transformers`' are by its sort's. Masses are float32 sums (blocked, so their error
  stays near float32 rounding), the precision of the probabilities themselves.

`draw` returns each token's log-probability under the distribution it was drawn from (the warped,
renormalized one), for the sampler's side of the off-policy metrics. `nucleus_` cuts the same
nuclei out of probabilities in place, for the trainer's log-probs under that distribution.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple, Optional, Union

import numpy
import torch

BLOCK = 1024  # vocabulary entries per block of the inverse CDF
SLACK = 1e-3  # relative inflation of a float32 block sum: > BLOCK * 2**-24, the worst rounding of BLOCK additions
CANDIDATES = (64, 1024)  # sizes of the partial top-k a row's nucleus is looked for among, in turn
SAMPLE = 256  # entries of a row (strided) whose values a wide nucleus's edge is searched over
_SORT_ALL_BELOW = 256  # vocabularies up to this size sort every row for top-p (faster there)
_SORT_BELOW = 1024  # vocabularies up to this size sort a wide row instead of searching its edge
_GUESS_SLACK = 4  # see _find_nucleus
_ONE_SIZE_FROM = 16384  # vocabularies this large look among CANDIDATES[0] alone where rows go one at a time
REDRAWS = 2  # rounds of rejection from a wide row before its nucleus is copied out to draw from
ROW_AT_A_TIME = ("cpu",)  # devices whose wide-row passes go a row at a time (it stays in cache); others batch them


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


def _edge_bracket(
    probs: torch.Tensor, top: torch.Tensor, above_top: torch.Tensor, target: torch.Tensor, total: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `probs` `[b, V]` (row masses `total` `[b, 1]`, float64), probabilities `lo < hi`
    with the exact mass above `hi` below `target` `[b, 1]` and the mass above `lo` at least the target.
    `lo` and `hi` are neighbours in a sorted strided sample of `SAMPLE` entries, bounded by `top`
    `[b, 1]` (mass `above_top` above it, less than the target) and by 0, so about V / SAMPLE entries
    lie between them. Returns `hi` `[b, 1]`, the mass above it (float64 `[b, 1]`), and the tokens in
    the bracket, `lo < p <= hi`, as `(row [n], column [n])`, row-major.

    They are searched for on exact masses, each step probing where the sample, scaled to the exact
    masses at the bracket's ends, puts the target (an interpolation search, which on the rows
    `benchmarks/NOTES.md` measures takes about half of bisection's steps), but at least 1/16 of the
    bracket from either end, and at the midpoint while the bracket is wider than 2**(10 - step), which
    bounds the worst case near bisection's. On a CPU a row at a time (`_search_rows`), elsewhere every
    row at once (`_search_batched`): the same probes."""
    sample = probs[:, :: max(1, probs.size(-1) // SAMPLE)].sort(-1, descending=True).values  # [b, S]
    sample = sample.clamp_(max=top)  # the ladder stays non-increasing
    ladder = torch.cat([top, sample, torch.zeros_like(top)], dim=1)  # [b, L = S + 2]
    # sampled mass above each ladder value, up to the stride: the sample's entries before it
    sampled = torch.cat([torch.zeros_like(target).expand(-1, 2), sample.double().cumsum(-1)], dim=1)  # [b, L]
    search = _search_rows if probs.device.type in ROW_AT_A_TIME else _search_batched
    return search(probs, ladder, sampled, above_top, target, total)


def _search_rows(
    probs: torch.Tensor, ladder: torch.Tensor, sampled: torch.Tensor, above_top: torch.Tensor, target: torch.Tensor, total: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_edge_bracket`'s search on a CPU: one row at a time, its steps in Python numbers, and each
    probe's mass one `threshold` and one `sum` of the row, which stays in cache from probe to probe
    and for the bracket's tokens (a row is 600 KB at 151,936), where whole-batch passes each go
    through memory. `ladder`, `sampled`: `[b, L]`, the ladder values and the sampled mass above each."""
    scratch = probs.new_empty(probs.size(-1))  # [V]
    held = probs.new_empty(())
    his, aboves, columns = [], [], []
    rows = zip(ladder.tolist(), sampled.tolist(), above_top.squeeze(1).tolist(), target.squeeze(1).tolist(), total.squeeze(1).tolist())
    for row, (values, cumulative, above_hi, goal, above_lo) in zip(probs, rows):
        below, reach, step = 0, len(values) - 1, 0  # ladder indices: mass above values[below] < goal <= above values[reach]
        while reach - below > 1:
            width = reach - below
            if width > 2 ** max(10 - step, 0):
                probe = (below + reach) // 2
            else:  # past the last index whose estimated mass above is below the goal, kept off the ends
                start = cumulative[below]
                cut = start + (goal - above_hi) * max(cumulative[reach] - start, 1e-300) / (above_lo - above_hi)
                probe = max(bisect.bisect_left(cumulative, cut, below + 1, reach) - 1, below + 1)
                probe = min(max(probe, below + width // 16), reach - width // 16)
            probe = min(max(probe, below + 1), reach - 1)
            mass = float(torch.sum(torch.threshold(row, values[probe], 0.0, out=scratch), 0, out=held))
            if mass >= goal:
                reach, above_lo = probe, mass
            else:
                below, above_hi = probe, mass
            step += 1
        entries = row.numpy()  # numpy's comparisons and flatnonzero on one row take half of torch's
        columns.append(torch.from_numpy(numpy.flatnonzero((entries > values[reach]) & (entries <= values[below]))))
        his.append(values[below])
        aboves.append(above_hi)
    counts = torch.tensor([c.numel() for c in columns])
    hi = torch.tensor(his, dtype=probs.dtype).unsqueeze(1)
    return hi, torch.tensor(aboves, dtype=torch.float64).unsqueeze(1), torch.arange(probs.size(0)).repeat_interleave(counts), torch.cat(columns)


def _search_batched(
    probs: torch.Tensor, ladder: torch.Tensor, sampled: torch.Tensor, above_top: torch.Tensor, target: torch.Tensor, total: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_edge_bracket`'s search for every row at once (an accelerator, where a row at a time would
    wait on every probe): each probe's mass is sum(max(p - floor, 0)) + floor x count(p > floor), the
    count as the sum of the signs of the same temporary (p - floor is 0 only where p == floor, under
    IEEE subtraction), which needs no masked copy and no integer reduction."""
    below = torch.zeros_like(target, dtype=torch.long)  # ladder index whose mass above is < target
    reach = torch.full_like(below, ladder.size(1) - 1)  # ladder index whose mass above reaches it
    above_hi, above_lo = above_top.clone(), total.clone()  # the exact masses above ladder[below] and ladder[reach]
    positions = torch.arange(ladder.size(1), device=probs.device)  # [L]
    step = 0
    while bool((reach - below > 1).any()):
        width = reach - below
        start, end = sampled.gather(1, below), sampled.gather(1, reach)
        scale = (above_lo - above_hi) / (end - start).clamp(min=1e-300)
        estimate = above_hi + (sampled - start) * scale  # [b, L] the target's estimated place
        inside = (positions > below) & (positions < reach)
        guess = below + ((estimate < target) & inside).sum(-1, keepdim=True).clamp(min=1)  # last estimated below it
        guess = torch.minimum(torch.maximum(guess, below + width // 16), reach - width // 16)
        guess = torch.where(width > 2 ** max(10 - step, 0), (below + reach) // 2, guess).clamp(min=below + 1)
        probe = torch.minimum(guess, reach - 1).clamp(min=0)  # rows already done probe harmlessly (below + 1 = reach)
        floor = ladder.gather(1, probe)  # [b, 1]
        excess = (probs - floor).clamp_(min=0)  # [b, V]
        mass = excess.sum(-1, keepdim=True).double() + floor.double() * excess.sign_().sum(-1, keepdim=True).double()
        reached = mass >= target
        live = width > 1
        reach = torch.where(live & reached, probe, reach)
        above_lo = torch.where(live & reached, mass, above_lo)
        below = torch.where(live & ~reached, probe, below)
        above_hi = torch.where(live & ~reached, mass, above_hi)
        step += 1
    lo, hi = ladder.gather(1, reach), ladder.gather(1, below)
    row, column = ((probs > lo) & (probs <= hi)).nonzero(as_tuple=True)  # [n] each, row-major
    return hi, above_hi, row, column


class _Edge(NamedTuple):
    """A wide nucleus of `b` rows without a `[b, V]` copy: every token above `hi` `[b, 1]` is in it
    (their mass `above_hi`, float64 `[b, 1]`), and of the `[n]` tokens of the edge's bracket (`row`,
    `column`, float64 `value`, sorted by row), those marked `kept`; nothing else is. `total`: the
    rows' whole masses (float64 `[b, 1]`)."""

    total: torch.Tensor
    hi: torch.Tensor
    above_hi: torch.Tensor
    row: torch.Tensor
    column: torch.Tensor
    value: torch.Tensor
    kept: torch.Tensor

    def mass(self) -> torch.Tensor:
        """`[b]` float64: each row's nucleus mass."""
        kept = self.row[self.kept]
        return self.above_hi.squeeze(1).index_add(0, kept, self.value[self.kept])

    def contains(self, rows: torch.Tensor, tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """`[m]` bool: whether `tokens` `[m]` (of probability `probs` `[m]`) are in the nucleus of `rows` `[m]`."""
        drawn = torch.full_like(self.hi.squeeze(1), -1, dtype=torch.long)  # [b] the token asked of each row
        drawn[rows] = tokens
        member = torch.zeros_like(drawn, dtype=torch.bool)
        member[self.row[self.kept & (self.column == drawn[self.row])]] = True
        return (probs > self.hi.squeeze(1)[rows]) | member[rows]

    def restrict_(self, probs: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`probs` `[m, V]`, the rows `rows` `[m]` of the nucleus (all, in order, when None), with
        everything outside it set to 0, in place."""
        hi = self.hi if rows is None else self.hi[rows]
        if probs.device.type in ROW_AT_A_TIME:  # stays in cache, and needs no [m, V] mask
            for row, value in zip(probs, hi.squeeze(1).tolist()):
                torch.threshold(row, value, 0.0, out=row)
        else:
            probs.masked_fill_(probs <= hi, 0.0)
        keep = self.kept
        where = self.row
        if rows is not None:  # the bracket's rows among `rows`, renumbered
            renumber = torch.full_like(self.hi.squeeze(1), -1, dtype=torch.long)
            renumber[rows] = torch.arange(rows.numel(), device=rows.device)
            where = renumber[self.row]
            keep = keep & (where >= 0)
        probs[where[keep], self.column[keep]] = self.value[keep].to(probs.dtype)
        return probs


def _sorted_nucleus(probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus by one stable sort (ties by vocabulary index): each row of `probs` `[b, V]` sorted
    descending, zeroed past the first token whose predecessors hold `target` `[b, 1]`, and the
    sorted tokens' vocabulary indices, `[b, V]` each."""
    values, indices = probs.sort(dim=-1, descending=True, stable=True)
    before = values.cumsum(-1, dtype=torch.float64) - values  # the mass before each token
    return values * (before < target), indices


def _wide_edge(probs: torch.Tensor, top: torch.Tensor, above_top: torch.Tensor, target: torch.Tensor, total: torch.Tensor) -> _Edge:
    """The nucleus of rows of `probs` `[b, V]` whose `CANDIDATES` most probable tokens hold less than
    `target` `[b, 1]` (float64), each bounded by `top` `[b, 1]` (mass `above_top` above it, < target).

    Every token above the bracket's `hi` is in the nucleus (their mass is below the target) and none at
    or below `lo` is (the mass above `lo` reaches it); only the tokens in between are sorted, which
    resolves the edge exactly (ties by vocabulary index)."""
    rows, vocab = probs.shape
    if vocab <= _SORT_BELOW:  # a small vocabulary: one sort costs less than the search's passes
        values, indices = _sorted_nucleus(probs, target)  # [b, V] each; ties by index, as below
        row = torch.arange(rows, device=probs.device).repeat_interleave(vocab)
        hi = torch.full_like(top, float("inf"))  # every token is in the "bracket"
        return _Edge(total, hi, torch.zeros_like(target), row, indices.reshape(-1), values.reshape(-1).double(), (values > 0).reshape(-1))
    hi, above_hi, row, column = _edge_bracket(probs, top, above_top, target, total)
    # the bracket's tokens, sorted by row, then by probability descending (stably: ties by index)
    values = probs[row, column]
    if values.dtype == torch.float32:  # one sort by row, then probability descending: non-negative float32 bits order as their values
        descending = 0x7FFFFFFF - values.view(torch.int32).long()  # [n] in [0, 2**31)
        order = ((row << 31) | descending).sort(stable=True).indices  # stable: ties stay in index order
    else:  # (the trainer's float64) by probability, then stably by row
        order = values.sort(descending=True, stable=True).indices
        order = order[row[order].sort(stable=True).indices]
    row, column, values = row[order], column[order], values[order].double()
    before = values.cumsum(0) - values  # [n] mass of the bracket tokens before each one, over all rows
    counts = torch.bincount(row, minlength=rows)
    starts = counts.cumsum(0) - counts  # [b] each row's first position
    if row.numel():
        before = before - before[starts.clamp(max=row.numel() - 1)][row]  # within its row
    kept = above_hi.squeeze(1)[row] + before < target.squeeze(1)[row]  # its predecessors hold less than the target
    return _Edge(total, hi, above_hi, row, column, values, kept)


def _truncate(values: torch.Tensor, top_p: float) -> torch.Tensor:
    """Candidates `values` `[b, K]` (probabilities, descending) with everything after each row's
    top-p nucleus set to zero; a row whose candidates hold less than `top_p` keeps them all."""
    mass = values.cumsum(-1, dtype=torch.float64)  # [b, K]
    target = mass[:, -1:].clamp(max=top_p)
    last = (mass < target).sum(-1, keepdim=True).clamp(max=values.size(1) - 1)  # the first to reach top_p
    return values * (torch.arange(values.size(1), device=values.device) <= last)


class _Nucleus(NamedTuple):
    """The top-p nuclei of `[B, V]` rows: `narrow`, one `(rows [n], values [n, K], indices [n, K])`
    per candidate level that held some rows' nuclei (truncated candidates); the other rows' nuclei are
    `edge` (a `_Edge` of rows `wide` `[m]`, in order), or there are none (None)."""

    narrow: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    wide: torch.Tensor
    edge: Optional[_Edge]


def _find_nucleus(probs: torch.Tensor, top_p: float, candidates: Union[int, tuple[int, ...]]) -> _Nucleus:
    """Each row's nucleus, looked for among its most probable tokens at each of `candidates`' sizes in
    turn (a partial `topk`), then by `_wide_edge`. A row skips a size whose candidates cannot hold the
    target: those already counted plus the rest at the largest value not counted (`top`) fall short,
    as in a flat row, where even `CANDIDATES[0]` times its largest probability does. A row that skipped
    a size tries a larger one only if its strided sample (no heavy head to miss: its largest value is
    small) puts the nucleus within `_GUESS_SLACK` times that size: the bound alone is loose there.
    Where rows are searched a row at a time (a CPU), vocabularies from `_ONE_SIZE_FROM` on try the
    first size alone: the search costs less there than a second, larger `topk` (`benchmarks/NOTES.md`)."""
    levels = (candidates,) if isinstance(candidates, int) else candidates
    rows, vocab = probs.shape
    if probs.device.type in ROW_AT_A_TIME and vocab >= _ONE_SIZE_FROM:
        levels = levels[:1]
    total = probs.sum(-1, keepdim=True).double()  # [B, 1]
    target = total.clamp(max=top_p)  # [B, 1]: top_p, or the row's mass if less
    if vocab <= _SORT_ALL_BELOW:  # a tiny vocabulary: one stable sort of each row costs least
        every = torch.arange(rows, device=probs.device)
        return _Nucleus([(every, *_sorted_nucleus(probs, target))], every[:0], None)
    top = probs.amax(-1, keepdim=True)  # [B, 1]: no token outside the candidates so far is above it
    above_top = torch.zeros_like(target)  # [B, 1]: the mass strictly above `top`
    held = torch.zeros_like(target)  # [B, 1]: the candidates' mass so far
    counted = torch.zeros_like(target)  # [B, 1]: how many candidates that is
    pending = torch.arange(rows, device=probs.device)  # rows without a nucleus yet
    stride = max(1, vocab // SAMPLE)
    narrow = []
    for size in levels:
        size = min(size, vocab)
        hopeful = (held[pending] + (size - counted[pending]) * top[pending].double() >= target[pending]).squeeze(1)
        flat = hopeful & (counted[pending] == 0).squeeze(1) & (size != levels[0])
        if bool(flat.any()):  # the sample's guess: its sorted values, times the stride, summed up to the target
            rows_flat = pending[flat]
            sampled = probs[rows_flat, ::stride].sort(-1, descending=True).values.cumsum(-1, dtype=torch.float64) * stride
            guess = stride * (1 + (sampled < target[rows_flat]).sum(-1))  # [f]
            hopeful[flat.nonzero().squeeze(1)] = guess <= _GUESS_SLACK * size
        tried = pending[hopeful]
        if tried.numel():
            values, indices = (probs if tried.numel() == rows else probs[tried]).topk(size, dim=-1)  # [t, K], descending
            mass = values.sum(-1, keepdim=True, dtype=torch.float64)  # [t, 1]
            covered = (mass >= target[tried]).squeeze(1)  # [t]
            if bool(covered.any()):
                narrow.append((tried[covered], _truncate(values[covered], top_p), indices[covered]))
            # the rest: every token not among these candidates is at most the smallest of them
            left = tried[~covered]
            values, mass = values[~covered], mass[~covered]
            top[left], held[left], counted[left] = values[:, -1:], mass, float(size)
            above_top[left] = torch.where(values > values[:, -1:], values, 0.0).sum(-1, keepdim=True, dtype=torch.float64)
            pending = torch.cat([pending[~hopeful], left]).sort().values
        if not pending.numel():
            break
    edge = None
    if pending.numel():
        whole = pending.numel() == rows
        edge = _wide_edge(probs if whole else probs[pending], top[pending], above_top[pending], target[pending], total[pending])
    return _Nucleus(narrow, pending, edge)


def nucleus(probs: torch.Tensor, top_p: float, candidates: Union[int, tuple[int, ...], None] = None) -> torch.Tensor:
    """`probs` `[B, V]` (rows summing to 1 up to rounding) with everything outside each row's top-p
    nucleus set to 0, without a sort of the vocabulary (`candidates`: the sizes of the partial top-k
    looked among first; `CANDIDATES` by default). `draw` finds the same nuclei, and draws from them
    without this form."""
    return nucleus_(probs.clone(), top_p, candidates)


def nucleus_(probs: torch.Tensor, top_p: float, candidates: Union[int, tuple[int, ...], None] = None) -> torch.Tensor:
    """`nucleus`, in place: `probs` itself, zeroed outside each row's nucleus."""
    found = _find_nucleus(probs, top_p, CANDIDATES if candidates is None else candidates)
    if found.edge is not None:
        if found.wide.numel() == probs.size(0):
            found.edge.restrict_(probs)
        else:
            probs[found.wide] = found.edge.restrict_(probs[found.wide])
    for rows, values, indices in found.narrow:  # the kept candidates' values (copies), zeros past the nucleus
        if rows.numel() == probs.size(0):
            probs.zero_().scatter_(1, indices, values)
        else:
            probs[rows] = 0.0
            probs[rows[:, None], indices] = values
    return probs


def truncation_mask(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> Optional[torch.Tensor]:
    """`[N, V]` bool: the tokens `draw` can draw from `logits` `[N, V]` (already divided by the
    temperature) under top-k, then top-p, by the same rules; None when neither truncates. For the
    trainer's log-probs under the distribution the sampler draws from (`truncated_logps`)."""
    keep = None
    if 0 < top_k < logits.size(-1):
        keep = logits >= logits.topk(top_k, dim=-1).values[:, -1:]  # transformers' rule: ties at the k-th stay
    if top_p < 1.0:
        probs = (logits if keep is None else logits.masked_fill(~keep, float("-inf"))).float().softmax(-1)
        keep = nucleus_(probs, top_p) > 0
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


def _draw_in(probs: torch.Tensor, edge: _Edge, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from the nuclei `edge` of rows `probs` `[b, V]`: tokens `[b]` and float32 log-probs `[b]`
    under each nucleus's renormalized distribution.

    By rejection: a token drawn from the whole row, kept if it is in the nucleus, is drawn from the
    nucleus exactly (the row's distribution conditioned on it), and a nucleus holds top_p of the mass,
    so most rows take one draw and no `[b, V]` copy. A row still without a token after `REDRAWS`
    rounds, or whose nucleus holds under half its mass, draws from its nucleus copied out instead."""
    mass = edge.mass()  # [b] float64
    worth = mass >= 0.5 * edge.total.squeeze(1)  # [b] rows whose draws are mostly kept
    tokens = torch.empty(probs.size(0), dtype=torch.long, device=probs.device)
    todo = worth.nonzero().squeeze(1)  # [m]
    for _ in range(REDRAWS):
        if not todo.numel():
            break
        source = probs if todo.numel() == probs.size(0) else probs[todo]
        drawn, _ = inverse_cdf(source, generator)  # [m]
        inside = edge.contains(todo, drawn, source.gather(1, drawn[:, None]).squeeze(1))
        tokens[todo[inside]] = drawn[inside]
        todo = todo[~inside]
    pending = ~worth
    pending[todo] = True
    if bool(pending.any()):
        rows = pending.nonzero().squeeze(1)
        tokens[rows], _ = inverse_cdf(edge.restrict_(probs[rows], rows), generator)
    chosen = probs.gather(1, tokens[:, None]).squeeze(1).double()  # [b]
    return tokens, (chosen.log() - mass.log()).float()


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
    if top_p >= 1.0:
        return _draw_full(probs, generator)
    found = _find_nucleus(probs, top_p, CANDIDATES)
    if len(found.narrow) == 1 and found.edge is None:  # every row's nucleus among the same candidates
        return _draw_among(*found.narrow[0][1:], generator)
    if not found.narrow:
        return _draw_in(probs, found.edge, generator)
    tokens = torch.empty(probs.size(0), dtype=torch.long, device=probs.device)
    logprobs = torch.empty(probs.size(0), dtype=torch.float32, device=probs.device)
    for rows, values, indices in found.narrow:
        tokens[rows], logprobs[rows] = _draw_among(values, indices, generator)
    if found.edge is not None:
        tokens[found.wide], logprobs[found.wide] = _draw_in(probs[found.wide], found.edge, generator)
    return tokens, logprobs
