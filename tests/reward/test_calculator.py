"""Tests for retrain.reward.calculator.RewardCalculator, on real Trajectory objects."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid

import pytest

from retrain.core.errors import ConfigError
from retrain.reward.calculator import RewardCalculator, RewardError, RewardResult, RewardSpec, VerifierSpec
from retrain.reward.registry import REWARDS, VERIFIERS, reward, verifier


@pytest.fixture(autouse=True)
def _restore_registries():
    saved_rewards, saved_verifiers = dict(REWARDS._functions), dict(VERIFIERS._functions)
    yield
    REWARDS._functions.clear()
    REWARDS._functions.update(saved_rewards)
    VERIFIERS._functions.clear()
    VERIFIERS._functions.update(saved_verifiers)


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def register_reward(function) -> str:
    name = _unique(function.__name__)
    reward(name)(function)
    return name


def register_verifier(function) -> str:
    name = _unique(function.__name__)
    verifier(name)(function)
    return name


# --------------------------------------------------------------------------- totals and components


def test_weighted_total_by_hand(one_turn):
    calc = RewardCalculator(
        [
            RewardSpec(name="exact_match", weight=2.0),
            RewardSpec(name="length_penalty", weight=0.5, kwargs={"max_length": 4}),
        ]
    )
    result = calc.score(
        [
            one_turn("abcdef", answer="abcdef"),
            one_turn("abc", answer="xyz"),
        ]
    )
    # rollout 0: exact 1.0; length 6 vs max 4 -> excess 2/4 -> -0.5;  total = 2*1 + 0.5*(-0.5) = 1.75
    # rollout 1: exact 0.0; length 3 <= 4 -> 0;                      total = 0
    assert isinstance(result, RewardResult)
    assert result.total == pytest.approx([1.75, 0.0])
    # components are the unweighted values, by label
    assert result.components["exact_match"] == pytest.approx([1.0, 0.0])
    assert result.components["length_penalty"] == pytest.approx([-0.5, 0.0])
    assert result.verifier_passed == {}
    assert calc.labels == ["exact_match", "length_penalty"]


def test_specs_given_as_dicts(one_turn):
    calc = RewardCalculator([{"name": "exact_match", "weight": 3.0}])
    # exact 1.0 * weight 3.0 = 3.0
    assert calc.score([one_turn(" 7 ", answer=7)]).total == [3.0]


def test_negative_weight(one_turn):
    calc = RewardCalculator([RewardSpec(name="exact_match", weight=-1.5)])
    assert calc.score([one_turn("a", answer="a")]).total == [-1.5]


def test_empty_batch():
    calc = RewardCalculator([RewardSpec(name="exact_match")])
    result = calc.score([])
    assert result.total == []
    assert result.components == {"exact_match": []}


# --------------------------------------------------------------------------- verifier gating


def test_verifier_gating_uses_penalty_and_reports_pass_fail(one_turn):
    calls = []

    def counting_exact(completion, answer):
        calls.append(completion)
        return 1.0 if completion == str(answer) else 0.0

    name = register_reward(counting_exact)
    calc = RewardCalculator(
        [
            RewardSpec(
                name=name,
                label="exact",
                weight=2.0,
                verifiers=["non_empty", {"name": "matches_regex", "kwargs": {"pattern": r"^\d+$"}}],
                verifier_penalty=-1.0,
            )
        ]
    )
    result = calc.score(
        [
            one_turn("42", answer="42"),  # both verifiers pass -> f = 1.0 -> 2.0
            one_turn("", answer="42"),  # non_empty fails, regex fails -> penalty -1 -> -2.0
            one_turn("4x2", answer="4x2"),  # non_empty passes, regex fails -> penalty -1 -> -2.0
            one_turn("41", answer="42"),  # both pass -> f = 0.0 -> 0.0
        ]
    )
    assert result.components["exact"] == [1.0, -1.0, -1.0, 0.0]
    assert result.total == [2.0, -2.0, -2.0, 0.0]
    assert result.verifier_passed == {
        r"matches_regex[pattern=^\d+$]": [True, False, False, True],
        "non_empty": [True, False, True, True],
    }
    # The function itself only ran on the rollouts that passed its verifiers.
    assert sorted(calls) == ["41", "42"]
    assert calc.verifier_names == [r"matches_regex[pattern=^\d+$]", "non_empty"]


def test_verifier_given_as_verifier_spec_object(one_turn):
    calc = RewardCalculator(
        [RewardSpec(name="exact_match", verifiers=[VerifierSpec(name="matches_regex", kwargs={"pattern": "b"})])]
    )
    result = calc.score([one_turn("abc", answer="abc"), one_turn("xyz", answer="xyz")])
    assert result.total == [1.0, 0.0]  # "xyz" has no "b": gated to the default penalty 0.0
    assert result.verifier_passed == {"matches_regex[pattern=b]": [True, False]}  # options are part of the name


def test_not_truncated_verifier_sees_the_trajectory(one_turn):
    calc = RewardCalculator([RewardSpec(name="exact_match", verifiers=["not_truncated"], verifier_penalty=-0.5)])
    result = calc.score(
        [one_turn("a", answer="a"), one_turn("a", answer="a", truncated=True)]
    )
    assert result.total == [1.0, -0.5]
    assert result.verifier_passed == {"not_truncated": [True, False]}


def test_shared_verifier_reported_once_across_functions(one_turn):
    calc = RewardCalculator(
        [
            RewardSpec(name="exact_match", verifiers=["non_empty"], verifier_penalty=-1.0),
            RewardSpec(name="length_penalty", kwargs={"max_length": 1}, verifiers=["non_empty"], verifier_penalty=-2.0),
        ]
    )
    result = calc.score([one_turn("", answer="a"), one_turn("ab", answer="ab")])
    # rollout 0: non_empty fails -> -1.0 + -2.0 = -3.0
    # rollout 1: exact 1.0; length 2 vs 1 -> excess 1/1 -> -1.0; total 0.0
    assert result.total == [-3.0, 0.0]
    assert result.verifier_passed == {"non_empty": [False, True]}


def test_same_verifier_with_different_kwargs_on_two_functions(one_turn):
    calc = RewardCalculator(
        [
            RewardSpec(name="exact_match", label="a", verifiers=[{"name": "matches_regex", "kwargs": {"pattern": "x"}}]),
            RewardSpec(name="exact_match", label="b", verifiers=[{"name": "matches_regex", "kwargs": {"pattern": "y"}}]),
        ]
    )
    result = calc.score([one_turn("x", answer="x")])
    # "x" matches pattern "x" (a scores 1.0) but not "y" (b is gated to 0.0): total 1.0
    assert result.components == {"a": [1.0], "b": [0.0]}


def test_raising_verifier_gives_reward_error_naming_it(one_turn):
    def exploding_check(completion):
        raise RuntimeError("boom")

    name = register_verifier(exploding_check)
    calc = RewardCalculator([RewardSpec(name="exact_match", verifiers=[name])])
    with pytest.raises(RewardError) as err:
        calc.score([one_turn("a", answer="a")])
    assert f"verifier '{name}' raised RuntimeError: boom" in str(err.value)


# --------------------------------------------------------------------------- arguments reaching functions


def test_function_kwargs_are_passed_through(one_turn):
    calc = RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": r"<answer>\d+</answer>"})])
    result = calc.score([one_turn("so <answer>42</answer>"), one_turn("42")])
    assert result.total == [1.0, 0.0]


def test_record_fields_and_metadata_reach_reward_functions(one_turn):
    seen = []

    def spy(completion, prompt, answer, trajectory, difficulty, source, scale):
        seen.append(dict(completion=completion, prompt=prompt, answer=answer, trajectory=trajectory,
                         difficulty=difficulty, source=source, scale=scale))
        return difficulty * scale

    name = register_reward(spy)
    calc = RewardCalculator([RewardSpec(name=name, kwargs={"scale": 0.5})])
    trajectory = one_turn("out", prompt="in", answer="ans", metadata={"difficulty": 3, "source": "gsm8k"})

    result = calc.score([trajectory])

    assert result.total == [1.5]  # difficulty 3 * scale 0.5
    assert seen == [
        dict(completion="out", prompt="in", answer="ans", trajectory=trajectory, difficulty=3, source="gsm8k", scale=0.5)
    ]


def test_metadata_does_not_shadow_prompt_or_answer(one_turn):
    def echo_answer(answer):
        return float(answer)

    name = register_reward(echo_answer)
    calc = RewardCalculator([RewardSpec(name=name)])
    # A metadata key 'answer' can't override the record's answer (reward_kwargs puts it last).
    trajectory = one_turn("x", answer=2, metadata={"answer": 99})
    assert calc.score([trajectory]).total == [2.0]


def test_var_keyword_function_receives_everything(one_turn):
    seen = {}

    def everything(**kwargs):
        seen.update(kwargs)
        return 0.0

    name = register_reward(everything)
    RewardCalculator([RewardSpec(name=name, kwargs={"opt": 1})]).score(
        [one_turn("c", answer="a", metadata={"m": True})]
    )
    assert set(seen) == {"completion", "prompt", "answer", "trajectory", "m", "opt"}


# --------------------------------------------------------------------------- async


def test_async_reward_is_awaited(one_turn):
    async def async_length(completion):
        await asyncio.sleep(0)
        return len(completion)

    name = register_reward(async_length)
    result = RewardCalculator([RewardSpec(name=name)]).score([one_turn("abcd"), one_turn("")])
    assert result.total == [4.0, 0.0]


def test_async_verifier_is_awaited(one_turn):
    async def async_has_digit(completion):
        await asyncio.sleep(0)
        return any(c.isdigit() for c in completion)

    name = register_verifier(async_has_digit)
    calc = RewardCalculator([RewardSpec(name="exact_match", verifiers=[name], verifier_penalty=-1.0)])
    result = calc.score([one_turn("1", answer="1"), one_turn("a", answer="a")])
    assert result.total == [1.0, -1.0]
    assert result.verifier_passed == {name: [True, False]}


HANG_GUARD = 30.0  # seconds: only a broken (serial or deadlocked) schedule ever waits this long


def test_async_rewards_run_concurrently(one_turn):
    # All 4 rollouts' calls must be in flight at once to pass the event: a serial schedule never sets
    # it, and the first call fails after HANG_GUARD instead of hanging.
    in_flight, everyone_in = 0, None

    async def meets_the_others(completion):
        nonlocal in_flight, everyone_in
        everyone_in = everyone_in or asyncio.Event()
        in_flight += 1
        if in_flight == 4:
            everyone_in.set()
        await asyncio.wait_for(everyone_in.wait(), HANG_GUARD)
        return 1.0

    async def second(completion):
        return 2.0

    calc = RewardCalculator([RewardSpec(name=register_reward(meets_the_others)), RewardSpec(name=register_reward(second))])
    assert calc.score([one_turn(str(i)) for i in range(4)]).total == [3.0] * 4


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Clock:
    """A clock that only moves when a test says so: what "slow" means is the test's decision."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_inline_policy_moves_on_the_median_not_on_one_slow_call():
    from retrain.reward.calculator import InlinePolicy

    fast, slow = 0.0001, 0.5
    spike = InlinePolicy(threshold=0.002, window=5)
    assert [spike.observe(s) for s in [fast, slow, fast, fast, slow, fast, fast]] == [False] * 7  # one GC pause
    first_slow = InlinePolicy(threshold=0.002, window=5)
    assert [first_slow.observe(s) for s in [slow, fast, fast]] == [False] * 3  # a slow first call (a lazy import)
    blocking = InlinePolicy(threshold=0.002, window=5)
    assert [blocking.observe(s) for s in [slow, slow]] == [False, True]  # judged from the second call
    turning = InlinePolicy(threshold=0.002, window=5)
    assert [turning.observe(s) for s in [fast, fast, fast, slow, slow, slow]] == [False] * 5 + [True]  # 3 of the last 5
    assert turning.observe(fast) is True  # for good
    at_threshold = InlinePolicy(threshold=0.002, window=5)
    assert [at_threshold.observe(0.002) for _ in range(5)] == [False] * 5  # "exceeds" is strict


