"""`RewardCurve`: records the mean reward of every step and the validation metric (held-out pass@1)
of every validation, and at the end of training saves them as PNGs and a JSON summary and prints a
short report.

The curve is part of the callback's checkpoint state, so a resumed run's picture and summary cover
the whole run, not only the part after the resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


def curve_summary(steps: list[int], values: list[float], fraction: float = 0.1) -> dict[str, Any]:
    """Mean of the first and last `fraction` of the values (at least one point each)."""
    if not values:
        return {"steps": 0}
    n = max(1, int(len(values) * fraction))
    first, last = sum(values[:n]) / n, sum(values[-n:]) / n
    return {
        "steps": len(values),
        "last_step": steps[-1],
        "window": n,
        "first_mean": first,
        "last_mean": last,
        "improvement_ratio": last / first if first > 0 else None,
    }


class RewardCurve(pl.Callback):
    """Plot and summarise a logged metric (by default the mean reward) over training steps.

    Args:
        output_dir: where `reward_curve.png`, `reward_curve.json` and (when validation ran)
            `validation_curve.png` are written.
        metric: the logged metric to follow.
        window_fraction: the share of steps averaged for the "first" and "last" means.
        val_metric: the validation metric to follow, at the step each validation ran after; a
            sanity check that covers the whole validation set (`num_sanity_val_steps: -1`) is
            recorded as step 0, the model before training.
    """

    def __init__(
        self, output_dir: str = "outputs", metric: str = "train/reward", window_fraction: float = 0.1,
        val_metric: Optional[str] = "val/pass@1",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metric = metric
        self.window_fraction = window_fraction
        self.val_metric = val_metric
        self.steps: list[int] = []
        self.values: list[float] = []
        self.val_steps: list[int] = []
        self.val_values: list[float] = []
        self.seconds = 0.0
        self._started: Optional[float] = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            self.steps.append(trainer.global_step)
            self.values.append(float(value))

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning drops what a sanity check logs; one over the whole validation set is the
        # starting point of the validation curve.
        if list(trainer.num_sanity_val_batches) == list(trainer.num_val_batches):
            self._record_validation(trainer, step=0)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record_validation(trainer, step=trainer.global_step)

    def _record_validation(self, trainer: pl.Trainer, step: int) -> None:
        value = trainer.callback_metrics.get(self.val_metric) if self.val_metric else None
        if value is not None:
            self.val_steps.append(step)
            self.val_values.append(float(value))

    def _elapsed(self) -> float:
        return self.seconds + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "values": self.values, "seconds": self._elapsed(),
                "val_steps": self.val_steps, "val_values": self.val_values}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict["steps"])
        self.values = list(state_dict["values"])
        self.val_steps = list(state_dict.get("val_steps", []))
        self.val_values = list(state_dict.get("val_values", []))
        self.seconds = float(state_dict.get("seconds", 0.0))

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write()

    @rank_zero_only
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Ctrl-C or a fault that stops training: the curve so far is still worth having (if any).
        if self.values:
            self._write(stopped_by=exception)

    def _write(self, stopped_by: Optional[BaseException] = None) -> None:
        summary = {"metric": self.metric, **curve_summary(self.steps, self.values, self.window_fraction)}
        summary["train_seconds"] = round(self._elapsed(), 1)
        if stopped_by is not None:
            summary["stopped_by"] = "KeyboardInterrupt" if isinstance(stopped_by, KeyboardInterrupt) else type(stopped_by).__name__
        record = {**summary, "curve": {"step": self.steps, "value": self.values}}
        if self.val_values:
            summary["validation"] = record["validation"] = {
                "metric": self.val_metric, "first": self.val_values[0], "last": self.val_values[-1],
                "first_step": self.val_steps[0], "last_step": self.val_steps[-1],
                "curve": {"step": self.val_steps, "value": self.val_values},
            }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "reward_curve.json").write_text(json.dumps(record, indent=1))
        if self.values:
            self._plot(self.output_dir / "reward_curve.png")
        if self.val_values:
            self._plot_validation(self.output_dir / "validation_curve.png")
        print(_report(summary, self.output_dir))

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        window = max(1, len(self.values) // 50)
        smooth = [sum(self.values[max(0, i - window + 1) : i + 1]) / len(self.values[max(0, i - window + 1) : i + 1]) for i in range(len(self.values))]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot(self.steps, self.values, color="#9ecae1", linewidth=0.8, label="per step")
        ax.plot(self.steps, smooth, color="#08519c", linewidth=1.8, label=f"moving mean ({window} steps)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(self.metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    def _plot_validation(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        ax.plot(self.val_steps, self.val_values, color="#a63603", linewidth=1.8, marker="o")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(self.val_metric)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def _report(summary: dict[str, Any], output_dir: Path) -> str:
    if not summary.get("steps"):
        return f"retrain: no '{summary['metric']}' values were logged."
    ratio = summary["improvement_ratio"]
    stopped = f" (stopped by {summary['stopped_by']} after step {summary['last_step']})" if "stopped_by" in summary else ""
    validation = summary.get("validation")
    held_out = (
        f"; {validation['metric']}: {validation['first']:.3f} at step {validation['first_step']} -> {validation['last']:.3f} "
        f"at step {validation['last_step']}, curve: {output_dir / 'validation_curve.png'}" if validation else ""
    )
    return (
        f"\nretrain{stopped}: {summary['steps']} steps in {summary['train_seconds']} s. {summary['metric']}: "
        f"first {summary['window']} steps {summary['first_mean']:.3f} -> last {summary['window']} steps "
        f"{summary['last_mean']:.3f}" + (f" ({ratio:.1f}x)" if ratio else "") + f". Curve: {output_dir / 'reward_curve.png'}"
        + held_out + "\n"
    )
