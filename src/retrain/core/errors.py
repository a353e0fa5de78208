"""The errors whose message is the whole report: what is wrong, where, the valid choices, the fix.

The command line prints such an error as one short block, with no traceback (`retrain.cli.errors`);
anything else is a bug and keeps its traceback. `ConfigError` is a mistake in the configuration or
the data, found before training starts (exit status 2); `TrainingFault` stops a run that was going
(a reward function raising with `on_error: raise`, a tool server that cannot be restarted; exit
status 1). Both keep the builtin base they always had, so `except ValueError` / `RuntimeError`
still catches them.
"""

from __future__ import annotations


class RetrainError(Exception):
    """Base of retrain's user-facing errors."""

    exit_code = 1


class ConfigError(RetrainError, ValueError):
    """The configuration (or a file it names) is invalid; the message names the key and the fix."""

    exit_code = 2


class TrainingFault(RetrainError, RuntimeError):
    """A fault during training that stops the run, handled as documented (the checkpoint is kept)."""


class ContextOverflowError(ConfigError):
    """A prompt (with its completion budget) does not fit in the model's context (`retrain.rollout.context`)."""
