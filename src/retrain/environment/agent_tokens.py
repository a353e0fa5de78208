"""The exact tokens of an agent's episode: every model call's context and generation, assembled into
training samples without re-tokenizing anything the policy wrote.

An agent talks to the policy in messages; the loss needs tokens. Rendering the agent's final history
once and tokenizing it would not give back the tokens the policy sampled (tokenization is not
unique; chat templates rewrite earlier turns), the most reported multi-turn bug class elsewhere.
So each call's context is built from tokens already known:

* A chat request whose messages extend an earlier call's messages plus the reply this endpoint gave
  (compared by role, text and tool calls: `openai_api.message_key`) continues that call's tokens
  (its context and its generation, as sampled) with the chat template's rendering of the new
  messages only (`PolicyClient.encode_continuation`). A text request whose prompt extends an earlier
  call's prompt and completion continues it the same way; a request with token ids is used as is.
* Anything else (the agent rewrote or summarised its history, changed the tools) is rendered afresh
  and counted (`fresh_renders`).

Samples: a call continues the open sample whose tokens are a prefix of its context (the longest);
the tokens between are environment tokens (mask 0), the generation policy tokens (mask 1). A call
that continues no sample starts a new one whose prompt is its whole context. So an episode whose
agent broke the prefix becomes several samples (step-wise), each with its own exact tokens, and a
policy token is trained once however the agent branched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from retrain.core.episode import EnvironmentObservation, LLMAction, PolicyClient, Trajectory, Turn
from retrain.core.records import Message, PromptRecord
from retrain.environment.openai_api import message_key


@dataclass
class ModelCall:
    """One generation the endpoint served."""

    context_ids: list[int]
    action: LLMAction
    logprobs: list[float]
    history: Optional[list[Message]] = None
    """Chat calls: the request's messages plus the reply, as chat templates read them."""
    tools: Optional[list[dict[str, Any]]] = None
    text: Optional[str] = None
    """Text calls: the prompt text plus the completion text."""
    policy_version: Optional[int] = None

    @property
    def tokens(self) -> list[int]:
        return self.context_ids + self.action.token_ids


