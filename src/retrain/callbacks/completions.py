"""`CompletionsTable`: a table of sample completions in Weights & Biases every N steps."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger


class CompletionsTable(pl.Callback):
    """Log the trainer's latest sample completions (prompt, completion, reward) as a W&B table.

    Args:
        every_n_steps: log every this many optimizer steps (and at the last step).
        key: the table's name in W&B.
    """

    def __init__(self, every_n_steps: int = 50, key: str = "completions") -> None:
        if every_n_steps < 1:
            raise ValueError(f"CompletionsTable.every_n_steps must be >= 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.key = key

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        last = trainer.max_steps is not None and step >= trainer.max_steps
        if step % self.every_n_steps and not last:
            return
        samples = getattr(pl_module, "last_samples", [])
        if not samples:
            return
        rows = [[step, str(s["prompt"]), s["completion"], float(s["reward"])] for s in samples]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=self.key, columns=["step", "prompt", "completion", "reward"], data=rows, step=step)
