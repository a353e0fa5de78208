"""Loading the policy and its tokenizer: a hub id or a local directory, through `transformers`.

The tiny local model takes the same path: it is built into a directory first, then loaded from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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


# Checkpoints keep these in the module's hyperparameters. Allowlisting them lets `torch.load` read a
# checkpoint with `weights_only=True`: torch's default, and the only mode Lightning uses for the
# metadata of a sharded (ModelParallelStrategy) checkpoint. They are plain config dataclasses.
torch.serialization.add_safe_globals([PolicyConfig, LoraSettings, TinyModelConfig])


def load_tokenizer(config: PolicyConfig) -> PreTrainedTokenizerBase:
    """The policy's tokenizer, set up for batched generation (left padding, a pad token)."""
    ensure_tiny_model(config)
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
    model = AutoModelForCausalLM.from_pretrained(
        config.name_or_path, revision=config.revision, trust_remote_code=config.trust_remote_code, dtype=dtype
    )
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns, goes in v6
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # generation turns the cache back on explicitly (eval mode)
    return model if config.lora is None else _with_lora(model, config.lora)


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


def ensure_tiny_model(config: PolicyConfig) -> None:
    """Build the tiny local model into `name_or_path` when `tiny` is set and the directory is missing."""
    if config.tiny is not None and not (Path(config.name_or_path) / "config.json").is_file():
        build_tiny_model(config.name_or_path, config.tiny)
