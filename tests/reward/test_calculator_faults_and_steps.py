"""RewardCalculator: on_error policies, timeouts, sync functions off the event loop, step rewards."""

import asyncio
import math
import threading
import uuid

import pytest

from retrain.core.records import PromptRecord
from retrain.environment.base import EnvironmentObservation, LLMAction, Trajectory, Turn
from retrain.reward.calculator import RewardCalculator, RewardError, RewardSpec
from retrain.reward.registry import reward


def _name(base):
    return f"{base}_{uuid.uuid4().hex[:8]}"


def trajectory(*turns, answer="7"):
    """turns: (text, env_step_reward) pairs."""
    return Trajectory(
        record=PromptRecord(prompt="p", answer=answer),
        prompt_ids=[1],
        turns=[Turn(LLMAction(text=text), EnvironmentObservation(reward=r)) for text, r in turns],
    )


FLAKY = _name("flaky")
SLOW_SYNC = _name("slow_sync")
HANGS = _name("hangs")
NAN = _name("nan")
TURN_LEN = _name("turn_len")


@reward(name=FLAKY)
def flaky(completion: str) -> float:
    if "boom" in completion:
        raise ValueError("cannot parse")
    return 1.0


REWARD_BLOCKING = threading.Event()  # set by the sync reward once it has started blocking
LOOP_TICKED = threading.Event()  # then set by a coroutine on the event loop that scores the rollouts
HANG_GUARD = 30.0  # seconds: only a broken schedule waits this long


@reward(name=SLOW_SYNC)
def slow_sync(completion: str) -> float:
    # Blocks until the event loop has run another coroutine meanwhile: possible only off the loop.
    REWARD_BLOCKING.set()
    if not LOOP_TICKED.wait(HANG_GUARD):
        raise RuntimeError("the event loop did not run while this sync reward blocked")
    return float(len(completion))


@reward(name=HANGS)
async def hangs(completion: str) -> float:
    await asyncio.sleep(3600)  # only the timeout ends this
    return 1.0


@reward(name=NAN)
def nan_reward(completion: str) -> float:
    return math.nan


@reward(name=TURN_LEN)
def turn_len(completion: str, turn: int) -> float:
    return len(completion) + 10 * turn


def test_penalty_policy_scores_and_counts_failures():
    calc = RewardCalculator([RewardSpec(name=FLAKY, on_error="penalty", error_penalty=-1.0)])
    result = calc.score([trajectory(("fine", 0)), trajectory(("boom", 0)), trajectory(("boom!", 0))])
    assert result.total == [1.0, -1.0, -1.0]
    assert result.errors == {FLAKY: 2}


def test_raise_policy_names_the_function_and_prompt():
    with pytest.raises(RewardError, match=f"reward '{FLAKY}' raised ValueError: cannot parse .prompt 'p'"):
        RewardCalculator([RewardSpec(name=FLAKY)]).score([trajectory(("boom", 0))])


def test_nan_is_a_fault_that_penalty_absorbs():
    with pytest.raises(RewardError, match="rewards must be finite"):
        RewardCalculator([RewardSpec(name=NAN)]).score([trajectory(("x", 0))])
    result = RewardCalculator([RewardSpec(name=NAN, on_error="penalty")]).score([trajectory(("x", 0))])
    assert result.total == [0.0] and result.errors == {NAN: 1}


def test_timeout_cuts_a_hanging_reward():
    calc = RewardCalculator([RewardSpec(name=HANGS, timeout=0.2, on_error="penalty", error_penalty=-0.5)])
    result = calc.score([trajectory(("a", 0)), trajectory(("b", 0))])
    assert result.total == [-0.5, -0.5]  # the penalty, so the timeout fired (the call itself sleeps an hour)
    with pytest.raises(RewardError, match="timed out after 0.2 s"):
        RewardCalculator([RewardSpec(name=HANGS, timeout=0.2)]).score([trajectory(("a", 0))])


@pytest.mark.parametrize("options", [{"execution": "thread"}, {"timeout": HANG_GUARD}], ids=["thread", "timeout"])
def test_sync_rewards_run_off_the_event_loop(options):
    calc = RewardCalculator([RewardSpec(name=SLOW_SYNC, **options)])
    REWARD_BLOCKING.clear()
    LOOP_TICKED.clear()

    async def run():
        async def tick():  # only after a reward call is blocking, so an inline call could never see it
            while not REWARD_BLOCKING.is_set():
                await asyncio.sleep(0.001)
            LOOP_TICKED.set()

        ticker = asyncio.ensure_future(tick())
        result = await calc.ascore([trajectory(("abc", 0)) for _ in range(4)])
        await ticker
        return result

    assert asyncio.run(run()).total == [3.0] * 4  # the rewards saw the loop tick while they blocked


def test_step_rewards_per_turn_add_the_environment_reward():
    calc = RewardCalculator(
        rewards=[RewardSpec(name="exact_match")],
        step_rewards=[RewardSpec(name=TURN_LEN, weight=0.5)],
    )
    result = calc.score([trajectory(("ab", 1.0), ("7", 0.0)), trajectory(("xyz", 0.0))])
    # rollout 0: turn 0 -> 1.0 + 0.5 * (2 + 0) = 2.0; turn 1 -> 0.0 + 0.5 * (1 + 10) = 5.5
    # rollout 1: turn 0 -> 0.0 + 0.5 * 3 = 1.5
    assert result.step_total == [[2.0, 5.5], [1.5]]
    assert result.step_components == {TURN_LEN: [[2.0, 11.0], [3.0]]}
    # the rollout level sees all the policy's text: "ab7" != "7", "xyz" != "7"
    assert result.total == [0.0, 0.0]


def test_bad_fault_options_fail_at_construction():
    with pytest.raises(ValueError, match=r"reward.rewards\[0\].timeout must be > 0"):
        RewardCalculator([RewardSpec(name="exact_match", timeout=0)])
    with pytest.raises(ValueError, match=r"reward.step_rewards\[0\].on_error"):
        RewardCalculator([RewardSpec(name="exact_match")], step_rewards=[RewardSpec(name="exact_match", label="s", on_error="ignore")])
