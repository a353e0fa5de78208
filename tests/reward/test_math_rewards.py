"""Tests for retrain.reward.math_rewards: `math_verify` (real math-verify) and `boxed_answer`."""

from __future__ import annotations

import asyncio
import doctest
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("math_verify")

import retrain.reward.math_rewards as math_rewards
from retrain.reward.calculator import RewardCalculator, RewardError, RewardSpec
from retrain.reward.math_rewards import boxed_answer, math_verify

# Both execution modes: a worker process bounded by a time limit (the default), and the calling
# thread with no bound.
MODES = [pytest.param(5.0, id="worker-process"), pytest.param(None, id="in-thread")]

EQUIVALENT = [
    (r"The answer is \boxed{0.5}.", r"\frac{1}{2}"),
    (r"so $\boxed{\frac12}$", "1/2"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"We get \boxed{1+2x}", "2x+1"),
    (r"\boxed{(x+1)^2}", "x^2+2x+1"),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\sqrt{2}/2"),
    (r"\boxed{\{2,1\}}", r"\{1,2\}"),
    (r"\boxed{1000}", "1,000"),
    (r"\boxed{x = 2}", "2"),
    (r"The answer is $\frac{3}{4}$.", r"\dfrac{3}{4}"),
    ("I think 12. Answer: 42", 42),  # an integer reference; the "Answer:" phrase wins over 12
    (r"\boxed{3}, \boxed{7}", r"\{3, 7\}"),  # adjacent boxes are one answer: a set
    (r"\boxed{\pi}", r"$\pi$"),  # an already delimited reference is read as it is
]

NOT_EQUIVALENT = [
    (r"\boxed{3}", "4"),
    (r"\boxed{3}", "-3"),
    (r"\boxed{2x+2}", "2x+1"),
    (r"\boxed{3.14159}", r"\pi"),
    (r"\boxed{B}", "A"),
    (r"answer 42, but actually \boxed{41}", "42"),  # a box beats an "answer" phrase
    (r"\boxed{3}, \boxed{7}", "7"),  # adjacent boxes are one set-valued answer, {3, 7}
    ("I have no idea.", "5"),
    ("", "5"),
    ("   ", "5"),
]


# --------------------------------------------------------------------------- boxed_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{42}", "42"),
        (r"so \boxed{\frac{1}{2}} ok", r"\frac{1}{2}"),
        (r"\boxed{1} and later \boxed{2}", "2"),
        (r"\boxed{\boxed{7}}", r"\boxed{7}"),  # a box inside a box is part of the outer content
        (r"\boxed{x^{2^{3}}}", "x^{2^{3}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces neither open nor close
        (r"\boxed{\}}", r"\}"),
        (r"\boxed  {5}", "5"),
        (r"\boxed{}", ""),
        (r"\boxed{1} then a truncated \boxed{2 + ", "1"),
        (r"\boxed{2 + ", None),
        (r"\boxed 5", None),
        (r"\boxedx{5}", None),
        ("no box here", None),
        ("", None),
    ],
)
def test_boxed_answer(text, expected):
    assert boxed_answer(text) == expected


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("timeout", MODES)
@pytest.mark.parametrize("completion, answer", EQUIVALENT)
def test_equivalent_answers_score_one(completion, answer, timeout):
    assert math_verify(completion=completion, answer=answer, verify_timeout=timeout) == 1.0


@pytest.mark.parametrize("timeout", MODES)
@pytest.mark.parametrize("completion, answer", NOT_EQUIVALENT)
def test_different_answers_score_zero(completion, answer, timeout):
    assert math_verify(completion=completion, answer=answer, verify_timeout=timeout) == 0.0


def test_boxed_only_ignores_unboxed_answers():
    assert math_verify(completion="The answer is 1/2", answer="0.5") == 1.0
    assert math_verify(completion="The answer is 1/2", answer="0.5", boxed_only=True) == 0.0
    assert math_verify(completion=r"Answer: 9. \boxed{\frac{2}{4}}", answer="0.5", boxed_only=True) == 1.0
    # only the last box, even where math-verify would read adjacent boxes as a set
    assert math_verify(completion=r"\boxed{3}, \boxed{7}", answer="7") == 0.0
    assert math_verify(completion=r"\boxed{3}, \boxed{7}", answer="7", boxed_only=True) == 1.0
    # a truncated last box leaves the earlier complete one
    assert math_verify(completion=r"\boxed{3} ... \boxed{4", answer="3", boxed_only=True) == 1.0


def test_extra_record_fields_are_ignored():
    assert math_verify(completion=r"\boxed{2}", answer="2", prompt="1+1?", trajectory=None, level=3) == 1.0


# --------------------------------------------------------------------------- errors


def test_missing_reference_answer_raises():
    with pytest.raises(ValueError, match="reference answer"):
        math_verify(completion=r"\boxed{1}")
    with pytest.raises(ValueError, match="empty"):
        math_verify(completion=r"\boxed{1}", answer="  ")


@pytest.mark.parametrize("timeout", MODES)
def test_unparsable_reference_answer_raises(timeout):
    with pytest.raises(ValueError, match="no expression in the reference answer"):
        math_verify(completion=r"\boxed{1}", answer=r"\text{}", verify_timeout=timeout)


@pytest.mark.parametrize("bad", [0, -1.0])
def test_non_positive_verify_timeout_raises(bad):
    with pytest.raises(ValueError, match="verify_timeout"):
        math_verify(completion=r"\boxed{1}", answer="1", verify_timeout=bad)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'retrain\[math\]'"):
        math_verify(completion=r"\boxed{1}", answer="1")


