"""`BaseTrainer`: the contract every RL algorithm in retrain follows.

An algorithm is a `LightningModule` that also implements this mixin, so the same object trains
under `lightning.Trainer` (`retrain fit`, DDP/FSDP, checkpoints, loggers) and can be driven by hand:

    experience = algo.gather_experience(records)   # rollouts + rewards + advantages, no grad
    metrics = algo.step(experience)                # one optimizer update, no Lightning loop

The mixin never defines `train()`: a LightningModule is an `nn.Module`, and Lightning calls
`train(mode)`/`eval()` on it. The whole-loop entry points are `fit` and the awaitable `afit`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from retrain.core.records import PromptRecord

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from retrain.trainer.experience import Experience


class BaseTrainer(ABC):
    """Experience gathering, one update step, whole-run training and checkpoints."""

    @abstractmethod
    def gather_experience(self, records: Sequence[PromptRecord]) -> "Experience":
        """Roll out and score `records`; return the batch the loss trains on (computed without grad)."""

    @abstractmethod
    def compute_loss(self, experience: "Experience") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise on `experience` (with grad) and scalar metrics about it."""

    def step(self, experience: "Experience", optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, float]:
        """One optimizer update on `experience` outside a Lightning loop; returns the metrics.

        Without `optimizer`, the algorithm's own `configure_optimizers()` optimizer is made once and
        reused across calls.
        """
        if optimizer is None:
            optimizer = getattr(self, "_standalone_optimizer", None)
            if optimizer is None:
                optimizer = _first_optimizer(self.configure_optimizers())  # type: ignore[attr-defined]
                self._standalone_optimizer = optimizer
        optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.compute_loss(experience)
        loss.backward()
        self.before_standalone_step(optimizer)
        optimizer.step()
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}

    def before_standalone_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by `step` between backward and the optimizer step (e.g. to clip gradients)."""

    def fit(self, datamodule: "pl.LightningDataModule", ckpt_path: Optional[str] = None, **trainer_kwargs: Any) -> "pl.Trainer":
        """Train with a `lightning.Trainer` built from `trainer_kwargs`; returns the trainer."""
        import lightning.pytorch as pl

        trainer = pl.Trainer(**trainer_kwargs)
        trainer.fit(self, datamodule=datamodule, ckpt_path=ckpt_path)  # type: ignore[arg-type]
        return trainer

    async def afit(self, datamodule: "pl.LightningDataModule", ckpt_path: Optional[str] = None, **trainer_kwargs: Any) -> "pl.Trainer":
        """`fit` for asyncio callers: training runs in a worker thread, the caller's loop stays free."""
        return await asyncio.to_thread(self.fit, datamodule, ckpt_path, **trainer_kwargs)

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write a checkpoint: through the attached Lightning trainer (full loop state) if there is
        one, else the module's weights in Lightning's checkpoint layout (`state_dict`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            trainer.save_checkpoint(path)
        else:
            torch.save({"state_dict": self.state_dict()}, path)  # type: ignore[attr-defined]
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Load the weights of a checkpoint written by `save_checkpoint` or by Lightning."""
        self.configure_model()  # type: ignore[attr-defined]
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        self.load_state_dict(checkpoint["state_dict"])  # type: ignore[attr-defined]


def _first_optimizer(configured: Any) -> torch.optim.Optimizer:
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return configured["optimizer"]
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise TypeError(f"configure_optimizers() returned {type(configured).__name__}; expected an optimizer.")
