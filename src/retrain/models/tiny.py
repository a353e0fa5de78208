"""A tiny Llama-style model and a character-level tokenizer, built locally with no download.

Tests and the quickstart use these. They are written to a directory with `save_pretrained` and then
loaded back through `AutoModelForCausalLM` / `AutoTokenizer`, so they exercise the same loading path
a hub model takes.
"""

from __future__ import annotations

import os
import shutil
import string
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# The same layout, plus what tool-calling templates (Qwen's, Hermes') render: the tool schemas, an
# assistant's tool calls as Hermes <tool_call> blocks, tool results.
TOOLS_CHAT_TEMPLATE = (
    "{% if tools %}system: You may call these tools:\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\nTo call one, write <tool_call>{\"name\": <tool name>, \"arguments\": <arguments object>}</tool_call>.\n{% endif %}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] or '' }}"
    "{% for call in message.get('tool_calls') or [] %}<tool_call>{\"name\": {{ call['function']['name'] | tojson }}, "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}</tool_call>{% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
CHAT_TEMPLATES = {"plain": CHAT_TEMPLATE, "tools": TOOLS_CHAT_TEMPLATE}


@dataclass
class TinyModelConfig:
    """Shape of the tiny local model (a Llama with a character vocabulary).

    Attributes:
        hidden_size: width of the residual stream.
        num_layers: decoder layers.
        num_heads: attention heads.
        intermediate_size: MLP width.
        max_position_embeddings: the longest sequence the model is built for.
        seed: initialisation seed, so the same config always gives the same weights.
        vocab_size: pad the character vocabulary with unused tokens (`<|extra_N|>`, never produced
            by encoding, but sampled and decoded like any other) up to this size: a tiny model with
            a real model's LM-head and sampling cost (e.g. 151,936, Qwen's). None: characters only.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    seed: int = 0
    vocab_size: Optional[int] = None
    chat_template: str = "plain"
    """"plain" (`role: content` lines; ignores tools) or "tools" (also renders tool schemas, an
    assistant's tool calls in Hermes `<tool_call>` format and tool results, as tool-calling chat
    models' templates do)."""

    def __post_init__(self) -> None:
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"TinyModelConfig.chat_template={self.chat_template!r}: use one of {', '.join(CHAT_TEMPLATES)}.")


def build_char_tokenizer(vocab_size: Optional[int] = None, chat_template: str = "plain") -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, plus pad/unk/bos/eos (and unused
    filler tokens up to `vocab_size`, see `TinyModelConfig.vocab_size`)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for character in CHARACTERS:
        vocab.setdefault(character, len(vocab))
    if vocab_size is not None and vocab_size < len(vocab):
        raise ValueError(f"vocab_size={vocab_size}: the character vocabulary alone has {len(vocab)} tokens.")
    for filler in range(len(vocab), vocab_size or 0):
        vocab[f"<|extra_{filler}|>"] = filler  # unreachable without merges: encoding stays per character
    # BPE with no merges splits text into single characters; Fuse joins them back without spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATES[chat_template]
    return tokenizer


def build_tiny_model(directory: str | Path, config: TinyModelConfig | None = None) -> Path:
    """Write a freshly initialised tiny model and its tokenizer to `directory`; return the path."""
    config = config or TinyModelConfig()
    directory = Path(directory)
    tokenizer = build_char_tokenizer(config.vocab_size, config.chat_template)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(model_config)
    # Write beside the target and rename: a concurrent builder (another node on a shared disk) or a
    # crash can never leave a half-written model where a loader would find it.
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    # transformers 5 writes nothing but on global rank 0 once torch.distributed is initialised; this
    # build is local (each node's local rank 0 makes its own copy), so this process must write.
    model.should_save_on_this_rank = lambda is_main_process=True: True
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if not (staging / "config.json").is_file() or not any(staging.glob("model*.safetensors")):
        raise RuntimeError(f"the tiny model was not written to {staging}")
    try:
        os.replace(staging, directory)
    except OSError:
        if not (directory / "config.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # someone else finished first: same seed, same weights
    return directory
