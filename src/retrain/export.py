"""Export the trained policy as a Hugging Face `save_pretrained` directory.

    retrain export --config config.yaml --ckpt_path out/checkpoints/last.ckpt --output_dir exported
    retrain export --ckpt_path out/checkpoints/last.ckpt --output_dir exported --merge_lora false

or, during training, the `retrain.callbacks.ExportPolicy` callback at the end of `fit`. The export
loads back with `AutoModelForCausalLM.from_pretrained(directory)` and `AutoTokenizer.from_pretrained`:

- a full fine-tune: the model's weights and config, and the tokenizer;
- a LoRA policy with `merge_lora=True` (the default): the adapter merged into the base weights, a plain
  model that needs no PEFT to load;
- a LoRA policy with `merge_lora=False`: the adapter alone (`adapter_config.json`,
  `adapter_model.safetensors`) and the tokenizer. `AutoModelForCausalLM.from_pretrained` (transformers'
  PEFT integration) and `peft.AutoPeftModelForCausalLM` load it on top of the base model, which must
  still be where `base_model_name_or_path` in `adapter_config.json` points: a local base directory is
  written there as an absolute path, a hub id as it is.

Checkpoints are single `.ckpt` files or the sharded directories that FSDP (`state_dict_type="sharded"`)
and `ModelParallelStrategy` (`save_distributed_checkpoint=True`) write with `torch.distributed.checkpoint`;
those are consolidated on CPU in one process, reading only the policy's tensors (no optimizer state).

An export directory carries `retrain_export.json` (what was exported, from where). Exporting again to
the same directory replaces it; any other directory that is not empty is left alone, with an error.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from retrain.models.loading import PolicyConfig, is_adapter_model, load_policy, load_tokenizer

POLICY_PREFIX = "policy."
MARKER = "retrain_export.json"
_DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint
_LIGHTNING_EXTRA = "meta.pt"  # what Lightning keeps beside the shards: step, hyper-parameters, ...


# ---------------------------------------------------------------------------------- from a module


def export_policy(
    module: Any, directory: Union[str, Path], merge_lora: bool = True, *, state_dict: Optional[dict[str, torch.Tensor]] = None,
    source: Optional[dict[str, Any]] = None,
) -> Path:
    """Write `module`'s policy and tokenizer to `directory` with `save_pretrained`; return the directory.

    Args:
        module: an `RLTrainer` (anything with `policy`, `tokenizer` and `policy_config`) whose policy
            is loaded.
        directory: where to write; replaced if it holds an earlier export, refused if it holds
            anything else.
        merge_lora: for a LoRA policy, write the adapter merged into the base weights (True) or the
            adapter alone (False). Ignored for a full fine-tune. The module's own policy is never
            changed: merging happens on a copy.
        state_dict: the policy's full weights, when the module's own are sharded across ranks (see
            `gather_policy_state`); the policy is then rebuilt on CPU from `policy_config` with them.
        source: extra provenance for `retrain_export.json` (e.g. the checkpoint path and step).
    """
    policy, tokenizer = getattr(module, "policy", None), getattr(module, "tokenizer", None)
    if policy is None or tokenizer is None:
        raise ValueError("export_policy: the module has no policy loaded yet (call configure_model() first).")
    policy_config = getattr(module, "policy_config", None)
    owned = False  # whether `policy` is a copy that may be changed
    if state_dict is not None:
        policy, owned = _rebuild_policy(policy_config, state_dict), True
    return _export(policy, tokenizer, policy_config, Path(directory), merge_lora, owned, source)


def gather_policy_state(trainer: Any, module: Any) -> Optional[dict[str, torch.Tensor]]:
    """The policy's full weights on CPU when training shards them (FSDP, FSDP2/`ModelParallelStrategy`);
    None when every rank holds whole weights. A collective: every rank must call it; only rank 0 gets
    the tensors (the others get an empty dict)."""
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    model = module if model is None else model
    if not _is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _policy_entries(full)


# ---------------------------------------------------------------------------------- from a checkpoint


def export_checkpoint(
    checkpoint_path: Union[str, Path],
    config: Union[str, Path, Any, None],
    directory: Union[str, Path],
    merge_lora: bool = True,
) -> Path:
    """Export the policy stored in a Lightning checkpoint; return the export directory.

    Args:
        checkpoint_path: a `.ckpt` file, or a sharded checkpoint directory (FSDP / ModelParallelStrategy,
            `torch.distributed.checkpoint` format).
        config: how the policy was built: the LightningCLI config file of the run (the user's
            `--config`, or the `config.yaml` Lightning saves in the log directory), an `RLTrainer`
            instance, or None to take the policy settings stored in the checkpoint's hyper-parameters.
            Relative paths in it (e.g. `policy.name_or_path`) are resolved against the working
            directory, as in training.
        directory: where to write (see `export_policy`).
        merge_lora: merge a LoRA adapter into the base weights (True) or export the adapter alone.
    """
    path = Path(checkpoint_path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    # A checkpoint is unpickled in full (weights_only=False): export only checkpoints you trust.
    checkpoint = _read_checkpoint(path)  # for a file, memory-mapped: tensors are read only when used
    meta = checkpoint if not path.is_dir() else _sharded_meta(path)
    if config is None:
        policy_config = _policy_config_from_hparams(meta.get("hyper_parameters"), path)
    elif isinstance(config, (str, Path)):
        policy_config = module_from_config(config).policy_config
    else:
        policy_config = config.policy_config
    # Only the policy is built (no reference copy, no trainer): the checkpoint's weights replace its own.
    policy, tokenizer = load_policy(policy_config), load_tokenizer(policy_config)
    if path.is_dir():
        _load_sharded_policy(policy, path)
    else:
        _load_weights(policy, _policy_entries(_state_dict_of(checkpoint, path)), source=path)
    source = {"checkpoint": str(path.resolve()), "global_step": meta.get("global_step")}
    # The rebuilt policy is this function's own: a LoRA adapter is merged into it without a copy.
    return _export(policy, tokenizer, policy_config, Path(directory), merge_lora, True, source)


def module_from_config(config_path: Union[str, Path]) -> Any:
    """Instantiate the `model:` of a LightningCLI config file (the class at `class_path` with its
    `init_args`), through jsonargparse as `retrain fit` does. The other sections are not used."""
    import yaml
    from jsonargparse import ArgumentParser

    from retrain.trainer.module import RLTrainer

    path = Path(config_path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "model" not in raw and isinstance(raw.get("fit"), dict):  # `retrain --config x.yaml fit` style
        raw = raw["fit"]
    if "model" not in raw:
        raise ValueError(f"{path}: no `model:` section; give the config the run was trained with.")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(RLTrainer, "model", required=True)
    parsed = parser.parse_object({"model": raw["model"]})
    return parser.instantiate_classes(parsed).model


# ---------------------------------------------------------------------------------- internals


def _export(
    policy: torch.nn.Module, tokenizer: Any, policy_config: Optional[PolicyConfig], target: Path, merge_lora: bool,
    owned: bool, source: Optional[dict[str, Any]],
) -> Path:
    adapter = is_adapter_model(policy)
    merged = adapter and merge_lora
    if merged:
        if not owned:
            policy = _cpu_copy(policy, policy_config)
        policy = policy.merge_and_unload()
    info = {"format": "merged" if merged else "adapter" if adapter else "full", **(source or {})}
    with _replacing(target) as staging:
        with _inference_config(policy):
            policy.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _record_padding(staging, tokenizer)
        if adapter and not merge_lora:
            _point_adapter_at_base(staging, policy_config)
        (staging / MARKER).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return target


def _policy_entries(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The policy's tensors of a LightningModule state dict, without the `policy.` prefix."""
    entries = {}
    for key, value in state.items():
        key = key.replace("_forward_module.", "")  # a DDP-wrapped module's names, if any
        if key.startswith(POLICY_PREFIX):
            entries[key[len(POLICY_PREFIX):]] = value
    return entries


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return True  # FSDP2 / ModelParallelStrategy / tensor parallel
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _cpu_copy(policy: torch.nn.Module, policy_config: Optional[PolicyConfig]) -> torch.nn.Module:
    """A copy of `policy` on CPU, for merging without touching the trained one (or its GPU memory)."""
    if all(p.device.type == "cpu" for p in policy.parameters()) or policy_config is None:
        return copy.deepcopy(policy).cpu()
    return _rebuild_policy(policy_config, {k: v.detach().cpu() for k, v in policy.state_dict().items()})


