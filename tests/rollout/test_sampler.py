import asyncio
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.core.records import PromptRecord
from retrain.environment.single_turn import SingleTurnEnvironment
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.rollout.engine import RolloutEngine
from retrain.rollout.sampler import BatchingSampler


def _sampler(model_dir, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return BatchingSampler(model, tokenizer, **{"max_new_tokens": 6, **kwargs})


def test_all_episodes_of_a_batch_share_one_generate_call(tiny_model_dir):
    torch.manual_seed(0)
    sampler = _sampler(tiny_model_dir)
    engine = RolloutEngine(SingleTurnEnvironment(), RewardCalculator([RewardSpec(name="length_penalty")]))
    records = [PromptRecord(prompt="ab: "), PromptRecord(prompt="a much longer prompt: "), PromptRecord(prompt="c")]
    trajectories, scored = engine.collect(records, num_generations=4, policy=sampler, max_completion_tokens=6)
    engine.close()
    assert sampler.generate_calls == 1
    assert len(trajectories) == 12 and len(scored.total) == 12
    # grouped by prompt: rollouts 0-3 are prompt 0, 4-7 prompt 1, 8-11 prompt 2
    assert [t.record for t in trajectories] == [r for r in records for _ in range(4)]
    for t in trajectories:
        assert 1 <= len(t.completion_ids) <= 6
        assert t.completion_mask == [1] * len(t.completion_ids)
        assert t.truncated == (t.completion_ids[-1] != sampler.tokenizer.eos_token_id)


def test_generation_is_cut_after_the_first_eos_and_flags_truncation(tiny_model_dir):
    sampler = _sampler(tiny_model_dir)
    eos = sampler.tokenizer.eos_token_id
    a, b = sampler.tokenizer.convert_tokens_to_ids(["a", "b"])
    finished = sampler._to_generation([a, b, eos, a, a], [-0.1, -0.2, -0.3, -0.4, -0.5])
    assert finished.token_ids == [a, b, eos] and finished.text == "ab" and not finished.truncated
    assert finished.logprobs == [-0.1, -0.2, -0.3]  # cut with the tokens
    cut = sampler._to_generation([a, b, a], [])
    assert cut.token_ids == [a, b, a] and cut.truncated and cut.logprobs == []


def test_per_request_budgets_are_respected_in_one_batch(tiny_model_dir):
    sampler = _sampler(tiny_model_dir, min_new_tokens=6)  # never stop early: every request uses its budget
    context = sampler.encode("hello")

    async def run():
        sampler.active_episodes = 2
        return await asyncio.gather(sampler.generate(context, 2), sampler.generate(context, 5))

    short, long = asyncio.run(run())
    assert sampler.generate_calls == 1
    assert len(short.token_ids) == 2 and len(long.token_ids) == 5
    assert short.truncated and long.truncated


def test_chat_prompts_go_through_the_chat_template(tiny_model_dir):
    sampler = _sampler(tiny_model_dir)
    ids = sampler.encode([{"role": "user", "content": "hi"}])
    assert sampler.tokenizer.decode(ids) == "user: hi\nassistant: "


def test_generate_backend_does_not_warn_on_every_call(tiny_model_dir, caplog, capfd):
    sampler = _sampler(tiny_model_dir, backend="transformers")
    context = sampler.encode("hello")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            sampler._generate_batch([context, context], 3)
    said = caplog.text + capfd.readouterr().err
    assert "max_length" not in said and "min_length" not in said  # lengths come only from max/min_new_tokens