def test_where_sync_rewards_run_follows_execution_and_the_measured_cost(one_turn):
    seen: dict[str, list[bool]] = {"cheap": [], "blocking": [], "bounded": [], "inline": [], "thread": []}
    clock = Clock()

    def cheap(completion):
        seen["cheap"].append(on_main_thread())
        return 1.0

    def blocking(completion):  # e.g. an HTTP judge: each call costs 0.1 s on the test's clock
        seen["blocking"].append(on_main_thread())
        clock.now += 0.1
        return 1.0

    def bounded(completion):
        seen["bounded"].append(on_main_thread())
        return 1.0

    def inline(completion):  # measured slow, but declared inline
        seen["inline"].append(on_main_thread())
        clock.now += 1.0
        return 1.0

    def thread(completion):  # cheap, but declared as needing a thread
        seen["thread"].append(on_main_thread())
        return 1.0

    calc = RewardCalculator([
        RewardSpec(name=register_reward(cheap)), RewardSpec(name=register_reward(blocking)),
        RewardSpec(name=register_reward(bounded), timeout=5.0),
        RewardSpec(name=register_reward(inline), execution="inline"),
        RewardSpec(name=register_reward(thread), execution="thread"),
    ])
    calc._clock = clock
    assert calc.score([one_turn(str(i)) for i in range(8)]).total == [5.0] * 8

    assert seen["cheap"] == [True] * 8  # no thread hand-off for a check that costs nothing
    assert seen["blocking"] == [True, True] + [False] * 6  # two calls judged it; the rest ran in threads
    assert not any(seen["bounded"])  # a timeout needs a thread it can abandon
    assert seen["inline"] == [True] * 8 and not any(seen["thread"])


