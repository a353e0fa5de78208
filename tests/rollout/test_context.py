"""Prompts longer than the model's context: refused before training (finite data) or cut where the
context ends (during rollouts), on a RoPE model (Llama) and a model with learned positions (GPT-2),
where an overlong context would crash inside the position embedding."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

from retrain.core.records import PromptRecord
from retrain.data.datamodule import PromptDataModule
from retrain.data.sources.procedural import ProceduralSource
from retrain.models.loading import PolicyConfig
from retrain.models.tiny import TinyModelConfig, build_char_tokenizer, build_tiny_model
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.rollout.context import ContextOverflowError, check_prompts_fit, context_length
from retrain.trainer.grpo import GRPOTrainer

CONTEXT = 24


def test_context_length_reads_the_model_and_the_tokenizer():
    llama = type("M", (), {"config": LlamaConfig(max_position_embeddings=64)})()
    gpt2 = type("M", (), {"config": GPT2Config(n_positions=32)})()
    assert context_length(llama) == 64 and context_length(gpt2) == 32
    tokenizer = build_char_tokenizer()
    assert context_length(llama, tokenizer) == 64  # an unbounded tokenizer adds no limit
    tokenizer.model_max_length = 16
    assert context_length(llama, tokenizer) == 16
    assert context_length(object()) is None


def test_check_prompts_fit_names_the_first_record_that_does_not_fit():
    encode = list  # one token per character
    records = [(0, PromptRecord(prompt="x" * 10)), (3, PromptRecord(prompt="y" * 15))]
    check_prompts_fit(records[:1], encode, limit=24, max_completion_length=14, where="data.path")  # 10 + 14 = 24 fits
    with pytest.raises(ContextOverflowError, match=r"data.path, record 3: the prompt is 15 tokens; .* 29 tokens, and the model reads at most 24"):
        check_prompts_fit(records, encode, limit=24, max_completion_length=14, where="data.path")
    with pytest.raises(ContextOverflowError, match="max_completion_length=24"):
        check_prompts_fit([], encode, limit=24, max_completion_length=24, where="data.path")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def short_context_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param) / "model"
    if request.param == "llama":
        return build_tiny_model(directory, TinyModelConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=CONTEXT))
    tokenizer = build_char_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _algo(model_dir, max_completion_length=8):
    return GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(model_dir)), reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "a"})]),
        num_generations=2, max_completion_length=max_completion_length, learning_rate=1e-3,
    )


def _fit(model_dir, data, steps=2, algo=None):
    algo = algo or _algo(model_dir)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(algo, datamodule=data)
    return algo


def test_an_overlong_prompt_in_finite_data_stops_the_run_before_any_rollout(short_context_model):
    prompts = ["repeat a: ", "repeat b, then explain at length: ", "repeat c: "]  # the second: 34 chars
    data = PromptDataModule(prompts=prompts, batch_size=1, shuffle=False)
    algo = _algo(short_context_model)
    with pytest.raises(ContextOverflowError, match=r"data.prompts \(train split\), record 1: the prompt is 34 tokens"):
        _fit(short_context_model, data, algo=algo)
    assert algo.global_step == 0 and not algo._last_trajectories  # nothing was rolled out


def _long_prompts(rng: random.Random, index: int) -> dict:
    return {"prompt": "say a: " + "a" * (10 + index % 3)}  # 17-19 characters, endless


def test_rollouts_from_endless_data_stop_where_the_context_ends(short_context_model):
    # 17-19 prompt tokens + up to 8 completion tokens > 24: each generation is cut at the context's end.
    data = PromptDataModule(source=ProceduralSource(generator=f"{__name__}:_long_prompts"), batch_size=2)
    algo = _fit(short_context_model, data, steps=2)
    assert algo.global_step == 2
    lengths = [len(t.prompt_ids) + len(t.completion_ids) for t in algo._last_trajectories]
    assert max(lengths) <= CONTEXT
    assert all(t.truncated for t in algo._last_trajectories if len(t.prompt_ids) + len(t.completion_ids) == CONTEXT)


def _too_long(rng: random.Random, index: int) -> dict:
    return {"prompt": "x" * CONTEXT}


def test_a_context_with_no_room_left_is_an_error_not_a_crash(short_context_model):
    data = PromptDataModule(source=ProceduralSource(generator=f"{__name__}:_too_long"), batch_size=1)
    with pytest.raises(ContextOverflowError, match="a rollout's context is 24 tokens, and the model reads at most 24"):
        _fit(short_context_model, data)
