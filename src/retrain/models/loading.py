"""Loading the policy and its tokenizer: a hub id or a local directory, through `transformers`.

The tiny local model takes the same path: it is built into a directory first, then loaded from it.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from typing import Literal, Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from retrain.core.errors import ConfigError
from retrain.models.tiny import TinyModelConfig, build_tiny_model

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """Train a LoRA adapter (through PEFT) instead of every weight.

    Attributes:
        r: adapter rank.
        alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter's input.
        target_modules: module names to adapt, or "all-linear".
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class PolicyConfig:
    """Which model to train and how to load it.

    Attributes:
        name_or_path: a Hugging Face hub id (``Qwen/Qwen2.5-0.5B-Instruct``) or a local directory.
        dtype: weight dtype to load in; "auto" keeps the checkpoint's own dtype. Leave mixed
            precision to `trainer.precision`.
        trust_remote_code: allow model code shipped with the checkpoint to run. Off by default:
            turn it on only for repositories you trust.
        revision: a branch, tag or commit of the hub repository.
        tiny: build the tiny local model into `name_or_path` if that directory does not exist yet
            (tests and the quickstart; no download).
        lora: train a LoRA adapter instead of the full model (needs `pip install peft`); the
            reference policy for `beta > 0` is then the base model with the adapter disabled.
        gradient_checkpointing: recompute activations in the backward pass instead of storing
            them (less memory, about a third more compute).
        sharded_generation: under FSDP2 (`ModelParallelStrategy`), how rollouts sample from the
            sharded policy: "gathered" all-gathers the full weights once per rollout phase (fast,
            full weights resident on each device while rolling out); "sharded" keeps them sharded
            and all-gathers layer by layer at every decoding step (least memory, ranks decode in
            lockstep). Ignored without FSDP2.
        compile: run the policy's forward for the loss through `torch.compile` (dynamic shapes),
            which fuses its element-wise work in the forward and backward passes. The first steps
            pay the compilation (~15 s for the benchmark's 4M model on 2 CPU cores; new sequence
            lengths rarely recompile), later ones train faster (fwd+bwd 0.52 -> 0.44 s there, and
            18% less peak memory). Sampling is unaffected (retrain's decoder does not call the
            forward), and so are checkpoints (the compiled wrapper is not saved). Works under FSDP2
            (tested on 2 CPU processes: the eager run's losses). On CPU, `torch.compile` needs a
            C++ compiler. Off by default: compiling costs more than it saves in short runs and tests.
        disable_dropout: set the model's dropout probabilities to 0 (GPT-2 and other checkpoints
            ship with dropout on). Rollouts sample in eval mode, without dropout, so the loss's
            log-probs describe the sampled distribution only without it; with it, even an
            on-policy step has importance ratios far from 1 (`train/sampler/ratio_max`). TRL's
            `disable_dropout` does the same but defaults to off. A LoRA adapter's own dropout
            (`lora.dropout`) is kept as set.
        attn_implementation: the attention kernels of the policy's forward for the loss
            (`transformers`' `attn_implementation`: "sdpa", "eager", "flash_attention_2", ...); null
            keeps transformers' default (sdpa). Sampling with retrain's decoder or vLLM does not use it.
    """

    name_or_path: str
    dtype: Dtype = "auto"
    trust_remote_code: bool = False
    revision: Optional[str] = None
    tiny: Optional[TinyModelConfig] = None
    lora: Optional[LoraSettings] = None
    gradient_checkpointing: bool = False
    sharded_generation: Literal["gathered", "sharded"] = "gathered"
    compile: bool = False
    disable_dropout: bool = True
    attn_implementation: Optional[str] = None


# Checkpoints keep these in the module's hyperparameters. Allowlisting them lets `torch.load` read a
# checkpoint with `weights_only=True`: torch's default, and the only mode Lightning uses for the
# metadata of a sharded (ModelParallelStrategy) checkpoint. They are plain config dataclasses.
torch.serialization.add_safe_globals([PolicyConfig, LoraSettings, TinyModelConfig])


