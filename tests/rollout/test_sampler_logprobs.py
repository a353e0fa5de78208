"""Every backend returns the sampler's log-prob of each token it drew, and at float32 they equal
the trainer's recomputed log-probs (the mismatch metrics then read ~0)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.core.records import PromptRecord
from retrain.environment.single_turn import SingleTurnEnvironment
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.rollout.engine import RolloutEngine
from retrain.rollout.sampler import BatchingSampler
from retrain.trainer.experience import completion_logps, pack_sampler_logps, pack_trajectories
from retrain.trainer.off_policy import sampler_mismatch

TOLERANCE = 1e-4  # float32: the decoder's arithmetic order differs from the full forward's


@pytest.mark.parametrize("backend", ["auto", "transformers"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_trainers(tiny_model_dir, backend, temperature):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sampler = BatchingSampler(model, tokenizer, max_new_tokens=8, temperature=temperature, backend=backend)
    assert sampler.uses_own_decoder == (backend == "auto")
    engine = RolloutEngine(SingleTurnEnvironment(), RewardCalculator([RewardSpec(name="length_penalty")]))
    records = [PromptRecord(prompt="ab: "), PromptRecord(prompt="a longer prompt: ")]
    trajectories, _ = engine.collect(records, num_generations=3, policy=sampler, max_completion_tokens=8)
    engine.close()
    for t in trajectories:
        assert len(t.completion_logprobs) == len(t.completion_ids) and all(lp <= 0 for lp in t.completion_logprobs)
    input_ids, attention_mask, mask = pack_trajectories(trajectories, tokenizer.pad_token_id)
    sampled = pack_sampler_logps(trajectories, mask.size(1))
    with torch.no_grad():
        recomputed, _ = completion_logps(model, input_ids, attention_mask, mask.size(1), temperature=temperature)
    assert ((sampled - recomputed).abs() * mask).max() < TOLERANCE
    metrics = sampler_mismatch(recomputed, sampled, mask)
    assert abs(float(metrics["sampler/kl"])) < 1e-6 and abs(float(metrics["sampler/ratio_max"]) - 1) < 1e-3


def test_top_k_logprobs_are_of_the_truncated_distribution(tiny_model_dir):
    # With top_k the sampler draws from a renormalised top-k distribution: its log-probs are higher
    # than the full softmax's, and the trainer (which, as TRL's, scores the full distribution) sees a ratio < 1.
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sampler = BatchingSampler(model, tokenizer, max_new_tokens=6, top_k=3)
    engine = RolloutEngine(SingleTurnEnvironment(), RewardCalculator([RewardSpec(name="length_penalty")]))
    trajectories, _ = engine.collect([PromptRecord(prompt="ab: ")], num_generations=4, policy=sampler, max_completion_tokens=6)
    engine.close()
    input_ids, attention_mask, mask = pack_trajectories(trajectories, tokenizer.pad_token_id)
    sampled = pack_sampler_logps(trajectories, mask.size(1))
    with torch.no_grad():
        full, _ = completion_logps(model, input_ids, attention_mask, mask.size(1))
    assert bool(((sampled - full) * mask >= -TOLERANCE).all()) and float(((sampled - full) * mask).max()) > 0.01
    assert float(sampler_mismatch(full, sampled, mask)["sampler/ratio_mean"]) < 1


def test_sampler_mismatch_by_hand():
    # Two tokens: log pi - log mu = log 2 and 0 -> ratios 2 and 1; k3 = (2 - 1 - log 2 + 0) / 2.
    trainer = torch.tensor([[math.log(0.5), math.log(0.3), 0.0]])
    sampler = torch.tensor([[math.log(0.25), math.log(0.3), -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is not the policy's
    metrics = sampler_mismatch(trainer, sampler, mask)
    assert float(metrics["sampler/ratio_max"]) == pytest.approx(2.0)
    assert float(metrics["sampler/ratio_min"]) == pytest.approx(1.0)
    assert float(metrics["sampler/ratio_mean"]) == pytest.approx(1.5)
    assert float(metrics["sampler/kl"]) == pytest.approx((1 - math.log(2)) / 2)


def test_unknown_sampler_logprobs_give_no_tensor(tiny_model_dir):
    from retrain.core.episode import Trajectory

    known = Trajectory(record=PromptRecord(prompt="a"), prompt_ids=[1], completion_ids=[5, 6], completion_mask=[1, 0],
                       completion_logprobs=[-0.5, math.nan])
    unknown = Trajectory(record=PromptRecord(prompt="a"), prompt_ids=[1], completion_ids=[5], completion_mask=[1])
    assert pack_sampler_logps([known], 2).tolist() == [[-0.5, 0.0]]  # environment tokens: 0, masked anyway
    assert pack_sampler_logps([known, unknown], 2) is None


def test_backend_choice_is_described_and_retrain_refuses_what_it_cannot_sample(tiny_model_dir, family_model):
    from retrain.core.errors import ConfigError

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert BatchingSampler(llama, tokenizer, max_new_tokens=4).describe_backend() == "retrain's KV-cached decoder"
    assert "generation_backend: transformers" in BatchingSampler(llama, tokenizer, max_new_tokens=4, backend="transformers").describe_backend()
    dynamic = family_model("llama-dynamic-rope")  # RoPE rescaled with the length: not for retrain's decoder
    assert "does not support this policy: rope_type='dynamic'" in BatchingSampler(dynamic, tokenizer, max_new_tokens=4).describe_backend()
    with pytest.raises(ConfigError, match="generation_backend=retrain: retrain's decoder cannot sample this policy"):
        BatchingSampler(dynamic, tokenizer, max_new_tokens=4, backend="retrain").uses_own_decoder


def test_generations_and_trajectories_carry_the_policy_version_that_sampled_them(tiny_model_dir):
    """The hook for bounded staleness: every generation names its weights' version, and a multi-turn
    episode keeps the oldest of its turns' (here the weights move on between the two turns)."""
    import asyncio

    from retrain.core.episode import EnvironmentObservation, LLMAction
    from retrain.environment.base import Environment

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sampler = BatchingSampler(model, tokenizer, max_new_tokens=3, backend="auto", policy_version=7)
    seen = []

    class TwoTurns(Environment):
        max_turns = 2

        async def reset(self, record):
            return EnvironmentObservation(content=record.prompt)

        def parse_action(self, generation):
            seen.append(generation.policy_version)
            return LLMAction(text=generation.text, token_ids=list(generation.token_ids))  # a finished turn

        async def step(self, action):
            sampler.policy_version += 2  # an update lands between the turns
            return EnvironmentObservation(content="more: ")

    sampler.active_episodes = 1
    episode = asyncio.run(TwoTurns().rollout(PromptRecord(prompt="ab: "), sampler, max_completion_tokens=20))
    assert seen == [7, 9]
    assert episode.policy_version == 7
    assert BatchingSampler(model, tokenizer, max_new_tokens=2).policy_version is None
