"""Tests for retrain.environment: SingleTurnEnvironment and the base Environment.rollout loop.

The policy is a scripted PolicyClient: one token per character (its ord()), replies taken from a
list, and the token budget honoured by cutting the reply and flagging it truncated.
"""

from __future__ import annotations

import asyncio
from typing import Optional, Sequence, Union

import pytest

from retrain.core.records import Message, PromptRecord
from retrain.environment import (
    Environment,
    EnvironmentObservation,
    Generation,
    LLMAction,
    PolicyClient,
    SingleTurnEnvironment,
    Trajectory,
)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


class ScriptedPolicy:
    """Plays back `replies` in order; records every call.

    A reply is text, or `(text, True)` for a generation the policy itself reports as truncated (e.g.
    it ran into the model's context length with no budget given).
    """

    def __init__(self, replies: Sequence[Union[str, tuple[str, bool]]]) -> None:
        self.replies = list(replies)
        self.generate_calls: list[tuple[list[int], Optional[int]]] = []
        self.encode_calls: list[tuple[Union[str, list[Message]], bool]] = []

    def encode(self, content: Union[str, list[Message]], *, add_generation_prompt: bool = True, tools=None) -> list[int]:
        self.encode_calls.append((content, add_generation_prompt))
        if isinstance(content, str):
            return ids(content)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in content)
        if add_generation_prompt:
            text += "assistant: "
        return ids(text)

    def encode_continuation(self, history, new_messages, *, tools=None) -> list[int]:
        return self.encode(new_messages)

    async def generate(self, context_ids: Sequence[int], max_new_tokens: Optional[int] = None) -> Generation:
        self.generate_calls.append((list(context_ids), max_new_tokens))
        await asyncio.sleep(0)
        reply = self.replies.pop(0)
        text, truncated = reply if isinstance(reply, tuple) else (reply, False)
        truncated = truncated or (max_new_tokens is not None and len(text) > max_new_tokens)
        if truncated:
            text = text[:max_new_tokens]
        return Generation(token_ids=ids(text), text=text, truncated=truncated)


def run(coro):
    return asyncio.run(coro)


def test_scripted_policy_satisfies_protocol():
    assert isinstance(ScriptedPolicy([]), PolicyClient)


# --------------------------------------------------------------------------- SingleTurnEnvironment


def test_single_turn_rollout():
    policy = ScriptedPolicy(["ok!"])
    record = PromptRecord(prompt="hi", answer="x")

    trajectory = run(SingleTurnEnvironment().rollout(record, policy, max_completion_tokens=16))

    assert isinstance(trajectory, Trajectory)
    assert trajectory.record is record
    assert trajectory.prompt_ids == [104, 105]  # ord('h'), ord('i')
    assert trajectory.completion_ids == [111, 107, 33]  # ord('o'), ord('k'), ord('!')
    assert trajectory.completion_mask == [1, 1, 1]
    assert trajectory.completion_text == "ok!"
    assert trajectory.truncated is False
    assert trajectory.step_rewards == [0.0]  # no step reward in the single-turn environment
    assert trajectory.num_policy_tokens == 3
    assert len(trajectory.turns) == 1 and trajectory.turns[0].observation.done
    # The policy saw exactly the prompt, with the whole budget.
    assert policy.generate_calls == [([104, 105], 16)]
    # The prompt is encoded with the generation prompt.
    assert policy.encode_calls == [("hi", True)]


def test_single_turn_without_budget_passes_none():
    policy = ScriptedPolicy(["abc"])
    trajectory = run(SingleTurnEnvironment().rollout(PromptRecord(prompt="p"), policy))
    assert policy.generate_calls == [([112], None)]
    assert trajectory.completion_text == "abc"


def test_single_turn_truncation_propagates():
    policy = ScriptedPolicy(["hello world"])
    trajectory = run(SingleTurnEnvironment().rollout(PromptRecord(prompt="p"), policy, max_completion_tokens=5))
    # budget 5: "hello world" is cut to "hello" and flagged truncated
    assert trajectory.completion_text == "hello"
    assert trajectory.completion_ids == ids("hello")
    assert trajectory.completion_mask == [1] * 5
    assert trajectory.truncated is True
    assert trajectory.turns[0].action.truncated is True


def test_single_turn_empty_completion():
    trajectory = run(SingleTurnEnvironment().rollout(PromptRecord(prompt="p"), ScriptedPolicy([""])))
    assert trajectory.completion_ids == [] and trajectory.completion_mask == []
    assert trajectory.completion_text == ""
    assert len(trajectory.turns) == 1