def load_tokenizer(config: PolicyConfig) -> PreTrainedTokenizerBase:
    """The policy's tokenizer, set up for batched generation (left padding, a pad token)."""
    ensure_tiny_model(config)
    check_policy_source(config)  # the first load of a run: a wrong path or an unreachable hub fails here, fast
    tokenizer = AutoTokenizer.from_pretrained(
        config.name_or_path, revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(config: PolicyConfig) -> PreTrainedModel:
    """The policy model, loaded from the hub or a local directory."""
    ensure_tiny_model(config)
    dtype = "auto" if config.dtype == "auto" else _DTYPES[config.dtype]
    extra = {} if config.attn_implementation is None else {"attn_implementation": config.attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(
        config.name_or_path, revision=config.revision, trust_remote_code=config.trust_remote_code, dtype=dtype, **extra
    )
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns, goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # generation turns the cache back on explicitly (eval mode)
    if config.disable_dropout:
        disable_dropout(model)
    return model if config.lora is None else _with_lora(model, config.lora)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of `model` off: `nn.Dropout` modules, and the attention-dropout rates that
    attention implementations read from the module or its config."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def _with_lora(model: PreTrainedModel, lora: LoraSettings) -> PreTrainedModel:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("policy.lora needs PEFT: pip install 'retrain[lora]' (or pip install peft).") from None
    settings = LoraConfig(
        task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    return get_peft_model(model, settings)


def is_adapter_model(model: torch.nn.Module) -> bool:
    """Whether `model` carries a PEFT adapter that can be switched off (its base is then the reference)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def ensure_tiny_model(config: PolicyConfig) -> Optional[str]:
    """Build the tiny local model into `name_or_path` when `tiny` is set and the directory is missing.

    Returns what was built, in words, for the caller to log (a typo'd path with `tiny` set builds a
    fresh random model silently otherwise); None when the model was already there.
    """
    if config.tiny is None or (Path(config.name_or_path) / "config.json").is_file():
        return None
    build_tiny_model(config.name_or_path, config.tiny)
    t = config.tiny
    return (
        f"retrain: built a new tiny model (random weights; {t.num_layers} layer{'s' * (t.num_layers != 1)}, width {t.hidden_size}) at "
        f"{config.name_or_path}, because policy.tiny is set and no model was there. To train an existing model, "
        "point policy.name_or_path at it and set policy.tiny: null."
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_policy_source(config: PolicyConfig) -> None:
    """`policy.name_or_path` names a model directory, or a hub id that is cached or reachable.

    Raises a `ConfigError` before anything loads: for a path that does not exist (instead of
    transformers' "Repo id must be in the form..."), and for a hub id that is not in the local cache
    when the hub is unreachable or `HF_HUB_OFFLINE` is set (instead of a minute of retries).
    """
    name = config.name_or_path
    path = Path(name).expanduser()
    where = f"policy.name_or_path={name!r}"
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ConfigError(
                f"{where}: the directory {path.resolve()} holds no config.json, so it is not a model written by "
                "save_pretrained. Point it at the directory that holds the model's config.json and weights."
            )
        return
    if path.exists():
        raise ConfigError(f"{where}: {path.resolve()} is a file; point it at the model's directory (the one with config.json).")
    no_directory = f"no directory {path.resolve()}"
    if not _HUB_ID.fullmatch(name):
        raise ConfigError(
            f"{where}: {no_directory}. Point it at a directory written by save_pretrained, or give a Hugging Face hub "
            "id such as Qwen/Qwen2.5-0.5B-Instruct (with policy.tiny set, retrain builds its tiny test model there)."
        )
    if _in_hub_cache(name, config.revision):
        return
    local_copy = (
        f"Download it where there is network (`hf download {name} --local-dir DIR`) and set policy.name_or_path to DIR. "
        f"(If you meant a local directory: {no_directory}.)"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"{where}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set. {local_copy}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    problem = _unreachable(endpoint)
    if problem is not None:
        raise ConfigError(f"{where}: not in the local Hugging Face cache, and {endpoint} cannot be reached ({problem}). {local_copy}")


def _in_hub_cache(repo_id: str, revision: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # an id the cache cannot even name: let the loader give its own error
        return False


def _unreachable(endpoint: str, timeout: float = 3.0) -> Optional[str]:
    """Why `endpoint` cannot be reached within `timeout` seconds, or None if a connection opens."""
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None
