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
import math
from abc import ABC, abstractmethod
from typing import Optional

from retrain.core.episode import (  # noqa: F401  (re-exported: the environment API)
    EnvironmentObservation,
    Generation,
    LLMAction,
    PolicyClient,
    ToolCall,
    Trajectory,
    Turn,
)
from retrain.core.records import PromptRecord


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
            versions = [v for v in (trajectory.policy_version, generation.policy_version) if v is not None]
            trajectory.policy_version = min(versions, default=None)  # the oldest weights behind any turn
            trajectory.completion_ids += action.token_ids
            trajectory.completion_mask += [1] * len(action.token_ids)
            trajectory.completion_logprobs += _sampler_logprobs(generation, action)
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
            trajectory.completion_logprobs += [math.nan] * len(observation_ids)
            trajectory.completion_turns += [turn] * len(observation_ids)
        trajectory.metrics = self.episode_metrics()
        return trajectory


def _sampler_logprobs(generation: Generation, action: LLMAction) -> list[float]:
    """The generation's log-probs for the action's tokens; NaN (unknown) when the backend gave none
    or a `parse_action` changed the tokens."""
    if len(generation.logprobs) == len(action.token_ids) and list(generation.token_ids) == list(action.token_ids):
        return list(generation.logprobs)
    return [math.nan] * len(action.token_ids)
