"""Checkpoint cadence in optimizer updates, when one generation makes several of them.

One training step makes `num_iterations x steps_per_generation` optimizer updates, so the global
step jumps by that much, and Lightning's `ModelCheckpoint(every_n_train_steps=n)` only saves when
the step lands on a multiple of n: with 3 updates per generation and n = 10, every 30 updates.
retrain aligns n to the multiple of the updates per generation nearest below it (at least one
generation), and says so, so checkpoints are as frequent as asked or a little more.
"""

from __future__ import annotations

from typing import Any, Iterable


def aligned_every_n(every_n: int, updates: int) -> int:
    """The checkpoint interval actually reachable: a multiple of `updates`, not above `every_n`
    (or one generation, when `every_n` is smaller than that).

    >>> aligned_every_n(10, 3), aligned_every_n(2, 4), aligned_every_n(8, 4)
    (9, 4, 8)
    """
    return max(updates, every_n // updates * updates)


def align_checkpoint_cadence(callbacks: Iterable[Any], updates: int) -> list[str]:
    """Align each `ModelCheckpoint`'s `every_n_train_steps` to `updates`; the messages to log."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    messages = []
    for callback in callbacks:
        # Lightning keeps the interval in this attribute only; ModelCheckpoint has no setter.
        every_n = getattr(callback, "_every_n_train_steps", 0) if isinstance(callback, ModelCheckpoint) else 0
        if every_n and every_n % updates:
            aligned = aligned_every_n(every_n, updates)
            callback._every_n_train_steps = aligned
            messages.append(
                f"retrain: ModelCheckpoint(every_n_train_steps={every_n}) saves every {aligned} optimizer updates instead: "
                f"each generation makes {updates} (num_iterations x steps_per_generation), so the step count only "
                f"lands on multiples of {updates}."
            )
    return messages