def test_too_old_package_is_refused(monkeypatch):
    # math-verify 0.7 cannot switch its signal timeouts off and would score everything 0.0.
    monkeypatch.setattr(math_rewards.importlib.metadata, "version", lambda name: "0.7.0")
    math_rewards._require_recent_math_verify.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"math-verify 0.7.0 is too old.*pip install 'retrain\[math\]'"):
            math_verify(completion=r"\boxed{1}", answer="1")
    finally:
        math_rewards._require_recent_math_verify.cache_clear()


def test_worker_without_the_package_names_the_extra(tmp_path, monkeypatch):
    # A worker process that cannot import math_verify (a broken module shadows it there).
    (tmp_path / "math_verify.py").write_text("raise ImportError('simulated: math_verify is not installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    pool = math_rewards._WorkerPool()
    monkeypatch.setattr(math_rewards, "_POOL", pool)
    try:
        with pytest.raises(ImportError, match=r"pip install 'retrain\[math\]'"):
            math_verify(completion=r"\boxed{1}", answer="1")
        assert not pool._all  # the failed worker is not kept
    finally:
        pool.close()


# --------------------------------------------------------------------------- threads and bounds


def _mixed_case(i: int) -> tuple[str, str, float]:
    """Case i: a completion, its reference, and the hand-checked score."""
    if i % 3 == 0:
        return rf"\boxed{{\frac{{{i}}}{{2}}}}", str(i / 2), 1.0  # i/2 as a fraction vs a decimal
    if i % 3 == 1:
        return rf"\boxed{{{i}x + 1}}", f"1 + {i}x", 1.0
    return rf"\boxed{{{i + 1}}}", str(i), 0.0


@pytest.mark.parametrize("timeout", MODES)
def test_works_from_worker_threads(timeout):
    cases = [_mixed_case(i) for i in range(36)]
    with ThreadPoolExecutor(max_workers=8) as executor:
        scores = list(executor.map(lambda c: math_verify(completion=c[0], answer=c[1], verify_timeout=timeout), cases))
    assert scores == [expected for _, _, expected in cases]


@pytest.mark.parametrize("timeout", MODES)
def test_works_under_asyncio_to_thread(timeout):
    cases = [_mixed_case(i) for i in range(12)]

    async def score_all():
        return await asyncio.gather(
            *(asyncio.to_thread(math_verify, completion=c, answer=a, verify_timeout=timeout) for c, a, _ in cases)
        )

    assert asyncio.run(score_all()) == [expected for _, _, expected in cases]


def test_in_thread_mode_never_uses_signal_alarm(monkeypatch):
    # math-verify's default timeouts call signal.alarm, which fails outside the main thread and would
    # cancel other SIGALRM timers (pytest-timeout's) in it.
    def forbidden(*args):
        raise AssertionError("signal.alarm was called")

    monkeypatch.setattr(signal, "alarm", forbidden)
    assert threading.current_thread() is threading.main_thread()
    assert math_verify(completion=r"\boxed{0.5}", answer=r"\frac{1}{2}", verify_timeout=None) == 1.0


def test_a_hanging_check_is_cut_off_and_the_worker_replaced(caplog):
    # sympy would compute a ten-billion-digit integer here: without a bound this never returns.
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="retrain.reward.math_rewards"):
        assert math_verify(completion=r"\boxed{10^{10^{10}}}", answer="5", verify_timeout=1.0) == 0.0
    assert time.perf_counter() - started < 30  # 1 s of checking plus, at most, a worker's start-up
    assert "no answer within 1 s" in caplog.text
    assert math_verify(completion=r"\boxed{5}", answer="5", verify_timeout=1.0) == 1.0  # a fresh worker


def test_workers_are_reused_and_bounded():
    math_verify(completion=r"\boxed{1}", answer="1")
    with ThreadPoolExecutor(max_workers=3 * math_rewards.MAX_WORKERS) as executor:
        list(executor.map(lambda i: math_verify(completion=rf"\boxed{{{i}}}", answer=str(i)), range(40)))
    assert 1 <= len(math_rewards._POOL._all) <= math_rewards.MAX_WORKERS
    assert all(worker.process.poll() is None for worker in math_rewards._POOL._all)


# --------------------------------------------------------------------------- through the calculator


def test_through_the_reward_calculator(one_turn):
    calculator = RewardCalculator([RewardSpec(name="math_verify")])
    result = calculator.score(
        [
            one_turn(r"so \boxed{0.5}", r"\frac{1}{2}"),
            one_turn(r"so \boxed{1+2x}", "2x+1"),
            one_turn(r"so \boxed{3}", "4"),
            one_turn("no answer", "4"),
        ]
    )
    assert result.total == [1.0, 1.0, 0.0, 0.0]
    assert result.components == {"math_verify": [1.0, 1.0, 0.0, 0.0]}


def test_through_the_calculator_with_options_and_weight(one_turn):
    calculator = RewardCalculator([RewardSpec(name="math_verify", weight=2.0, kwargs={"boxed_only": True, "verify_timeout": None})])
    result = calculator.score([one_turn("Answer: 4", "4"), one_turn(r"\boxed{4}", "4")])
    assert result.total == [0.0, 2.0]


def test_calculator_reports_a_missing_answer(one_turn):
    calculator = RewardCalculator([RewardSpec(name="math_verify")])
    with pytest.raises(RewardError, match="math_verify"):
        calculator.score([one_turn(r"\boxed{4}", None)])


def test_doctests_pass():
    result = doctest.testmod(math_rewards)
    assert result.failed == 0
    assert result.attempted == 8
