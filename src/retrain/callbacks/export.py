"""`ExportPolicy`: write the trained policy as a Hugging Face `save_pretrained` directory at the end of fit."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from retrain.export import export_policy, gather_policy_state


class ExportPolicy(pl.Callback):
    """At the end of `fit`, save the policy and its tokenizer so that
    `AutoModelForCausalLM.from_pretrained(directory)` loads it (see `retrain.export`).

    With sharded training (FSDP, `ModelParallelStrategy`) every rank takes part in gathering the full
    weights; rank 0 alone writes. An earlier export in `directory` is replaced.

    Args:
        directory: where the export is written.
        merge_lora: for a LoRA policy, merge the adapter into the base weights (True) or write the
            adapter alone (False), which loads on top of the base model.
        on: when to export; only at the end of fit for now.
    """

    def __init__(self, directory: str, merge_lora: bool = True, on: Literal["fit_end"] = "fit_end") -> None:
        if on != "fit_end":
            raise ValueError(f"ExportPolicy.on must be 'fit_end', got {on!r}.")
        self.directory = directory
        self.merge_lora = merge_lora
        self.on = on
        self.exported: Optional[Path] = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "policy", None) is None:
            raise TypeError(f"ExportPolicy works with retrain's RL trainers (a `policy` attribute), not {type(pl_module).__name__}.")
        state = gather_policy_state(trainer, pl_module)  # every rank: a collective when the weights are sharded
        error: Optional[BaseException] = None
        if trainer.is_global_zero:
            try:
                source = {"global_step": trainer.global_step, "exported_by": "retrain.callbacks.ExportPolicy"}
                self.exported = export_policy(pl_module, self.directory, self.merge_lora, state_dict=state, source=source)
                rank_zero_info(f"retrain: exported the policy to {self.exported}")
            except Exception as caught:  # the other ranks still reach the barrier
                error = caught
        trainer.strategy.barrier("retrain.ExportPolicy")
        if error is not None:
            raise error
