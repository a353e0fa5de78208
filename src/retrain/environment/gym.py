"""`GymEnvironment`: a gymnasium environment with a discrete action space, played in text.

Classic control and toy-text tasks (FrozenLake, Blackjack, Taxi, CliffWalking, ...) make small,
fully verifiable multi-turn RL problems for a language model: the environment supplies the reward,
so no reward model or reference answer is needed. This module turns one into an `Environment`:
each observation is rendered as text, the policy replies in words, and the reply is parsed into a
discrete action.

Parsing: the policy names an action (case-insensitive, whole words; `action_names` or the built-in
names for the known tasks, otherwise the digits `0..n-1`). When several valid names appear, the
*last* one wins, so a reply may reason first and answer at the end. When no name appears, the last
bare integer that is a valid action is taken.

Invalid actions: a reply with no valid action does not advance the gym environment. It earns
`invalid_action_reward` as its step reward and an error observation that lists the valid actions;
after `max_invalid_actions` such replies in one episode, the episode ends.

The built-in reward `step_reward_sum` sums a trajectory's step rewards, i.e. the gymnasium return,
so a `RewardCalculator` can train on it.

gymnasium is an optional dependency (`pip install retrain[gym]`); it is imported when a
`GymEnvironment` is built, so importing this module (and the reward) does not need it.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Optional

from retrain.core.records import Message, PromptRecord
from retrain.environment.base import Environment, EnvironmentObservation, LLMAction, PolicyClient, Trajectory

# Action names by environment family (the env id without namespace and version), in action order.
DEFAULT_ACTION_NAMES: dict[str, list[str]] = {
    "FrozenLake": ["left", "down", "right", "up"],
    "Blackjack": ["stick", "hit"],
    "Taxi": ["south", "north", "east", "west", "pickup", "dropoff"],
    "CliffWalking": ["up", "right", "down", "left"],
}

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_INTEGER = re.compile(r"(?<![\w.\-])\d+(?!\w|\.\d)")


def _import_gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError as err:
        raise ImportError(
            "GymEnvironment needs gymnasium: pip install 'gymnasium>=1.0' (or retrain[gym])."
        ) from err
    return gymnasium


def env_family(env_id: str) -> str:
    """The environment's name without namespace or version: 'ns/FrozenLake8x8-v1' -> 'FrozenLake8x8'."""
    name = env_id.rsplit("/", 1)[-1]
    return re.sub(r"-v\d+$", "", name)