def _rebuild_policy(policy_config: PolicyConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    policy = load_policy(policy_config)
    _load_weights(policy, state_dict)
    return policy


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Any = None) -> None:
    """Load `state` into `model` strictly, in the state's dtype; a key missing because its weight is tied
    to one that is present (e.g. `lm_head.weight` and the embeddings) is fine."""
    where = f" of {source}" if source is not None else ""
    if not state:
        raise ValueError(f"The checkpoint{where} holds no policy weights (no `policy.*` entries in its state dict).")
    _match_dtype(model, {v.dtype for v in state.values() if torch.is_tensor(v) and v.is_floating_point()})
    result = model.load_state_dict(state, strict=False)
    _check_keys(model, result.missing_keys, result.unexpected_keys, loaded=state.keys(), where=where)


def _match_dtype(model: torch.nn.Module, dtypes: set[torch.dtype]) -> None:
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
            model.to(dtype)


def _check_keys(model: torch.nn.Module, missing: Any, unexpected: Any, loaded: Any, where: str) -> None:
    params = model.state_dict()
    loaded_storage = {params[k].data_ptr() for k in loaded if k in params}
    missing = [k for k in missing if params[k].data_ptr() not in loaded_storage]
    if missing or unexpected:
        hint = (
            " The checkpoint and the policy settings disagree: was it trained with these `policy` settings "
            "(e.g. `lora` on or off, the same base model)?"
        )
        raise ValueError(f"The policy weights{where} do not fit the policy: missing {_few(missing)}; unexpected {_few(unexpected)}.{hint}")