def test_a_blocking_reward_leaves_the_loop_on_the_real_clock(one_turn):
    # A sleep lasts at least its length, so on any machine these calls measure slow: the one
    # direction of the wall clock a test can rely on.
    seen = []

    def sleeps(completion):
        seen.append(on_main_thread())
        time.sleep(0.05)
        return 1.0

    calc = RewardCalculator([RewardSpec(name=register_reward(sleeps))])
    assert calc.score([one_turn(str(i)) for i in range(4)]).total == [1.0] * 4
    assert seen == [True, True, False, False]


def test_threaded_sync_rewards_overlap(one_turn):
    # The 4 calls meet at a barrier that only 4 concurrent threads can pass; a serial schedule
    # breaks it after HANG_GUARD and the reward raises.
    meeting = threading.Barrier(4, timeout=HANG_GUARD)

    def waits_for_the_others(completion):
        meeting.wait()
        return 1.0

    calc = RewardCalculator([RewardSpec(name=register_reward(waits_for_the_others), execution="thread")])
    assert calc.score([one_turn(str(i)) for i in range(4)]).total == [1.0] * 4


def test_inline_with_a_timeout_is_a_config_error():
    with pytest.raises(ConfigError, match=r"reward.rewards\[0\]: execution 'inline' cannot honour timeout=2"):
        RewardCalculator([RewardSpec(name="exact_match", execution="inline", timeout=2.0)])
    with pytest.raises(ConfigError, match=r"reward.rewards\[0\].execution must be 'auto', 'inline' or 'thread', got 'fast'"):
        RewardCalculator([RewardSpec(name="exact_match", execution="fast")])


