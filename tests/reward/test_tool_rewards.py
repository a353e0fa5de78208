"""Tests for retrain.reward.tool_rewards.tool_use, on real Trajectory objects (built by hand, and
recorded by a real ToolEnvironment)."""

from __future__ import annotations

import asyncio
import doctest
import json
from typing import Optional

import pytest

import retrain.reward.tool_rewards as tool_rewards
from retrain.core.records import PromptRecord
from retrain.environment.base import EnvironmentObservation, Generation, LLMAction, ToolCall, Trajectory, Turn
from retrain.environment.tool_env import ToolEnvironment
from retrain.environment.tools import FunctionToolProvider
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.reward.tool_rewards import tool_use


def calls_turn(*calls: tuple[str, str], parse_error: Optional[str] = None) -> Turn:
    """A turn calling tools: each call is (tool name, the result string the environment gave)."""
    action = LLMAction(text="<tool_call>...</tool_call>", tool_calls=[ToolCall(name, {}) for name, _ in calls], parse_error=parse_error)
    results = [result for _, result in calls] if parse_error is None else [f"Error: {parse_error}"]
    return Turn(action, EnvironmentObservation(content=[], info={"tool_results": results}))


def answer_turn(text: str = "42") -> Turn:
    return Turn(LLMAction(text=text), EnvironmentObservation(done=True))


def episode(*turns: Turn, metrics: Optional[dict[str, float]] = None) -> Trajectory:
    return Trajectory(record=PromptRecord(prompt="q"), prompt_ids=[0], turns=list(turns), metrics=dict(metrics or {}))


# --------------------------------------------------------------------------- the definition, by hand


@pytest.mark.parametrize(
    "turns, options, expected",
    [
        # no tool use at all
        ([answer_turn()], {}, 0.0),
        ([answer_turn()], {"expected_tools": ["search"]}, 0.0),
        # any clean call, nothing expected: coverage 1, no errors
        ([calls_turn(("search", "ok")), answer_turn()], {}, 1.0),
        # both expected tools, clean: 1 - 0
        ([calls_turn(("search", "ok")), calls_turn(("calc", "4")), answer_turn()], {"expected_tools": ["search", "calc"]}, 1.0),
        # both expected, one of two calls failed: 1 - 0.5 * 1/2
        ([calls_turn(("search", "ok"), ("calc", "Error: division by zero")), answer_turn()], {"expected_tools": ["search", "calc"]}, 0.75),
        # one of two expected, clean: 1/2 - 0
        ([calls_turn(("search", "ok")), answer_turn()], {"expected_tools": ["search", "calc"]}, 0.5),
        # a tool called three times counts once for coverage; 1 of 3 attempts failed: 1 - 0.5 * 1/3
        ([calls_turn(("search", "ok"), ("search", "Error: timed out"), ("search", "ok"))], {"expected_tools": ["search"]}, 1 - 0.5 / 3),
        # only a wrong, unknown tool: 0 - 0.5 * 1
        ([calls_turn(("lookup", "Error: unknown tool 'lookup'"))], {"expected_tools": ["search"]}, -0.5),
        # the same with any-call scoring: the call was made (coverage 1) but failed: 1 - 0.5
        ([calls_turn(("lookup", "Error: unknown tool 'lookup'"))], {}, 0.5),
        # clipped at -1: 0 - 3 * 1
        ([calls_turn(("lookup", "Error: no"))], {"expected_tools": ["search"], "error_penalty": 3.0}, -1.0),
        # error_penalty 0: coverage only
        ([calls_turn(("search", "Error: down"))], {"expected_tools": ["search", "calc"], "error_penalty": 0.0}, 0.5),
        # a parse error is a failed attempt: 1 clean call + 1 parse error: 1 - 0.5 * 1/2
        ([calls_turn(parse_error="not valid JSON"), calls_turn(("search", "ok"))], {"expected_tools": ["search"]}, 0.75),
        # a turn with a parse error runs none of its calls, so `search` there is not "called":
        # coverage 0, 1 failed attempt of 1: 0 - 0.5
        ([calls_turn(("search", ""), parse_error="a <tool_call> has no matching </tool_call>")], {"expected_tools": ["search"]}, -0.5),
        # duplicate expected names count once: 1/1 - 0
        ([calls_turn(("search", "ok"))], {"expected_tools": ["search", "search"]}, 1.0),
        # a single string is one tool name
        ([calls_turn(("search", "ok"))], {"expected_tools": "search"}, 1.0),
        # results with leading whitespace before "Error:" are errors too: 1 - 0.5
        ([calls_turn(("search", "  Error: x"))], {"expected_tools": ["search"]}, 0.5),
        # "error" elsewhere in a result is not a failure
        ([calls_turn(("search", "no Error: here"))], {"expected_tools": ["search"]}, 1.0),
    ],
)
def test_tool_use_by_hand(turns, options, expected):
    assert tool_use(trajectory=episode(*turns), **options) == pytest.approx(expected)


