"""Which rollouts share a forward/backward pass: fixed row counts, or a token budget per pass.

A plan is a list of passes, each a list of row indices into the step's rollouts. The step's gradient
is the sum of the passes' (each weighted by its share, `RLTrainer.micro_batch_weight`), so any
partition of the rows gives the same update; the plan decides only memory and wasted work. Under a
token budget the rows go longest first, so rows of similar length share a pass and each pass, cut
to its own longest prompt and completion (`Experience.trimmed`), carries little padding.
"""

from __future__ import annotations

from typing import Optional, Sequence


def plan_micro_batches(
    prompt_lengths: Sequence[int],
    completion_lengths: Sequence[int],
    *,
    max_rows: Optional[int] = None,
    max_tokens: Optional[int] = None,
    packed: bool = False,
) -> list[list[int]]:
    """Partition rows into passes of at most `max_rows` rows and `max_tokens` tokens.

    A pass's tokens are what it computes on: the sum of its rows' lengths when `packed`, else its
    row count times (its longest prompt + its longest completion), the padded block it becomes. A
    row over `max_tokens` on its own gets a pass of its own. Without `max_tokens` the passes are
    consecutive slices of `max_rows` rows (all rows when both are None).
    """
    n = len(prompt_lengths)
    if max_tokens is None:
        size = max_rows or max(n, 1)
        return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
    order = sorted(range(n), key=lambda i: -(prompt_lengths[i] + completion_lengths[i]))  # stable: ties keep row order
    passes: list[list[int]] = []
    current: list[int] = []
    longest_prompt = longest_completion = total = 0
    for i in order:
        p, c = prompt_lengths[i], completion_lengths[i]
        grown_prompt, grown_completion = max(longest_prompt, p), max(longest_completion, c)
        cost = total + p + c if packed else (len(current) + 1) * (grown_prompt + grown_completion)
        if current and (cost > max_tokens or (max_rows is not None and len(current) >= max_rows)):
            passes.append(current)
            current, total = [], 0
            grown_prompt, grown_completion = p, c
        current.append(i)
        longest_prompt, longest_completion, total = grown_prompt, grown_completion, total + p + c
    if current:
        passes.append(current)
    return passes


def stretch_plan(plan: list[list[int]], passes: int) -> list[list[int]]:
    """`plan` with exactly `passes` passes (at least as many as it has), for ranks that must run the
    same number of backward passes (DDP's and FSDP2's collectives run in each): the passes with the
    most rows are halved first; when every pass is one row, the rest are empty (`[]`, a pass that
    contributes nothing but joins the collectives)."""
    plan = [list(rows) for rows in plan]
    while len(plan) < passes:
        widest = max(range(len(plan)), key=lambda i: len(plan[i]), default=None)
        if widest is None or len(plan[widest]) < 2:
            break
        rows = plan[widest]
        plan[widest : widest + 1] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return plan + [[] for _ in range(passes - len(plan))]
