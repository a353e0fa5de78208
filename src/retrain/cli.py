"""`retrain`: the command line, a `LightningCLI`.

    retrain fit --config configs/quickstart.yaml
    retrain fit --config configs/quickstart.yaml --ckpt_path last     # resume
    retrain fit --help / --print_config
    retrain fit --model.help retrain.GRPOTrainer                       # every option of a class

Every component is chosen in YAML by `class_path` (any importable class) and configured by its
constructor's typed arguments; jsonargparse rejects a wrong key or type, naming it, before anything
is instantiated. The working directory is importable, so `class_path: my_env.MyEnvironment` finds
`./my_env.py`.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from retrain.data.datamodule import PromptDataModule


class RetrainCLI(LightningCLI):
    """LightningCLI with retrain's defaults: RL modules chosen by class_path, prompt data modules."""


def main(args: Optional[list[str]] = None) -> None:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass field docs -> --help
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    RetrainCLI(
        model_class=None,
        datamodule_class=PromptDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"log_every_n_steps": 1, "max_epochs": -1},
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    main()
