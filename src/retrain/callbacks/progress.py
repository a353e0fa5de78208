"""`RLProgressBar`: Lightning's progress bar, labelled for an RL run.

Lightning's bar counts epochs (`Epoch 0/-2` with the endless prompt stream, whose `max_epochs` is
-1) and shows the logger's version (`v_num: 87_0`); an RL run has neither to show. The bar counts
optimizer updates against `trainer.max_steps` and shows the reward, as before. The Rich bar is used
where `rich` is installed (as Lightning does), else the tqdm one.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

DESCRIPTION = "train"


class _WithoutVersion:
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        return items


class RichRLProgressBar(_WithoutVersion, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return DESCRIPTION


class TQDMRLProgressBar(_WithoutVersion, TQDMProgressBar):
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(DESCRIPTION)


def RLProgressBar() -> pl.callbacks.ProgressBar:
    """The progress bar retrain's command line uses (Rich when available)."""
    return RichRLProgressBar() if _RICH_AVAILABLE else TQDMRLProgressBar()
