"""Tool-use rewards: did the policy call the right tools, and did its calls work?

These read the episode (`trajectory`) that `ToolEnvironment` records: each turn's action holds the
parsed `tool_calls` (and a `parse_error` when a call could not be parsed), and the observation
after it holds `info["tool_results"]`, one result string per call (or one for a parse error),
where a failure starts with "Error:".
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from retrain.core.episode import Turn
from retrain.reward.registry import reward

ERROR_PREFIX = "Error:"


def _attempts_and_failures(turns: Sequence[Any], metrics: Optional[dict[str, float]]) -> tuple[int, int]:
    """How many tool-call attempts the turns hold, and how many of them failed.

    From the observations' `tool_results` where the environment recorded them (every result is an
    attempt: a call, or an unparsable call; one starting with "Error:" failed: unknown tool, bad
    arguments, a raising tool, a timeout, a call over the per-turn limit, a parse error). Without
    them, from the episode `metrics` (`tool_calls + parse_errors` attempts, `tool_errors +
    tool_timeouts + parse_errors` failures); without those, from the actions alone (each parsed
    call of a turn without a parse error an attempt, each parse error a failed attempt).
    """
    results = [
        turn.observation.info["tool_results"]
        for turn in turns
        if isinstance(getattr(turn.observation, "info", None), dict) and "tool_results" in turn.observation.info
    ]
    if results:
        flat = [str(result) for turn_results in results for result in turn_results]
        return len(flat), sum(result.lstrip().startswith(ERROR_PREFIX) for result in flat)
    if metrics and "tool_calls" in metrics:
        parse_errors = int(metrics.get("parse_errors", 0))
        failures = int(metrics.get("tool_errors", 0)) + int(metrics.get("tool_timeouts", 0)) + parse_errors
        return int(metrics["tool_calls"]) + parse_errors, failures
    parse_errors = sum(turn.action.parse_error is not None for turn in turns)
    calls = sum(len(turn.action.tool_calls) for turn in turns if turn.action.parse_error is None)
    return calls + parse_errors, parse_errors


@reward
def tool_use(
    trajectory: Any = None,
    expected_tools: Sequence[str] = (),
    error_penalty: float = 0.5,
    action: Any = None,
    observation: Any = None,
    **_: Any,
) -> float:
    """Reward calling the expected tools, penalise tool calls that fail.

        coverage   = (expected tools called at least once) / len(expected_tools)   if expected_tools
                     1.0 if any tool call was made, else 0.0                         otherwise
        error_rate = failed attempts / attempts                (0.0 with no attempts)
        reward     = clip(coverage - error_penalty * error_rate, -1, 1)

    A tool counts as called when any parsed call names it, even if that call then failed (the
    failure is what `error_rate` charges); calls in a turn that also holds an unparsable call are
    not run (the environment answers the parse error instead) and do not count. Repeated names in
    `expected_tools` count once. An attempt is a parsed tool call or a turn whose tool call could
    not be parsed; it failed when its result starts with "Error:" (unknown tool, invalid
    arguments, the tool raised, it timed out, it exceeded the per-turn limit) or it did not parse.
    So: no tool use scores 0.0; using every expected tool cleanly scores 1.0; with
    `expected_tools`, only failed calls to other tools score `-error_penalty` (clipped at -1).

    As a step reward (called with one turn's `action` and `observation`) it scores that turn alone;
    otherwise the whole `trajectory`.

    Args:
        expected_tools: tool names the policy should call; empty rewards calling any tool.
        error_penalty: how much a 100% failure rate costs (>= 0).

    Examples (two expected tools; `search` worked, `calc` returned "Error: ..."):
    coverage 2/2 = 1.0, error_rate 1/2, reward 1.0 - 0.5 * 0.5 = 0.75. Only `search`, once, fine:
    0.5 - 0 = 0.5. One unparsable call and nothing else: 0.0 - 0.5 * 1 = -0.5.

    >>> from retrain.core.records import PromptRecord
    >>> from retrain.core.episode import EnvironmentObservation as Obs, LLMAction, ToolCall, Trajectory, Turn
    >>> calls = LLMAction(text="...", tool_calls=[ToolCall("search", {"q": "x"}), ToolCall("calc", {})])
    >>> results = Obs(info={"tool_results": ["found it", "Error: division by zero"]})
    >>> episode = Trajectory(PromptRecord("p"), [0], turns=[Turn(calls, results), Turn(LLMAction("42"), Obs(done=True))])
    >>> tool_use(trajectory=episode, expected_tools=["search", "calc"])
    0.75
    >>> tool_use(trajectory=episode, expected_tools=["search", "calc", "browse", "sql"], error_penalty=1.0)
    0.0
    >>> tool_use(trajectory=episode)  # any tool call: coverage 1.0
    0.75
    """
    if isinstance(expected_tools, str):
        expected_tools = [expected_tools]
    expected = list(dict.fromkeys(str(name) for name in expected_tools))
    penalty = float(error_penalty)
    if not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"reward 'tool_use': error_penalty must be a finite number >= 0, got {error_penalty!r}.")
    if action is not None and observation is not None:  # a step reward: this turn only
        turns: Sequence[Any] = [Turn(action, observation)]
        metrics = None
    elif trajectory is not None:
        turns, metrics = trajectory.turns, trajectory.metrics
    else:
        raise ValueError("reward 'tool_use' needs the trajectory.")

    # A turn with an unparsable call runs none of its calls (ToolEnvironment answers the parse error).
    called = {call.name for turn in turns if turn.action.parse_error is None for call in turn.action.tool_calls}
    if expected:
        coverage = sum(name in called for name in expected) / len(expected)
    else:
        coverage = 1.0 if called else 0.0
    attempts, failures = _attempts_and_failures(turns, metrics)
    error_rate = failures / attempts if attempts else 0.0
    return max(-1.0, min(1.0, coverage - penalty * error_rate))