def test_ascore_can_be_awaited_from_a_running_loop(one_turn):
    calc = RewardCalculator([RewardSpec(name="exact_match")])

    async def main():
        return await calc.ascore([one_turn("a", answer="a")])

    assert asyncio.run(main()).total == [1.0]


# --------------------------------------------------------------------------- failures while scoring


def test_raising_reward_gives_reward_error_naming_function(one_turn):
    def divides_by_zero(completion):
        return 1 / 0

    name = register_reward(divides_by_zero)
    calc = RewardCalculator([RewardSpec(name=name)])
    with pytest.raises(RewardError) as err:
        calc.score([one_turn("oops", prompt="the prompt")])
    message = str(err.value)
    assert f"reward '{name}' raised ZeroDivisionError" in message
    assert "'the prompt'" in message and "'oops'" in message
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_reward_error_uses_label(one_turn):
    calc = RewardCalculator([RewardSpec(name="exact_match", label="correct")])
    with pytest.raises(RewardError, match="reward 'correct' raised ValueError"):
        calc.score([one_turn("a")])  # no answer -> exact_match raises ValueError


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_return_gives_reward_error(bad, one_turn):
    def non_finite(completion):
        return bad

    name = register_reward(non_finite)
    with pytest.raises(RewardError) as err:
        RewardCalculator([RewardSpec(name=name)]).score([one_turn("x")])
    assert f"reward '{name}' returned {bad}" in str(err.value)
    assert "finite" in str(err.value)