def _supports_render_mode(gymnasium: Any, env_id: str, mode: str) -> bool:
    """Whether the registered environment lists `mode` among its render modes (False when unknown)."""
    try:
        spec = gymnasium.spec(env_id)
        creator = spec.entry_point
        if not callable(creator):
            creator = gymnasium.envs.registration.load_env_creator(creator)
        metadata = getattr(creator, "metadata", None)
        return isinstance(metadata, dict) and mode in (metadata.get("render_modes") or [])
    except Exception:  # an unusual registration: fall back to no text rendering
        return False


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists (trajectories get logged)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class GymEnvironment(Environment):
    """A gymnasium environment with a `Discrete` action space, played by the policy in text.

    Each spawned episode makes its own gym environment (gym environments are stateful and are not
    shared between concurrent episodes). The first observation is the record's prompt (if any), the
    rendered state and the instructions; later observations are the rendered state and the reward.

    Args:
        env_id: the gymnasium id, e.g. "FrozenLake-v1", "Blackjack-v1", "Taxi-v3" (gymnasium >= 1.4:
            "Taxi-v4"), "CliffWalking-v1".
        env_kwargs: keyword arguments for `gymnasium.make`, e.g. `{"is_slippery": false}`. The
            environment is made with `render_mode="ansi"` when it supports text rendering and no
            render mode is given here.
        max_turns: the most policy actions in one episode (gymnasium's own time limit also applies).
        action_names: a name for each discrete action, in action order. Default: built-in names
            for FrozenLake, Blackjack, Taxi and CliffWalking, otherwise the digits "0".."n-1".
        invalid_action_reward: the step reward for a reply that names no valid action.
        max_invalid_actions: the episode ends after this many invalid replies.
        system_prompt: when set, the first observation is chat messages with this system message
            first (so the tokenizer's chat template applies).
        instructions: text appended to the first observation. Default: the valid action names and a
            request to reply with exactly one of them. An empty string appends nothing.
        seed: the reset seed when a record gives none (a record's `metadata["seed"]`, or an integer
            `answer`, wins). Default: no seed, so each episode starts from a random layout.
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: Optional[dict[str, Any]] = None,
        max_turns: int = 20,
        action_names: Optional[list[str]] = None,
        invalid_action_reward: float = -0.1,
        max_invalid_actions: int = 3,
        system_prompt: Optional[str] = None,
        instructions: Optional[str] = None,
        seed: Optional[int] = None,
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}.")
        if max_invalid_actions < 1:
            raise ValueError(f"max_invalid_actions must be at least 1, got {max_invalid_actions}.")
        if not math.isfinite(invalid_action_reward):
            raise ValueError(f"invalid_action_reward must be a finite number, got {invalid_action_reward}.")
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.max_turns = max_turns
        self.invalid_action_reward = float(invalid_action_reward)
        self.max_invalid_actions = max_invalid_actions
        self.system_prompt = system_prompt
        self.seed = seed
        self.family = env_family(env_id)

        gymnasium = _import_gymnasium()
        if "render_mode" not in self.env_kwargs and _supports_render_mode(gymnasium, env_id, "ansi"):
            self.env_kwargs["render_mode"] = "ansi"
        self.renders_text = self.env_kwargs.get("render_mode") == "ansi"

        # Build one environment now so a wrong id, option or action space fails at config time.
        probe = gymnasium.make(env_id, **self.env_kwargs)
        try:
            space = probe.action_space
            if not isinstance(space, gymnasium.spaces.Discrete):
                raise ValueError(
                    f"GymEnvironment needs a Discrete action space; {env_id} has {space}. "
                    "Wrap the environment (e.g. discretise its actions) and register the wrapper."
                )
            self.num_actions = int(space.n)
            self.action_start = int(space.start)
        finally:
            probe.close()

        if action_names is None:
            default = next((v for k, v in DEFAULT_ACTION_NAMES.items() if self.family.startswith(k)), None)
            if default is not None and len(default) == self.num_actions:
                action_names = default
            else:
                action_names = [str(self.action_start + i) for i in range(self.num_actions)]
        action_names = [str(name).strip() for name in action_names]
        if len(action_names) != self.num_actions:
            raise ValueError(
                f"action_names has {len(action_names)} names but {env_id} has {self.num_actions} actions."
            )
        if any(not name for name in action_names) or len({n.lower() for n in action_names}) != len(action_names):
            raise ValueError(f"action_names must be distinct and non-empty (case-insensitively), got {action_names}.")
        self.action_names = action_names
        self.instructions = (
            instructions
            if instructions is not None
            else f"Valid actions: {', '.join(action_names)}. Reply with exactly one of them."
        )
        self._patterns = [
            re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, name.split())) + r"(?!\w)", re.IGNORECASE)
            for name in action_names
        ]
        self._env: Any = None  # the episode's gym environment, made in reset()
        self._invalid_actions = 0
        self._gym_return = 0.0
        self._terminated = False
        self._done = False

    # --- episode lifecycle -------------------------------------------------------------------

    def spawn(self) -> "GymEnvironment":
        episode = super().spawn()
        assert isinstance(episode, GymEnvironment)
        episode._env = None  # never share the template's (or another episode's) gym environment
        return episode

    def make_env(self) -> Any:
        """A new gym environment for one episode (override to add wrappers)."""
        return _import_gymnasium().make(self.env_id, **self.env_kwargs)

    def record_seed(self, record: PromptRecord) -> Optional[int]:
        """The reset seed for `record`: `metadata["seed"]`, else an integer `answer`, else `self.seed`."""
        seed = record.metadata.get("seed")
        if seed is None and isinstance(record.answer, int) and not isinstance(record.answer, bool):
            seed = record.answer
        if seed is None:
            return self.seed
        try:
            return int(seed)
        except (TypeError, ValueError):
            raise ValueError(f"The record's seed must be an integer, got {seed!r}.") from None

    async def reset(self, record: PromptRecord) -> EnvironmentObservation:
        if self._env is None:
            self._env = self.make_env()
        obs, info = self._env.reset(seed=self.record_seed(record))
        self._invalid_actions = 0
        self._gym_return = 0.0
        self._terminated = False
        self._done = False
        parts = [self.render_observation(obs, info)]
        if self.instructions:
            parts.append(self.instructions)
        text = "\n\n".join(parts)
        return EnvironmentObservation(content=self._first_content(record, text), info=_plain(dict(info)))

    def _first_content(self, record: PromptRecord, text: str) -> Any:
        if record.is_chat:
            messages: list[Message] = [dict(m) for m in record.prompt]
            if messages and messages[-1].get("role") == "user" and isinstance(messages[-1].get("content"), str):
                messages[-1]["content"] = f"{messages[-1]['content']}\n\n{text}"
            else:
                messages.append({"role": "user", "content": text})
        else:
            prompt = (record.prompt or "").strip()
            if self.system_prompt is None:
                return f"{prompt}\n\n{text}" if prompt else text
            messages = [{"role": "user", "content": f"{prompt}\n\n{text}" if prompt else text}]
        if self.system_prompt is not None:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    async def step(self, action: LLMAction) -> EnvironmentObservation:
        if self._env is None:
            raise RuntimeError("GymEnvironment.step() called before reset().")
        if self._done:
            raise RuntimeError("GymEnvironment.step() called after the episode ended; call reset() first.")
        choice = self.parse_action_text(action.text)
        if choice is None:
            return self._invalid_action()
        obs, step_reward, terminated, truncated, info = self._env.step(choice)
        done = bool(terminated or truncated)
        self._done = done
        self._terminated = bool(terminated)
        step_reward = float(step_reward)
        self._gym_return += step_reward
        lines = [self.render_observation(obs, info), f"Reward: {step_reward:g}."]
        if done:
            lines.append("The episode is over.")
        info = {**_plain(dict(info)), "action": int(choice), "terminated": bool(terminated), "truncated": bool(truncated)}
        return EnvironmentObservation(content="\n" + "\n".join(lines) + "\n", reward=step_reward, done=done, info=info)

    def _invalid_action(self) -> EnvironmentObservation:
        self._invalid_actions += 1
        done = self._invalid_actions >= self.max_invalid_actions
        self._done = done
        text = (
            f"Invalid action: your reply names none of the valid actions. "
            f"Valid actions: {', '.join(self.action_names)}. Reply with exactly one of them."
        )
        if done:
            text += f" That was invalid action {self._invalid_actions} of {self.max_invalid_actions}; the episode is over."
        info = {"invalid_action": True, "invalid_actions": self._invalid_actions}
        return EnvironmentObservation(content=f"\n{text}\n", reward=self.invalid_action_reward, done=done, info=info)

    def episode_metrics(self) -> dict[str, float]:
        """The episode's gymnasium return (without invalid-action penalties), whether it reached a
        terminal state, and its number of invalid actions."""
        return {
            "gym_return": self._gym_return,
            "terminated": float(self._terminated),
            "invalid_actions": float(self._invalid_actions),
        }

    async def rollout(
        self, record: PromptRecord, policy: PolicyClient, max_completion_tokens: Optional[int] = None
    ) -> Trajectory:
        """Run one episode (see `Environment.rollout`), then close this episode's gym environment."""
        try:
            return await super().rollout(record, policy, max_completion_tokens)
        finally:
            self._close_env()

    async def close(self) -> None:
        self._close_env()

    def _close_env(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            env.close()

    # --- text in, text out -------------------------------------------------------------------

    def parse_action_text(self, text: str) -> Optional[int]:
        """The gym action named in `text`, or None.

        The last valid action name wins (case-insensitive, whole words). When no name appears, the
        last bare integer that is a valid action is taken.
        """
        best: Optional[tuple[int, int, int]] = None  # (end, length, index): latest end, then longest
        for index, pattern in enumerate(self._patterns):
            for match in pattern.finditer(text):
                key = (match.end(), match.end() - match.start(), index)
                if best is None or key[:2] > best[:2]:
                    best = key
        if best is not None:
            return self.action_start + best[2]
        for match in reversed(list(_INTEGER.finditer(text))):
            value = int(match.group())
            if self.action_start <= value < self.action_start + self.num_actions:
                return value
        return None

    def render_observation(self, obs: Any, info: dict[str, Any]) -> str:
        """The state as text: the environment's own text rendering (colours removed) and a description."""
        if self.family.startswith("Blackjack") and isinstance(obs, tuple) and len(obs) == 3:
            player, dealer, usable_ace = (int(x) for x in obs)
            shown = "an ace" if dealer == 1 else str(dealer)
            return f"Your sum is {player}, the dealer shows {shown}, usable ace: {'yes' if usable_ace else 'no'}."
        lines = []
        if self.renders_text and self._env is not None:
            board = self._env.render()
            if isinstance(board, str):
                board = _ANSI_ESCAPE.sub("", board)
                board = "\n".join(line.rstrip() for line in board.splitlines()).strip("\n")
                if board.strip():
                    lines.append(board)
        lines.append(self.describe_observation(obs))
        return "\n".join(lines)

    def describe_observation(self, obs: Any) -> str:
        """One line about the raw observation (positions for the grid tasks, else `str(obs)`)."""
        env = self._env.unwrapped if self._env is not None else None
        state = int(obs) if isinstance(obs, numbers.Integral) and not isinstance(obs, bool) else None
        if state is not None and self.family.startswith("Taxi") and hasattr(env, "decode"):
            row, col, passenger, destination = (int(x) for x in env.decode(state))
            letters = "RGYB"
            where = "in the taxi" if passenger == 4 else f"at {letters[passenger]}"
            return (
                f"Taxi at row {row}, column {col}; passenger {where}; destination {letters[destination]}. "
                f"(Rows and columns count from 0; observation {state}.)"
            )
        if state is not None and self.family.startswith("FrozenLake") and hasattr(env, "ncol"):
            row, col = divmod(state, int(env.ncol))
            return (
                f"You are at row {row}, column {col} (counting from 0; observation {state}). "
                "S start, F frozen, H hole, G goal."
            )
        if state is not None and self.family.startswith("CliffWalking") and hasattr(env, "shape"):
            row, col = divmod(state, int(env.shape[1]))
            return (
                f"You (x) are at row {row}, column {col} (counting from 0; observation {state}). "
                "C cliff, T goal."
            )
        return f"Observation: {_plain(obs)}"
