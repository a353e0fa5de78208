"""Tests for retrain.models: the character tokenizer, the tiny model and policy loading.

Everything is built into tmp_path and loaded back through `transformers` from local files.
"""

from __future__ import annotations

import string

import pytest

from retrain.core.errors import ConfigError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.models import PolicyConfig, TinyModelConfig, build_char_tokenizer, build_tiny_model, load_policy, load_tokenizer
from retrain.models.tiny import CHARACTERS, SPECIAL_TOKENS

SAMPLE = "Hello, world!\n  2+2=4? {ok} ~end~"

# Small shapes keep building and loading fast (the default is already tiny; this is smaller still).
SMALL = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=64)


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TinyModelConfig(**SMALL))


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_text(tokenizer):
    ids = tokenizer.encode(SAMPLE)
    assert tokenizer.decode(ids) == SAMPLE  # no spaces inserted between characters


def test_tokenizer_one_token_per_character(tokenizer):
    ids = tokenizer.encode(SAMPLE)
    assert len(ids) == len(SAMPLE)  # no BOS/EOS added, no merges
    assert tokenizer.convert_ids_to_tokens(ids) == list(SAMPLE)


def test_tokenizer_vocabulary(tokenizer):
    # 4 specials + 26 + 26 + 10 digits + 32 punctuation + space + newline = 100
    assert len(string.punctuation) == 32
    assert len(tokenizer) == 4 + 26 + 26 + 10 + 32 + 2 == 100
    # special tokens come first, in SPECIAL_TOKENS order; characters follow in CHARACTERS order
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS.values())) == [0, 1, 2, 3]
    assert tokenizer.convert_tokens_to_ids(list(CHARACTERS)) == list(range(4, 100))


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert tokenizer.unk_token == "<unk>" and tokenizer.unk_token_id == 1
    assert tokenizer.bos_token == "<bos>" and tokenizer.bos_token_id == 2
    assert tokenizer.eos_token == "<eos>" and tokenizer.eos_token_id == 3
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # Special tokens drop out of the decoded text on request.
    ids = [tokenizer.bos_token_id, *tokenizer.encode("ab"), tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_tokenizer_unknown_character_maps_to_unk(tokenizer):
    assert tokenizer.encode("aéb") == [tokenizer.convert_tokens_to_ids("a"), tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("b")]


def test_chat_template_renders_messages(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "system: be brief\nuser: hi\nassistant: "
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without == "system: be brief\nuser: hi\n"


def test_chat_template_tokenizes_to_characters(tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    input_ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    assert input_ids == tokenizer.encode("user: hi\nassistant: ")


# --------------------------------------------------------------------------- build_tiny_model


def test_build_writes_a_loadable_directory(tiny_dir):
    assert (tiny_dir / "config.json").is_file()
    assert (tiny_dir / "tokenizer_config.json").is_file()

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 16
    assert model.config.num_hidden_layers == 1
    assert model.config.vocab_size == 100
    assert model.config.eos_token_id == 3 and model.config.pad_token_id == 0
    assert model.dtype == torch.float32

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    assert len(tokenizer.encode(SAMPLE)) == len(SAMPLE)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True) == (
        "user: x\nassistant: "
    )

    # A forward pass gives one row of logits per input token over the 100-token vocabulary.
    input_ids = torch.tensor([tokenizer.encode("abc")])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, 3, 100)
    assert torch.isfinite(logits).all()


def test_same_seed_gives_identical_weights(tmp_path, tiny_dir):
    other = build_tiny_model(tmp_path / "again", TinyModelConfig(**SMALL))
    assert state_dicts_equal(AutoModelForCausalLM.from_pretrained(tiny_dir), AutoModelForCausalLM.from_pretrained(other))


def test_different_seed_gives_different_weights(tmp_path, tiny_dir):
    other = build_tiny_model(tmp_path / "seed1", TinyModelConfig(**SMALL, seed=1))
    assert not state_dicts_equal(AutoModelForCausalLM.from_pretrained(tiny_dir), AutoModelForCausalLM.from_pretrained(other))


def test_build_does_not_disturb_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", TinyModelConfig(**SMALL))
    assert torch.equal(torch.rand(3), expected)


def test_build_returns_path_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "model"
    result = build_tiny_model(str(target), TinyModelConfig(**SMALL))
    assert result == target
    assert (target / "config.json").is_file()


# --------------------------------------------------------------------------- load_policy / load_tokenizer


def test_load_builds_directory_when_missing(tmp_path):
    directory = tmp_path / "policy"
    config = PolicyConfig(name_or_path=str(directory), tiny=TinyModelConfig(**SMALL))
    assert not directory.exists()

    tokenizer = load_tokenizer(config)
    assert (directory / "config.json").is_file()
    model = load_policy(config)

    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE
    assert model.config.hidden_size == 16
    assert model.config.vocab_size == len(tokenizer)


def test_load_reuses_existing_directory(tmp_path):
    directory = tmp_path / "policy"
    build_tiny_model(directory, TinyModelConfig(**SMALL, seed=0))
    reference = AutoModelForCausalLM.from_pretrained(directory)
    config_mtime = (directory / "config.json").stat().st_mtime_ns

    # A different tiny config (seed 7, wider) must not rebuild: the directory already has a model.
    model = load_policy(PolicyConfig(name_or_path=str(directory), tiny=TinyModelConfig(**{**SMALL, "hidden_size": 32}, seed=7)))

    assert model.config.hidden_size == 16
    assert state_dicts_equal(model, reference)
    assert (directory / "config.json").stat().st_mtime_ns == config_mtime


def test_load_without_tiny_does_not_build(tmp_path):
    config = PolicyConfig(name_or_path=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=f"policy.name_or_path=.*: no directory {tmp_path / 'absent'}"):
        load_tokenizer(config)
    assert not (tmp_path / "absent").exists()


def test_load_tokenizer_from_plain_directory_pads_left(tiny_dir):
    tokenizer = load_tokenizer(PolicyConfig(name_or_path=str(tiny_dir)))
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["ab", "abcd"], padding=True)
    # left padding: the shorter row starts with two pad tokens (id 0)
    assert batch["input_ids"][0][:2] == [0, 0]
    assert batch["attention_mask"][0] == [0, 0, 1, 1]


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32), ("auto", torch.float32)])
def test_load_policy_dtype(tiny_dir, dtype, expected):
    model = load_policy(PolicyConfig(name_or_path=str(tiny_dir), dtype=dtype))
    assert model.dtype == expected
    assert all(p.dtype == expected for p in model.parameters())


def test_a_padded_vocabulary_keeps_encoding_per_character_and_decodes_the_fillers(tmp_path):
    plain = build_char_tokenizer()
    padded = build_char_tokenizer(vocab_size=1000)
    assert len(padded) == 1000 and padded("repeat a: ").input_ids == plain("repeat a: ").input_ids
    assert padded.decode([plain.convert_tokens_to_ids("a"), 999]) == "a<|extra_999|>"
    model = load_policy(PolicyConfig(name_or_path=str(build_tiny_model(tmp_path / "m", TinyModelConfig(hidden_size=16, intermediate_size=32, vocab_size=1000)))))
    assert model.config.vocab_size == 1000 and model.get_output_embeddings().weight.shape == (1000, 16)
    with pytest.raises(ValueError, match="vocab_size=10"):
        build_char_tokenizer(vocab_size=10)
