"""Shared fixtures. Nothing here downloads: models are built locally, W&B runs offline."""

from __future__ import annotations

import os

# Set before anything imports transformers or wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

HANG_GUARD_SECONDS = 30.0  # how long a meeting waits: only a serial (or deadlocked) schedule ever gets there


class Meeting:
    """Proof of concurrency without a stopwatch: `await meeting.attend()` returns only once
    `parties` callers are waiting at once, round after round; a caller left waiting alone for
    `HANG_GUARD_SECONDS` (what a serial schedule gets) raises `TimeoutError`. For coroutines on one
    event loop; threads meet at a `threading.Barrier` instead."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.waiting = 0
        self.rounds = 0  # how many rounds every party attended
        self.peak = 0  # the most callers ever waiting at once
        self._event = None

    async def attend(self) -> None:
        import asyncio

        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        self.waiting += 1
        self.peak = max(self.peak, self.waiting)
        if self.waiting == self.parties:
            self.waiting, self._event, self.rounds = 0, None, self.rounds + 1
            event.set()
        try:
            await asyncio.wait_for(event.wait(), HANG_GUARD_SECONDS)
        except asyncio.TimeoutError:
            raise TimeoutError(f"waited {HANG_GUARD_SECONDS:g} s for {self.parties} concurrent callers; {self.waiting} came") from None


@pytest.fixture
def meeting():
    """`meeting(parties)`: a `Meeting`, see there."""
    return Meeting


@pytest.fixture(scope="session")
def device():
    """Where device-agnostic numerical tests run: the CPU, or `RETRAIN_TEST_DEVICE` (e.g. "cuda" on a
    GPU machine: `RETRAIN_TEST_DEVICE=cuda pytest tests/rollout/test_decoding.py`)."""
    import torch

    return torch.device(os.environ.get("RETRAIN_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny character-level Llama written to disk once per test session."""
    from retrain.models.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TinyModelConfig(hidden_size=32, intermediate_size=64))


@pytest.fixture
def family_model():
    """`make(name)`: a small randomly initialised model of a Llama-family variant retrain has fast
    paths for: "llama-gqa-bias" (grouped-query attention, biases everywhere, llama3 RoPE scaling),
    "qwen2" (q/k/v biases), "qwen3" (per-head q/k norms, head_dim != hidden / heads), "mistral"."""
    from transformers import (
        LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
    )

    shape = {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "max_position_embeddings": 64}

    def make(name: str):
        import torch

        torch.manual_seed(0)
        if name == "llama-gqa-bias":
            rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16}
            return LlamaForCausalLM(LlamaConfig(**shape, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                                mlp_bias=True, rope_parameters=rope))
        if name == "llama-dynamic-rope":  # RoPE rescaled with the sequence length: not for retrain's decoder
            return LlamaForCausalLM(LlamaConfig(**shape, num_attention_heads=4,
                                                rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}))
        if name == "qwen2":
            return Qwen2ForCausalLM(Qwen2Config(**shape, num_attention_heads=4, num_key_value_heads=2))
        if name == "qwen3":
            return Qwen3ForCausalLM(Qwen3Config(**shape, num_attention_heads=4, num_key_value_heads=2, head_dim=16))
        if name == "mistral":
            return MistralForCausalLM(MistralConfig(**shape, num_attention_heads=4, num_key_value_heads=1, sliding_window=None))
        raise ValueError(name)

    return make
