"""`retrain`: the command line, a `LightningCLI`.

    retrain fit --config configs/quickstart.yaml
    retrain fit --config configs/quickstart.yaml --ckpt_path last     # resume
    retrain fit --help / --print_config
    retrain fit --model.help retrain.GRPOTrainer                       # every option of a class
    retrain export --config configs/quickstart.yaml --ckpt_path CKPT --output_dir DIR   # HF directory

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


EXPORT_HELP = "Export a trained policy as a Hugging Face directory: retrain export --help"


def export_command(args: list[str]) -> None:
    """`retrain export`: write a checkpoint's policy as a `save_pretrained` directory (`retrain.export`)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="retrain export",
        description=(
            "Write the policy of a training checkpoint (a .ckpt file, or a sharded FSDP / ModelParallelStrategy "
            "checkpoint directory) as a Hugging Face directory that AutoModelForCausalLM.from_pretrained loads. "
            "Relative paths in the config resolve against the working directory, as in training."
        ),
    )
    parser.add_argument(
        "--config", type=Optional[str], default=None,
        help="The run's config (the --config given to `retrain fit`, or the config.yaml Lightning saved in the log "
        "directory). Default: the policy settings stored in the checkpoint.",
    )
    parser.add_argument(
        "--ckpt_path", type=str, required=True,
        help="The checkpoint file or sharded checkpoint directory (unpickled in full: use checkpoints you trust).",
    )
    parser.add_argument("--output_dir", type=str, required=True, help="Where to write the export.")
    parser.add_argument(
        "--merge_lora", type=bool, default=True,
        help="For a LoRA policy: merge the adapter into the base weights (true) or write the adapter alone (false).",
    )
    parsed = parser.parse_args(args)

    from retrain.export import export_checkpoint

    try:
        directory = export_checkpoint(parsed.ckpt_path, parsed.config, parsed.output_dir, merge_lora=parsed.merge_lora)
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # the user's to fix: no traceback
        sys.exit(f"retrain export: error: {err}")
    print(f"retrain: exported the policy of {parsed.ckpt_path} to {directory}")


def main(args: Optional[list[str]] = None) -> None:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass field docs -> --help
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "export":  # before LightningCLI, whose subcommands are the Trainer's methods
        export_command(argv[1:])
        return
    RetrainCLI(
        model_class=None,
        datamodule_class=PromptDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"log_every_n_steps": 1, "max_epochs": -1},
        auto_configure_optimizers=False,
        parser_kwargs={"epilog": EXPORT_HELP},
        args=args,
    )


if __name__ == "__main__":
    main()
