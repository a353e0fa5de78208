"""`retrain`: the command line, a `LightningCLI`.

    retrain fit --config configs/quickstart.yaml
    retrain fit --config configs/quickstart.yaml --ckpt_path last     # resume
    retrain fit --help / --print_config
    retrain fit --model.help retrain.GRPOTrainer                       # every option of a class
    retrain export --config configs/quickstart.yaml --ckpt_path CKPT --output_dir DIR   # HF directory
    retrain --version

Every component is chosen in YAML by `class_path` (any importable class) and configured by its
constructor's typed arguments; jsonargparse rejects a wrong key or type, naming it, before anything
is instantiated. The working directory is importable, so `class_path: my_env.MyEnvironment` finds
`./my_env.py`. A mistake in a config ends in one short report and exit status 2
(`retrain.cli.errors`); `RETRAIN_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from argparse import ArgumentError
from importlib import metadata
from typing import Any

from retrain.cli.console import drop_unset_wandb_options, outputs_summary, quiet_console, quiet_transformers_progress
from retrain.cli.errors import check_config_files, config_files, debug_enabled, instantiation_error, option_keys, report_for
from retrain.core.errors import ConfigError

EXPORT_HELP = "Export a trained policy as a Hugging Face directory: retrain export --help"
FIT_HELP = (
    "Train a policy with RL. The model is an RL algorithm chosen by class_path: retrain.GRPOTrainer or "
    "retrain.RLOOTrainer (every option of one: retrain fit --model.help retrain.GRPOTrainer); the data is "
    "retrain.PromptDataModule (retrain fit --data.help retrain.PromptDataModule). "
    "Resume with --ckpt_path last. After training, `retrain export` writes the policy as a Hugging Face directory."
)


def _cli_class() -> type:
    """`RetrainCLI`, made on first use: Lightning (and torch) load only when a command needs them."""
    from lightning.pytorch.cli import LightningCLI

    class RetrainCLI(LightningCLI):
        """LightningCLI with retrain's defaults: RL modules chosen by class_path, prompt data modules,
        and config mistakes raised as exceptions (retrain.cli.errors reports them)."""

        def parse_arguments(self, parser: Any, args: Any) -> None:
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                subcommand = next((a for a in (args or sys.argv[1:]) if not a.startswith("-")), None)
                subparser = getattr(self, "_subcommand_parsers", {}).get(subcommand, parser)
                err.retrain_keys = option_keys(subparser)  # type: ignore[attr-defined]  (for "did you mean")
                raise

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
            from lightning.pytorch.callbacks import ProgressBar

            from retrain.callbacks.progress import RLProgressBar

            configured = list(config.get("callbacks") or []) + list(callbacks)
            if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in configured):
                callbacks = [*callbacks, RLProgressBar()]
            return super()._instantiate_trainer(config, callbacks)

        def after_instantiate_classes(self) -> None:
            policy = getattr(self.model, "policy_config", None)
            if policy is not None and policy.tiny is not None:
                quiet_transformers_progress()
            drop_unset_wandb_options(self.trainer)

        def after_fit(self) -> None:
            if self.trainer.is_global_zero:
                print(outputs_summary(self.trainer))

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except Exception as err:
                converted = instantiation_error(err)
                if converted is None or converted is err:
                    raise
                raise converted from err

    return RetrainCLI


def export_command(args: list[str]) -> None:
    """`retrain export`: write a checkpoint's policy as a `save_pretrained` directory (`retrain.export`)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="retrain export", exit_on_error=False,
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
        raise ConfigError(str(err)) from err
    print(f"retrain: exported the policy of {parsed.ckpt_path} to {directory}")


def version_text() -> str:
    """`retrain --version`: retrain's version and the libraries a bug report needs (read without importing them)."""
    parts = []
    for package in ("torch", "lightning", "transformers", "trl"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} not installed")
    from retrain import __version__

    return f"retrain {__version__} ({', '.join(parts)}; Python {sys.version.split()[0]})"


def run(args: Optional[list[str]] = None) -> None:
    """Run one `retrain` command (`args`, or the process's arguments); config mistakes raise (see `main`)."""
    argv = sys.argv[1:] if args is None else list(args)
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass field docs -> --help
    check_config_files(config_files(argv))
    if argv and argv[0] == "export":  # before LightningCLI, whose subcommands are the Trainer's methods
        export_command(argv[1:])
        return
    from retrain.data.datamodule import PromptDataModule

    cli_class = _cli_class()
    quiet_console()
    cli_class(
        model_class=None,
        datamodule_class=PromptDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # Lightning's model summary would list internal modules and an all-zero FLOPs column; the RL
        # module prints its own one-line summary of the policy when fit starts.
        trainer_defaults={"log_every_n_steps": 1, "max_epochs": -1, "enable_model_summary": False},
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False, "epilog": EXPORT_HELP, "fit": {"description": FIT_HELP}},
        args=args,
    )


def main(args: Optional[list[str]] = None) -> None:
    """The `retrain` console script. A user's mistake (retrain.cli.errors) prints one report and exits
    with its status (2 for configuration, 1 for a fault that stopped training); a bug keeps its traceback."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in (["--version"], ["-V"]):
        print(version_text())
        return
    try:
        run(args)
    except Exception as err:
        report = None if debug_enabled() else report_for(err, getattr(err, "retrain_keys", ()))
        if report is None:
            raise
        command = "retrain" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
        sys.stderr.flush()
        print(report.render(command, config_files(argv)), file=sys.stderr)
        sys.exit(report.exit_code)


if __name__ == "__main__":
    main()