def test_system_prompt_turns_text_prompt_into_messages():
    env = SingleTurnEnvironment(system_prompt="be brief")
    observation = run(env.reset(PromptRecord(prompt="hi")))
    assert observation.content == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]

    policy = ScriptedPolicy(["yo"])
    trajectory = run(env.rollout(PromptRecord(prompt="hi"), policy))
    # The scripted encode renders "role: content\n" per message plus "assistant: ".
    assert trajectory.prompt_ids == ids("system: be brief\nuser: hi\nassistant: ")


def test_system_prompt_is_prepended_to_chat_prompts():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    record = PromptRecord(prompt=messages)
    observation = run(SingleTurnEnvironment(system_prompt="S").reset(record))
    assert observation.content == [{"role": "system", "content": "S"}, *messages]
    assert record.prompt == messages  # the record itself is not modified


def test_no_system_prompt_passes_prompt_through():
    messages = [{"role": "user", "content": "a"}]
    assert run(SingleTurnEnvironment().reset(PromptRecord(prompt="text"))).content == "text"
    assert run(SingleTurnEnvironment().reset(PromptRecord(prompt=messages))).content == messages


def test_spawn_returns_distinct_objects():
    env = SingleTurnEnvironment(system_prompt="S")
    first, second = env.spawn(), env.spawn()
    assert first is not env and second is not env and first is not second
    assert type(first) is SingleTurnEnvironment
    assert first.system_prompt == "S"
    first.system_prompt = "changed"
    assert env.system_prompt == "S" and second.system_prompt == "S"


# --------------------------------------------------------------------------- base Environment.rollout


class TwoStepEnvironment(Environment):
    """Answers the first action with "obs" (reward 0.5) and ends after the second (reward 1.0)."""

    max_turns = 3

    def __init__(self) -> None:
        self.shared = object()  # a "setup resource" spawns share
        self.steps = 0
        self.actions: list[str] = []

    async def reset(self, record: PromptRecord) -> EnvironmentObservation:
        self.steps = 0
        self.actions = []
        return EnvironmentObservation(content=record.prompt)

    async def step(self, action: LLMAction) -> EnvironmentObservation:
        self.steps += 1
        self.actions.append(action.text)
        if self.steps == 1:
            return EnvironmentObservation(content="obs", reward=0.5)
        return EnvironmentObservation(content=None, reward=1.0, done=True)


class NeverDoneEnvironment(Environment):
    max_turns = 3

    async def reset(self, record: PromptRecord) -> EnvironmentObservation:
        return EnvironmentObservation(content=record.prompt)

    async def step(self, action: LLMAction) -> EnvironmentObservation:
        return EnvironmentObservation(content="|", reward=0.1)


def test_multi_turn_rollout_masks_observation_tokens():
    policy = ScriptedPolicy(["ab", "cd", "never used"])
    env = TwoStepEnvironment()

    trajectory = run(env.rollout(PromptRecord(prompt="p"), policy))

    # "ab" (policy) + "obs" (environment) + "cd" (policy)
    assert trajectory.prompt_ids == [112]
    assert trajectory.completion_ids == ids("ab") + ids("obs") + ids("cd")
    assert trajectory.completion_mask == [1, 1, 0, 0, 0, 1, 1]
    assert trajectory.step_rewards == [0.5, 1.0]
    assert trajectory.completion_text == "abcd"  # only the policy's text
    assert trajectory.num_policy_tokens == 4
    assert trajectory.truncated is False
    assert env.actions == ["ab", "cd"]
    # Two actions (done after the 2nd step although max_turns is 3).
    assert len(policy.generate_calls) == 2
    assert policy.replies == ["never used"]
    # The second generation sees the prompt, the first action and the observation.
    assert policy.generate_calls[1] == ([112] + ids("ab") + ids("obs"), None)
    # Mid-episode observations are encoded without a generation prompt.
    assert policy.encode_calls == [("p", True), ("obs", False)]


def test_rollout_stops_after_max_turns():
    policy = ScriptedPolicy(["a", "b", "c", "d"])
    trajectory = run(NeverDoneEnvironment().rollout(PromptRecord(prompt="p"), policy))
    assert len(trajectory.turns) == 3  # max_turns
    assert len(policy.generate_calls) == 3
    assert trajectory.completion_text == "abc"
    assert trajectory.step_rewards == [0.1, 0.1, 0.1]
    assert trajectory.num_policy_tokens == 3


