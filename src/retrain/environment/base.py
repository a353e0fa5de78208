"""The environment contract: the world the policy acts in.

An `Environment` is a template. Each rollout runs on `spawn()` (a shallow copy), so episodes run
concurrently without sharing per-episode state, while resources made once in `setup()` (a tool
server connection, a loaded dataset) are shared. `reset()` must therefore initialise all state an
episode needs.

The policy is reached through `PolicyClient`, an async interface the trainer implements with a
batching sampler: every episode awaits its next action, and all pending requests are served by one
batched `generate` call. Nothing here imports torch.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

from retrain.data.records import Message, PromptRecord


@dataclass
class ToolCall:
    """A request from the policy to run the tool `name` with `arguments`."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class LLMAction:
    """What the policy did in one turn: plain text, or text that carries tool calls.

    Attributes:
        text: everything the policy wrote this turn.
        tool_calls: the tool calls parsed from `text`, in order.
        parse_error: why `text` looked like a tool call but could not be parsed (shown to the policy).
        token_ids: the tokens the policy generated this turn.
        truncated: generation stopped at the token budget rather than at an end-of-sequence token.
    """

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    parse_error: Optional[str] = None
    token_ids: list[int] = field(default_factory=list)
    truncated: bool = False

    @property
    def tool_call(self) -> Optional[ToolCall]:
        """The first tool call, if any."""
        return self.tool_calls[0] if self.tool_calls else None

    @property
    def is_tool_call(self) -> bool:
        return bool(self.tool_calls)


@dataclass
class EnvironmentObservation:
    """What the environment shows the policy, and the immediate outcome of the last action.

    Attributes:
        content: text, or chat messages, for the policy to read next (the prompt on `reset`).
        reward: the immediate (step) reward for the action that led here.
        done: the episode is over; no further action is requested.
        info: anything else worth keeping in the trajectory (tool results, errors, ...).
    """

    content: Union[str, list[Message], None] = None
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Generation:
    """One completion returned by the policy client."""

    token_ids: list[int]
    text: str
    truncated: bool


@runtime_checkable
class PolicyClient(Protocol):
    """How an environment reaches the policy during a rollout."""

    def encode(
        self, content: Union[str, list[Message]], *, add_generation_prompt: bool = True, tools: Optional[list[dict[str, Any]]] = None
    ) -> list[int]:
        """Token ids for a prompt: chat messages go through the tokenizer's chat template (with `tools`)."""
        ...

    def encode_continuation(
        self, history: list[Message], new_messages: list[Message], *, tools: Optional[list[dict[str, Any]]] = None
    ) -> list[int]:
        """Token ids of `new_messages` (e.g. tool results) appended to a chat `history`, ending with
        the prompt for the policy's next turn: the chat template's rendering of the whole
        conversation minus its rendering of `history`."""
        ...

    async def generate(self, context_ids: Sequence[int], max_new_tokens: Optional[int] = None) -> Generation:
        """Sample a continuation of `context_ids`; concurrent calls are batched together."""
        ...


@dataclass
class Turn:
    """One policy action and the environment's answer to it."""

    action: LLMAction
    observation: EnvironmentObservation


