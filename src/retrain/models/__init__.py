"""Policy loading (hub id or local directory) and the tiny local model."""

from retrain.models.loading import PolicyConfig, ensure_tiny_model, load_policy, load_tokenizer
from retrain.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model

__all__ = ["PolicyConfig", "ensure_tiny_model", "TinyModelConfig", "build_char_tokenizer", "build_tiny_model", "load_policy", "load_tokenizer"]
