"""What happens in an episode, as data: actions, observations, turns, trajectories, and the
async interface environments use to reach the policy.

These types sit below `environment`, `reward` and `data` (all three read them), so those packages
never need to import each other. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, Union, runtime_checkable

from retrain.core.records import Message, PromptRecord


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
    logprobs: list[float] = field(default_factory=list)
    """The sampler's log-prob of each token under the distribution it sampled from (after
    temperature, top-k and top-p); empty when the backend gives none."""
    policy_version: Optional[int] = None
    """The version of the policy's weights that sampled it (optimizer updates done when they were
    taken; None when the client does not say): how stale a rollout is when it is trained on."""


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
    completion_logprobs: list[float] = field(default_factory=list)
    """For each completion token, the sampler's log-prob (NaN for environment tokens and where the
    backend gave none): what off-policy corrections and the mismatch metrics compare against."""
    completion_turns: list[int] = field(default_factory=list)
    """For each completion token, the index of the turn it belongs to (an observation belongs to
    the turn it answers)."""
    turns: list[Turn] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-episode numbers the environment reports (tool calls, errors, ...); logged as means."""
    budget_exhausted: bool = False
    """The episode ended because the token budget ran out (not by `done` or `max_turns`)."""
    policy_version: Optional[int] = None
    """The oldest policy version that sampled any of its turns (`Generation.policy_version`)."""
    info: dict[str, Any] = field(default_factory=dict)
    """What the environment knows about the whole episode (an agent's result, its error); reward
    functions read it through the `trajectory` argument."""
    earlier_samples: list["Trajectory"] = field(default_factory=list)
    """When an episode's tokens are not one sequence (an agent rewrote its history, so a model call
    did not continue the previous one's tokens), its samples before the last, each with its own
    exact prompt and completion tokens. The trainer trains each as a row of its own with the
    episode's reward and advantage; this trajectory's token fields hold the last sample."""

    @property
    def samples(self) -> list["Trajectory"]:
        """Every training row of the episode, in order (itself alone, unless it was split)."""
        return [*self.earlier_samples, self]

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