@dataclass
class Trajectory:
    """A finished episode, as the trainer and the reward functions see it.

    `completion_ids` holds every token after the prompt in order, policy tokens and environment
    tokens interleaved; `completion_mask` is 1 where the policy generated the token (only those
    carry loss) and 0 for environment text.
    """

    record: PromptRecord
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    completion_mask: list[int] = field(default_factory=list)
    completion_turns: list[int] = field(default_factory=list)
    """For each completion token, the index of the turn it belongs to (an observation belongs to
    the turn it answers)."""
    turns: list[Turn] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-episode numbers the environment reports (tool calls, errors, ...); logged as means."""
    budget_exhausted: bool = False
    """The episode ended because the token budget ran out (not by `done` or `max_turns`)."""

    @property
    def completion_text(self) -> str:
        """The text the policy wrote, all turns joined (what single-turn reward functions score)."""
        return "".join(turn.action.text for turn in self.turns)

    @property
    def step_rewards(self) -> list[float]:
        return [turn.observation.reward for turn in self.turns]

    @property
    def truncated(self) -> bool:
        """The episode was cut by the token budget rather than finished by the policy or environment."""
        return self.budget_exhausted or (bool(self.turns) and self.turns[-1].action.truncated)

    @property
    def num_policy_tokens(self) -> int:
        return sum(self.completion_mask)


class Environment(ABC):
    """Base class for environments. Subclasses implement `reset` and `step`.

    Attributes:
        max_turns: the most policy actions in one episode.
    """

    max_turns: int = 1

    async def setup(self) -> None:
        """Acquire shared resources once, before the first rollout (default: nothing)."""

    async def close(self) -> None:
        """Release what `setup` acquired (default: nothing)."""

    def spawn(self) -> "Environment":
        """A fresh episode object sharing this template's setup resources."""
        return copy.copy(self)

    @abstractmethod
    async def reset(self, record: PromptRecord) -> EnvironmentObservation:
        """Start an episode for `record`; return the first observation (the prompt)."""

    @abstractmethod
    async def step(self, action: LLMAction) -> EnvironmentObservation:
        """Apply the policy's action; return what the policy sees next and the step reward."""

    def parse_action(self, generation: Generation) -> LLMAction:
        """Turn generated text into an action (default: plain text, no tool call)."""
        return LLMAction(text=generation.text, token_ids=list(generation.token_ids), truncated=generation.truncated)

    def episode_metrics(self) -> dict[str, float]:
        """Numbers about the finished episode, logged as `train/env/<name>` means (default: none)."""
        return {}

    def encode_prompt(self, policy: PolicyClient, observation: EnvironmentObservation) -> list[int]:
        """Tokens of the first observation, the prompt (default: text as is, messages via the chat template)."""
        return policy.encode(observation.content)

    def encode_observation(self, policy: PolicyClient, observation: EnvironmentObservation) -> list[int]:
        """Tokens of a mid-episode observation appended to the context (default: the text, no template)."""
        content = observation.content
        if content is None:
            return []
        return policy.encode(content, add_generation_prompt=False)

    async def rollout(
        self, record: PromptRecord, policy: PolicyClient, max_completion_tokens: Optional[int] = None
    ) -> Trajectory:
        """Run one episode to its end and return the trajectory.

        The episode ends when the environment says `done`, after `max_turns` actions, or when the
        token budget `max_completion_tokens` (policy and environment tokens after the prompt) is
        spent.
        """
        observation = await self.reset(record)
        if observation.content is None:
            raise ValueError(f"{type(self).__name__}.reset() returned an observation with no content (the prompt).")
        trajectory = Trajectory(record=record, prompt_ids=self.encode_prompt(policy, observation))
        budget = max_completion_tokens
        for turn in range(self.max_turns):
            if budget is not None and budget <= 0:
                trajectory.budget_exhausted = True
                break
            generation = await policy.generate(trajectory.prompt_ids + trajectory.completion_ids, budget)
            action = self.parse_action(generation)
            trajectory.completion_ids += action.token_ids
            trajectory.completion_mask += [1] * len(action.token_ids)
            trajectory.completion_turns += [turn] * len(action.token_ids)
            observation = await self.step(action)
            trajectory.turns.append(Turn(action=action, observation=observation))
            if budget is not None:
                budget -= len(action.token_ids)
            if observation.done or action.truncated or turn == self.max_turns - 1:
                break
            observation_ids = self.encode_observation(policy, observation)
            if budget is not None:
                observation_ids = observation_ids[: max(budget, 0)]
                budget -= len(observation_ids)
            trajectory.completion_ids += observation_ids
            trajectory.completion_mask += [0] * len(observation_ids)
            trajectory.completion_turns += [turn] * len(observation_ids)
        trajectory.metrics = self.episode_metrics()
        return trajectory