def test_metrics_are_used_when_observations_hold_no_results():
    # A custom environment that records counts but no per-call results.
    action = LLMAction(text="...", tool_calls=[ToolCall("search"), ToolCall("calc")])
    trajectory = episode(
        Turn(action, EnvironmentObservation()),
        answer_turn(),
        metrics={"tool_calls": 2.0, "tool_errors": 0.0, "tool_timeouts": 1.0, "parse_errors": 1.0},
    )
    # coverage 2/2; attempts 2 + 1, failures 0 + 1 + 1: 1 - 0.5 * 2/3
    assert tool_use(trajectory=trajectory, expected_tools=["search", "calc"]) == pytest.approx(1 - 1 / 3)


def test_actions_alone_when_nothing_else_is_recorded():
    trajectory = episode(
        Turn(LLMAction(text="...", tool_calls=[ToolCall("search")]), EnvironmentObservation()),
        Turn(LLMAction(text="...", tool_calls=[ToolCall("calc")], parse_error="bad"), EnvironmentObservation()),
        answer_turn(),
    )
    # `calc` sits in a parse-error turn: coverage 1/2; attempts 1 call + 1 parse error, 1 failed
    assert tool_use(trajectory=trajectory, expected_tools=["search", "calc"]) == pytest.approx(0.5 - 0.5 * 0.5)


def test_as_a_step_reward_scores_one_turn():
    first = calls_turn(("search", "ok"))
    second = calls_turn(("calc", "Error: boom"))
    trajectory = episode(first, second, answer_turn())
    expected = ["search", "calc"]
    assert tool_use(trajectory=trajectory, action=first.action, observation=first.observation, expected_tools=expected) == 0.5
    assert tool_use(trajectory=trajectory, action=second.action, observation=second.observation, expected_tools=expected) == 0.0
    # the whole episode: coverage 1, 1 of 2 failed
    assert tool_use(trajectory=trajectory, expected_tools=expected) == 0.75


@pytest.mark.parametrize("penalty", [-0.1, float("nan"), float("inf")])
def test_bad_error_penalty_raises(penalty):
    with pytest.raises(ValueError, match="error_penalty"):
        tool_use(trajectory=episode(answer_turn()), error_penalty=penalty)


def test_without_trajectory_raises():
    with pytest.raises(ValueError, match="trajectory"):
        tool_use(expected_tools=["search"])