@pytest.mark.parametrize("bad", ["not a number", None, [1.0], {"a": 1}])
def test_non_number_return_gives_reward_error(bad, one_turn):
    def returns_junk(completion):
        return bad

    name = register_reward(returns_junk)
    with pytest.raises(RewardError) as err:
        RewardCalculator([RewardSpec(name=name)]).score([one_turn("x")])
    assert f"reward '{name}' returned {bad!r}; it must return a number" in str(err.value)


def test_bool_and_int_returns_are_numbers(one_turn):
    def returns_bool(completion):
        return completion == "yes"

    def returns_int(completion):
        return 3

    calc = RewardCalculator([RewardSpec(name=register_reward(returns_bool)), RewardSpec(name=register_reward(returns_int))])
    # True -> 1.0, + 3 -> 4.0 ; False -> 0.0, + 3 -> 3.0
    assert calc.score([one_turn("yes"), one_turn("no")]).total == [4.0, 3.0]


# --------------------------------------------------------------------------- construction errors


def test_unknown_reward_name_fails_at_construction():
    with pytest.raises(ValueError) as err:
        RewardCalculator([RewardSpec(name="no_such_reward_xyz")])
    message = str(err.value)
    assert message.startswith("reward.rewards[0]: ")
    assert "Unknown reward 'no_such_reward_xyz'" in message
    assert "exact_match" in message  # the registered names are listed


def test_unknown_reward_index_is_reported():
    with pytest.raises(ValueError, match=r"reward\.rewards\[1\]"):
        RewardCalculator([RewardSpec(name="exact_match"), RewardSpec(name="no_such_reward_xyz")])


def test_unknown_verifier_fails_at_construction():
    with pytest.raises(ValueError) as err:
        RewardCalculator([RewardSpec(name="exact_match", verifiers=["no_such_verifier_xyz"])])
    assert "reward.rewards[0]" in str(err.value)
    assert "Unknown verifier 'no_such_verifier_xyz'" in str(err.value)


def test_empty_reward_list_fails():
    with pytest.raises(ValueError, match="empty"):
        RewardCalculator([])


def test_duplicate_labels_fail():
    with pytest.raises(ValueError) as err:
        RewardCalculator([RewardSpec(name="exact_match"), RewardSpec(name="exact_match", weight=2.0)])
    assert "['exact_match']" in str(err.value)
    assert "more than once" in str(err.value)


def test_distinct_labels_allow_the_same_function_twice(one_turn):
    calc = RewardCalculator(
        [RewardSpec(name="exact_match", label="strict"), RewardSpec(name="exact_match", label="loose", kwargs={"ignore_case": True})]
    )
    result = calc.score([one_turn("ABC", answer="abc")])
    # strict: "ABC" != "abc" -> 0; loose: equal ignoring case -> 1
    assert result.components == {"strict": [0.0], "loose": [1.0]}
    assert result.total == [1.0]


def test_non_finite_weight_fails():
    with pytest.raises(ValueError, match=r"reward\.rewards\[0\]\.weight"):
        RewardCalculator([RewardSpec(name="exact_match", weight=math.nan)])


# --------------------------------------------------------------------------- labels


def test_label_defaults_to_function_name_for_import_path(one_turn):
    calc = RewardCalculator([RewardSpec(name="retrain.reward.builtins:length_penalty", kwargs={"max_length": 1})])
    assert calc.labels == ["length_penalty"]
    # "abc": excess 2 / 1 -> capped at -1.0
    assert calc.score([one_turn("abc")]).components == {"length_penalty": [-1.0]}


def test_label_defaults_to_function_name_for_file_path(tmp_path, one_turn):
    file = tmp_path / "user_rewards.py"
    file.write_text("def word_count(completion):\n    return len(completion.split())\n")
    calc = RewardCalculator([RewardSpec(name=f"{file}:word_count")])
    assert calc.labels == ["word_count"]
    assert calc.score([one_turn("one two three")]).total == [3.0]


def test_label_defaults_to_registered_name():
    def underlying_function_name(completion):
        return 1.0

    name = register_reward(underlying_function_name)
    assert RewardCalculator([RewardSpec(name=name)]).labels == [name]


def test_explicit_label_wins():
    assert RewardCalculator([RewardSpec(name="exact_match", label="acc")]).labels == ["acc"]
