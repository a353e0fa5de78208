"""A policy that cannot be found fails at once, saying what is wrong and what to do; a tiny model
built because the directory was missing says so."""

from __future__ import annotations

import time

import pytest

from retrain.core.errors import ConfigError
from retrain.models.loading import PolicyConfig, check_policy_source, ensure_tiny_model
from retrain.models.tiny import TinyModelConfig


def test_a_missing_local_directory_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"no directory .*/models/absent\. Point it at a directory written by save_pretrained"):
        check_policy_source(PolicyConfig(name_or_path=str(tmp_path / "models" / "absent")))


def test_a_directory_without_a_model_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ConfigError, match="holds no config.json"):
        check_policy_source(PolicyConfig(name_or_path=str(tmp_path / "weights")))


def test_an_uncached_hub_id_offline_fails_fast_and_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))  # an empty cache
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"not in the local Hugging Face cache, and HF_HUB_OFFLINE is set\. Download it .*--local-dir DIR"):
        check_policy_source(PolicyConfig(name_or_path="someone/no-such-model"))
    assert time.perf_counter() - started < 5


def test_an_unreachable_hub_fails_within_seconds(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens on loopback
    with pytest.raises(ConfigError, match=r"http://127.0.0.1:9 cannot be reached \(ConnectionRefusedError"):
        check_policy_source(PolicyConfig(name_or_path="someone/no-such-model"))


def test_a_tiny_model_built_for_a_missing_directory_is_reported(tmp_path):
    config = PolicyConfig(name_or_path=str(tmp_path / "tiny"), tiny=TinyModelConfig(hidden_size=16, intermediate_size=32, num_layers=1))
    message = ensure_tiny_model(config)
    assert message is not None and f"built a new tiny model (random weights; 1 layer, width 16) at {tmp_path / 'tiny'}" in message
    assert ensure_tiny_model(config) is None  # already there: nothing built, nothing said
    check_policy_source(config)  # and now it is a model directory