def _few(names: Any, shown: int = 4) -> str:
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if path.is_dir():
        if not (path / _DCP_METADATA).is_file():
            raise ValueError(
                f"{path} is a directory but not a torch.distributed.checkpoint (no {_DCP_METADATA}): only FSDP / "
                "ModelParallelStrategy sharded checkpoints and .ckpt files are supported. For a DeepSpeed checkpoint, "
                "convert it first with lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict."
            )
        return {}  # the shards are read in place by `_load_sharded_policy`
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _sharded_meta(path: Path) -> dict[str, Any]:
    """What Lightning saves beside the shards (rank 0): step, hyper-parameters, ..."""
    extra = path / _LIGHTNING_EXTRA
    return torch.load(extra, map_location="cpu", weights_only=False) if extra.is_file() else {}


def _state_dict_of(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    for key in ("state_dict", "model"):  # Lightning Trainer / Fabric
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    raise ValueError(f"{path} has no `state_dict`: is it a Lightning checkpoint?")


def _load_sharded_policy(policy: torch.nn.Module, path: Path) -> None:
    """Consolidate the policy from a `torch.distributed.checkpoint` directory, in this process, on CPU.

    FSDP (`state_dict_type="sharded"`) stores the LightningModule's state dict under `model`,
    `ModelParallelStrategy` under `state_dict`; each rank's shards are read back into the full-size CPU
    tensors of `policy` in place (DCP reshards on load), so only the policy's weights are read.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    stored: dict[str, tuple[str, Any]] = {}  # policy key -> (top-level key, its storage metadata)
    for flat, meta in metadata.state_dict_metadata.items():
        route = (metadata.planner_data or {}).get(flat, (flat,))
        if len(route) == 2 and route[0] in ("model", "state_dict") and str(route[1]).startswith(POLICY_PREFIX):
            stored[str(route[1])[len(POLICY_PREFIX):]] = (route[0], meta)
    if not stored:
        raise ValueError(f"The sharded checkpoint {path} holds no policy weights (no `policy.*` entries under `model` or `state_dict`).")
    properties = [getattr(meta, "properties", None) for _, meta in stored.values()]
    _match_dtype(policy, {p.dtype for p in properties if p is not None and p.dtype.is_floating_point})
    params = policy.state_dict()
    target: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in params.items():
        if key in stored:
            target.setdefault(stored[key][0], {})[POLICY_PREFIX + key] = tensor
    missing = [k for k in params if k not in stored]
    unexpected = [k for k in stored if k not in params]
    _check_keys(policy, missing, unexpected, loaded=[k for k in params if k in stored], where=f" of {path}")
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(target, checkpoint_id=str(path), no_dist=True)


def _policy_config_from_hparams(hparams: Any, path: Path) -> PolicyConfig:
    policy = (hparams or {}).get("policy") if hasattr(hparams, "get") else None
    if policy is None:
        raise ValueError(f"{path} stores no `policy` hyper-parameters: give the run's config with --config.")
    if isinstance(policy, PolicyConfig):
        return policy
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--policy", type=PolicyConfig, required=True)
    return parser.instantiate_classes(parser.parse_object({"policy": dict(policy)})).policy


@contextlib.contextmanager
def _inference_config(policy: torch.nn.Module) -> Iterator[None]:
    """Save with the KV cache on (gradient checkpointing turns it off for training)."""
    config = getattr(policy, "config", None)
    before = getattr(config, "use_cache", None)
    if config is not None and before is False:
        config.use_cache = True
    try:
        yield
    finally:
        if config is not None and before is False:
            config.use_cache = before


def _record_padding(directory: Path, tokenizer: Any) -> None:
    """Keep the training tokenizer's left padding (batched generation needs it), which `save_pretrained`
    does not write when it was set after loading; drop the loader's offline flags it does write."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["padding_side"] = tokenizer.padding_side
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _point_adapter_at_base(directory: Path, policy_config: Optional[PolicyConfig]) -> None:
    """A local base directory becomes an absolute path in `adapter_config.json`, so the adapter loads
    from any working directory; the base's revision is recorded for a hub id."""
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        return
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    base = adapter_config.get("base_model_name_or_path") or (policy_config.name_or_path if policy_config else None)
    if base and Path(base).is_dir():
        adapter_config["base_model_name_or_path"] = str(Path(base).resolve())
    if policy_config is not None and policy_config.revision and not adapter_config.get("revision"):
        adapter_config["revision"] = policy_config.revision
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[Path]:
    """Write into a staging directory beside `target`, then swap it in: a failed export never leaves a
    half-written directory, and only an earlier export is ever replaced."""
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).is_file())):
        raise FileExistsError(
            f"{target} exists and is not an earlier retrain export (no {MARKER}); choose another output directory."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