# --------------------------------------------------------------------------- episodes from a real ToolEnvironment


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first.
        b: second.
    """
    return a + b


def divide(a: int, b: int) -> float:
    """Divide a by b.

    Args:
        a: numerator.
        b: denominator.
    """
    return a / b


def call(name: str, **arguments) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def run_episode(script: list[str], max_turns: int = 6) -> Trajectory:
    """Step a real ToolEnvironment through the policy texts in `script`; return the trajectory."""

    async def main() -> Trajectory:
        environment = ToolEnvironment(FunctionToolProvider([add, divide]), max_turns=max_turns, tool_timeout=5.0)
        await environment.setup()
        try:
            record = PromptRecord(prompt="compute")
            await environment.reset(record)
            trajectory = Trajectory(record=record, prompt_ids=[0])
            for text in script:
                action = environment.parse_action(Generation(token_ids=[1], text=text, truncated=False))
                observation = await environment.step(action)
                trajectory.turns.append(Turn(action, observation))
                if observation.done:
                    break
            trajectory.metrics = environment.episode_metrics()
            return trajectory
        finally:
            await environment.close()

    return asyncio.run(main())


def test_on_a_recorded_tool_environment_episode():
    trajectory = run_episode(
        [
            call("add", a=1, b=2) + call("divide", a=1, b=0),  # add works, divide raises
            call("multiply", a=2, b=3),  # unknown tool
            '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>',  # not valid JSON
            call("add", a=3, b=4),  # works
            "The answer is 7.",
        ]
    )
    assert trajectory.metrics == {"tool_calls": 4.0, "tool_errors": 2.0, "tool_timeouts": 0.0, "parse_errors": 1.0}
    # attempts: 2 + 1 + 1 (parse error) + 1 = 5; failed: divide, multiply, the parse error = 3
    # expected add, divide: both called -> coverage 1; 1 - 0.5 * 3/5 = 0.7
    assert tool_use(trajectory=trajectory, expected_tools=["add", "divide"]) == pytest.approx(0.7)
    # expected add, sqrt: 1/2 - 0.5 * 3/5 = 0.2
    assert tool_use(trajectory=trajectory, expected_tools=["add", "sqrt"]) == pytest.approx(0.2)
    # the metrics-only path agrees: (4 + 1) attempts, (2 + 0 + 1) failures
    stripped = Trajectory(record=trajectory.record, prompt_ids=[0], metrics=trajectory.metrics,
                          turns=[Turn(t.action, EnvironmentObservation()) for t in trajectory.turns])
    assert tool_use(trajectory=stripped, expected_tools=["add", "divide"]) == pytest.approx(0.7)


def test_calls_over_the_per_turn_limit_count_as_failed():
    # ToolEnvironment runs at most 4 calls per turn; the fifth gets an error result.
    trajectory = run_episode([call("add", a=1, b=1) * 5, "2"])
    # coverage 1 (add); 1 of 5 attempts failed: 1 - 0.5 * 1/5
    assert tool_use(trajectory=trajectory, expected_tools=["add"]) == pytest.approx(0.9)


# --------------------------------------------------------------------------- through the calculator


def test_through_the_reward_calculator():
    rollouts = [
        episode(calls_turn(("search", "ok"), ("calc", "Error: x")), answer_turn()),
        episode(answer_turn()),
        episode(calls_turn(("lookup", "Error: unknown tool")), answer_turn()),
    ]
    result = RewardCalculator([RewardSpec(name="tool_use", kwargs={"expected_tools": ["search", "calc"]})]).score(rollouts)
    assert result.total == [pytest.approx(0.75), 0.0, pytest.approx(-0.5)]
    weighted = RewardCalculator([RewardSpec(name="tool_use", weight=2.0, kwargs={"error_penalty": 1.0})]).score(rollouts)
    # any-call scoring: [1 - 1/2, 0, 1 - 1] doubled
    assert weighted.components == {"tool_use": [0.5, 0.0, 0.0]}
    assert weighted.total == [1.0, 0.0, 0.0]


def test_as_a_step_reward_through_the_calculator():
    rollout = episode(calls_turn(("search", "ok")), calls_turn(("calc", "Error: boom")), answer_turn())
    calculator = RewardCalculator(
        [], step_rewards=[RewardSpec(name="tool_use", kwargs={"expected_tools": ["search", "calc"]})]
    )
    result = calculator.score([rollout])
    # per turn: search alone 1/2 - 0; calc alone 1/2 - 0.5 * 1; the answer turn 0
    assert result.step_components == {"tool_use": [[0.5, 0.0, 0.0]]}


def test_doctests_pass():
    result = doctest.testmod(tool_rewards)
    assert result.failed == 0
    assert result.attempted == 8
