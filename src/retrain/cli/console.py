"""A quiet console for `retrain` runs: what a user cannot act on is silenced, one message at a time.

Each filter names the exact message it drops and why, so everything else (a new warning, a real
problem) still shows. Applied by the command line only: a Python program that uses retrain keeps
its own warning and logging settings.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

# Warnings about retrain's own design, which a user of retrain cannot change.
_WARNINGS = (
    # RLTrainer always defines validation_step (for `retrain validate` and val splits); without val data
    # there is nothing to skip that the user asked for.
    r"You defined a `validation_step` but have no `val_dataloader`",
    # Manual optimization: a checkpoint after update K holds the state after update K, which is what a
    # resume needs (exact resume is tested); the warning's 12-line example is for other modules.
    r"Using ModelCheckpoint with manual optimization",
    # The frozen reference policy is in eval mode on purpose.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Inside Lightning's own pytree helper (torch 2.13 deprecation); nothing to do for a user.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)

# Lightning's info lines that repeat what retrain prints itself or advertise something.
_LOG_PREFIXES = (
    "💡 Tip:",  # litlogger advertisement
    "TPU available:",
    "Seed set to",  # the seed is in the config that Lightning saves next to the logs
    "`Trainer.fit` stopped: `max_steps=",  # retrain's summary says how many steps ran
)


class _DropKnownLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().lstrip()
        return not message.startswith(_LOG_PREFIXES)


def quiet_console() -> None:
    """Silence the known noise of a run (idempotent)."""
    for pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropKnownLines) for f in handler.filters):
                handler.addFilter(_DropKnownLines())
    # W&B's banner and warnings (an "anonymous" setting Lightning passes, a git root it cannot find)
    # and its ANSI colours in logs; retrain prints where the run went when fit ends. WANDB_SILENT=false
    # brings them back.
    os.environ.setdefault("WANDB_SILENT", "true")


def quiet_transformers_progress() -> None:
    """No per-file bars while the tiny local model is written and read back (instant, and not a download)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def outputs_summary(trainer: Any) -> str:
    """Where a finished run's outputs went: checkpoints, W&B run (and how to upload an offline one), CSV."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    lines = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            lines.append(f"  checkpoints: {_shown(callback.dirpath)}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run_dir = Path(logger.experiment.dir).parent  # .../wandb/<run>/files -> the run directory
            offline = bool(getattr(logger.experiment, "offline", False))
            lines.append(f"  W&B run: {_shown(run_dir)}" + (f" (offline; upload with `wandb sync {run_dir}`)" if offline else ""))
        elif isinstance(logger, CSVLogger):
            lines.append(f"  metrics CSV: {_shown(Path(logger.log_dir) / 'metrics.csv')}")
    return "retrain: outputs\n" + "\n".join(lines) if lines else ""


def _shown(path: Any) -> str:
    """`path` relative to the working directory when it is inside it (as the config wrote it)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(resolved)


def drop_unset_wandb_options(trainer: Any) -> None:
    """Lightning's WandbLogger passes `anonymous=None` to `wandb.init` when the user set nothing, and
    W&B warns that the (deprecated) setting has no effect: the option is dropped when it is None."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(logger, WandbLogger) and isinstance(init, dict) and init.get("anonymous", "set") is None:
            del init["anonymous"]