@dataclass
class Sample:
    """One training row: a prompt and every token after it, as the calls that built it saw them."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    completion_mask: list[int] = field(default_factory=list)
    completion_logprobs: list[float] = field(default_factory=list)
    completion_turns: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    budget_exhausted: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


class EpisodeTokens:
    """The calls of one episode and the samples they make.

    Args:
        policy: how contexts are rendered (`encode`, `encode_continuation`).
        budget: the most tokens after a sample's prompt (the trainer's `max_completion_length`).
    """

    def __init__(self, policy: PolicyClient, budget: Optional[int]) -> None:
        self.policy = policy
        self.budget = budget
        self.calls: list[ModelCall] = []
        self.samples: list[Sample] = []
        self.fresh_renders = 0

    # ------------------------------------------------------------------ contexts
    def chat_context(self, messages: list[Message], tools: Optional[list[dict[str, Any]]]) -> list[int]:
        keys = [message_key(m) for m in messages]
        best: Optional[ModelCall] = None
        for call in self.calls:
            if call.history is None or call.tools != tools or len(call.history) > len(keys):
                continue
            if [message_key(m) for m in call.history] == keys[: len(call.history)]:
                if best is None or len(call.history) >= len(best.history or ()):
                    best = call
        if best is None:
            self._fresh()
            return self.policy.encode(messages, tools=tools)
        new = messages[len(best.history or ()) :]
        return best.tokens + self.policy.encode_continuation(list(best.history or ()), new, tools=tools)

    def text_context(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            if not any(_starts_with(prompt, s.tokens) for s in self.samples):
                self._fresh()
            return list(prompt)
        best = max(
            (c for c in self.calls if c.text is not None and prompt.startswith(c.text)), key=lambda c: len(c.text or ""), default=None
        )
        if best is None:
            self._fresh()
            return self.policy.encode(prompt)
        rest = prompt[len(best.text or "") :]
        return best.tokens + (self.policy.encode(rest, add_generation_prompt=False) if rest else [])

    def _fresh(self) -> None:
        if self.calls:  # the first call of an episode is rendered afresh by definition
            self.fresh_renders += 1

    # ------------------------------------------------------------------ budget and recording
    def _continued(self, context_ids: Sequence[int]) -> Optional[Sample]:
        """The open sample this context continues: the longest whose tokens are its prefix."""
        matches = [s for s in self.samples if _starts_with(context_ids, s.tokens)]
        return max(matches, key=lambda s: len(s.tokens), default=None)

    def room(self, context_ids: Sequence[int]) -> Optional[int]:
        """How many tokens a call with this context may generate within the sample's budget (None: no bound)."""
        if self.budget is None:
            return None
        sample = self._continued(context_ids)
        used = 0 if sample is None else len(context_ids) - len(sample.prompt_ids)
        return self.budget - used

    def exhaust(self, context_ids: Sequence[int]) -> None:
        """The budget of the sample this context continues is spent: the episode's tokens end there."""
        sample = self._continued(context_ids)
        if sample is not None:
            sample.budget_exhausted = True

    def record(self, call: ModelCall) -> None:
        index = len(self.calls)
        self.calls.append(call)
        sample = self._continued(call.context_ids)
        if sample is None:
            sample = Sample(prompt_ids=list(call.context_ids))
            self.samples.append(sample)
        else:
            between = call.context_ids[len(sample.tokens) :]
            previous = sample.calls[-1] if sample.calls else index
            sample.completion_ids += between
            sample.completion_mask += [0] * len(between)
            sample.completion_logprobs += [math.nan] * len(between)
            sample.completion_turns += [previous] * len(between)
        tokens = call.action.token_ids
        logprobs = call.logprobs if len(call.logprobs) == len(tokens) else [math.nan] * len(tokens)
        sample.completion_ids += tokens
        sample.completion_mask += [1] * len(tokens)
        sample.completion_logprobs += logprobs
        sample.completion_turns += [index] * len(tokens)
        sample.calls.append(index)

    # ------------------------------------------------------------------ the trajectory
    def trajectory(self, record: PromptRecord, step_rewards: Optional[Sequence[float]] = None) -> Trajectory:
        """The episode for the trainer: the sample holding the last call, with the earlier samples in
        `earlier_samples`; `turns` are every call, in order, with their step rewards."""
        if not self.calls:
            raise ValueError("the episode made no model call")
        rewards = list(step_rewards or [])
        turns = [
            Turn(action=call.action, observation=EnvironmentObservation(reward=float(rewards[i]) if i < len(rewards) else 0.0))
            for i, call in enumerate(self.calls)
        ]
        rows = [self._row(record, sample, turns) for sample in self.samples]
        last = next(i for i, s in enumerate(self.samples) if len(self.calls) - 1 in s.calls)
        main = rows.pop(last)
        main.turns = turns
        main.earlier_samples = rows
        versions = [call.policy_version for call in self.calls if call.policy_version is not None]
        main.policy_version = min(versions, default=None)
        return main

    @staticmethod
    def _row(record: PromptRecord, sample: Sample, turns: list[Turn]) -> Trajectory:
        return Trajectory(
            record=record, prompt_ids=list(sample.prompt_ids), completion_ids=list(sample.completion_ids),
            completion_mask=list(sample.completion_mask), completion_logprobs=list(sample.completion_logprobs),
            completion_turns=list(sample.completion_turns), turns=[turns[i] for i in sample.calls],
            budget_exhausted=sample.budget_exhausted,
        )


def _starts_with(sequence: Sequence[int], prefix: Sequence[int]) -> bool:
    return len(prefix) <= len(sequence) and list(sequence[: len(prefix)]) == list(prefix)