def test_token_budget_cuts_observation_and_stops_episode():
    policy = ScriptedPolicy(["ab", "cd"])
    trajectory = run(TwoStepEnvironment().rollout(PromptRecord(prompt="p"), policy, max_completion_tokens=4))
    # budget 4: "ab" leaves 2; "obs" is cut to "ob" leaving 0; no second action is requested.
    assert policy.generate_calls == [([112], 4)]
    assert trajectory.completion_ids == ids("ab") + ids("ob")
    assert trajectory.completion_mask == [1, 1, 0, 0]
    assert trajectory.step_rewards == [0.5]
    assert len(trajectory.completion_ids) <= 4


def test_token_budget_passes_remaining_budget_to_second_action():
    policy = ScriptedPolicy(["ab", "cdefgh"])
    trajectory = run(TwoStepEnvironment().rollout(PromptRecord(prompt="p"), policy, max_completion_tokens=8))
    # budget 8: "ab" -> 6 left; "obs" -> 3 left; second action gets max_new_tokens=3: "cde", truncated
    assert [budget for _, budget in policy.generate_calls] == [8, 3]
    assert trajectory.completion_ids == ids("ab") + ids("obs") + ids("cde")
    assert trajectory.completion_mask == [1, 1, 0, 0, 0, 1, 1, 1]
    assert trajectory.truncated is True
    assert len(trajectory.completion_ids) == 8


def test_truncated_action_ends_the_episode():
    policy = ScriptedPolicy(["abcdef", "unused"])
    trajectory = run(TwoStepEnvironment().rollout(PromptRecord(prompt="p"), policy, max_completion_tokens=3))
    # "abcdef" cut to "abc" (truncated): the episode ends without an observation or a second action.
    assert trajectory.completion_ids == ids("abc")
    assert trajectory.completion_mask == [1, 1, 1]
    assert trajectory.truncated is True
    assert len(policy.generate_calls) == 1


def test_truncated_action_ends_the_episode_without_a_budget():
    policy = ScriptedPolicy([("ab", True), "unused"])
    trajectory = run(TwoStepEnvironment().rollout(PromptRecord(prompt="p"), policy))
    # The environment would answer with "obs" and ask again, but a truncated action ends the episode
    # before the observation is appended.
    assert trajectory.completion_ids == ids("ab")
    assert trajectory.completion_mask == [1, 1]
    assert trajectory.step_rewards == [0.5]
    assert trajectory.truncated is True
    assert len(policy.generate_calls) == 1


def test_zero_budget_requests_nothing():
    policy = ScriptedPolicy(["a"])
    trajectory = run(TwoStepEnvironment().rollout(PromptRecord(prompt="p"), policy, max_completion_tokens=0))
    assert policy.generate_calls == []
    assert trajectory.turns == [] and trajectory.completion_ids == []
    assert trajectory.truncated is True  # cut by the (empty) budget, not finished


def test_reset_without_content_raises():
    class NoPrompt(Environment):
        async def reset(self, record):
            return EnvironmentObservation(content=None)

        async def step(self, action):
            return EnvironmentObservation(done=True)

    with pytest.raises(ValueError, match="NoPrompt.reset"):
        run(NoPrompt().rollout(PromptRecord(prompt="p"), ScriptedPolicy(["a"])))


def test_spawned_episodes_run_concurrently_without_sharing_state():
    template = TwoStepEnvironment()

    async def both():
        episodes = [template.spawn(), template.spawn()]
        policies = [ScriptedPolicy(["a1", "a2"]), ScriptedPolicy(["b1", "b2"])]
        trajectories = await asyncio.gather(
            *(env.rollout(PromptRecord(prompt=f"p{i}"), pol) for i, (env, pol) in enumerate(zip(episodes, policies)))
        )
        return episodes, trajectories

    episodes, trajectories = run(both())
    assert [t.completion_text for t in trajectories] == ["a1a2", "b1b2"]
    assert [e.actions for e in episodes] == [["a1", "a2"], ["b1", "b2"]]
    assert all(e.shared is template.shared for e in episodes)  # shallow copy shares setup resources
    assert template.steps == 0 and template.actions == []  # the template itself was never stepped


def test_default_parse_action_copies_generation():
    generation = Generation(token_ids=[1, 2], text="xy", truncated=True)
    action = SingleTurnEnvironment().parse_action(generation)
    assert action == LLMAction(text="xy", token_ids=[1, 2], truncated=True)
    assert not action.is_tool_call
    assert action.token_ids is not generation.token_ids
