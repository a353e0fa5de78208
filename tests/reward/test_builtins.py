"""Tests for retrain.reward.builtins: the built-in reward functions and verifiers."""

from __future__ import annotations

import doctest

import pytest

import retrain.reward.builtins as builtins_module
import retrain.tasks.repeat_letter as repeat_letter
from retrain.core.records import PromptRecord
from retrain.environment.base import Trajectory
from retrain.reward.builtins import (
    contains_penalty,
    exact_match,
    last_number,
    length_penalty,
    matches_regex,
    non_empty,
    not_truncated,
    numeric_match,
    regex_match,
)


# --------------------------------------------------------------------------- doctests


def test_builtins_doctests_pass():
    result = doctest.testmod(builtins_module)
    assert result.failed == 0
    assert result.attempted == 3  # the three examples in the module docstring actually ran


def test_repeat_letter_doctest_passes():
    result = doctest.testmod(repeat_letter)
    assert result.failed == 0
    assert result.attempted == 1


# --------------------------------------------------------------------------- exact_match


def test_exact_match_strips_whitespace():
    assert exact_match(completion="  Paris\n", answer="Paris") == 1.0
    assert exact_match(completion="Paris", answer=" Paris ") == 1.0  # the answer is stripped too


def test_exact_match_is_case_sensitive_by_default():
    assert exact_match(completion="paris", answer="Paris") == 0.0
    assert exact_match(completion="paris", answer="Paris", ignore_case=True) == 1.0


def test_exact_match_compares_str_of_answer():
    # answer=7 becomes "7"; "7.0" is a different string.
    assert exact_match(completion="7", answer=7) == 1.0
    assert exact_match(completion="7.0", answer=7) == 0.0


def test_exact_match_partial_is_not_a_match():
    assert exact_match(completion="Paris, France", answer="Paris") == 0.0


def test_exact_match_ignores_extra_kwargs():
    assert exact_match(completion="a", answer="a", prompt="q", trajectory=None, difficulty=3) == 1.0


def test_exact_match_without_answer_raises():
    with pytest.raises(ValueError, match="answer"):
        exact_match(completion="x")
    with pytest.raises(ValueError, match="exact_match"):
        exact_match(completion="x", answer=None)


# --------------------------------------------------------------------------- numeric_match


def test_last_number_picks_the_last_one():
    assert last_number("3 apples and 7 pears") == 7.0
    assert last_number("total: 1,234,567") == 1234567.0
    assert last_number("it is -2.5e3 now") == -2500.0
    assert last_number("no digits") is None


def test_numeric_match_uses_last_number():
    # The last number (7) is compared, not the first (3).
    assert numeric_match(completion="3 apples then 7", answer="7") == 1.0
    assert numeric_match(completion="3 apples then 7", answer="3") == 0.0


def test_numeric_match_thousands_separators():
    # "1,234" and "1234" are the same number once commas are dropped.
    assert numeric_match(completion="The answer is 1,234.", answer=1234) == 1.0
    assert numeric_match(completion="The answer is 1234", answer="1,234") == 1.0


def test_numeric_match_answer_text_and_types():
    assert numeric_match(completion="x = -5", answer=-5) == 1.0
    assert numeric_match(completion="3.50", answer="#### 3.5") == 1.0  # answer's last number is used
    assert numeric_match(completion="1e3", answer=1000) == 1.0


def test_numeric_match_relative_tolerance():
    # default rel_tol=1e-6: allowed difference at 100 is 1e-4.
    assert numeric_match(completion="100.00005", answer=100) == 1.0  # |diff| = 5e-5 < 1e-4
    assert numeric_match(completion="100.001", answer=100) == 0.0  # |diff| = 1e-3 > 1e-4
    assert numeric_match(completion="100.001", answer=100, rel_tol=1e-2) == 1.0  # allowed: 1.0


def test_numeric_match_absolute_tolerance_near_zero():
    # Near zero the relative tolerance vanishes; abs_tol=1e-9 decides.
    assert numeric_match(completion="0.0000000001", answer=0) == 1.0  # 1e-10 <= 1e-9
    assert numeric_match(completion="0.00001", answer=0) == 0.0  # 1e-5 > 1e-9
    assert numeric_match(completion="0.00001", answer=0, abs_tol=1e-4) == 1.0


def test_numeric_match_completion_without_number_scores_zero():
    assert numeric_match(completion="I don't know", answer="4") == 0.0


def test_numeric_match_answer_without_number_raises():
    with pytest.raises(ValueError, match="holds no number"):
        numeric_match(completion="4", answer="four")


def test_numeric_match_missing_answer_raises():
    with pytest.raises(ValueError, match="answer"):
        numeric_match(completion="4")


# --------------------------------------------------------------------------- regex_match


def test_regex_match_search_vs_fullmatch():
    assert regex_match(completion="abc 123 def", pattern=r"\d+") == 1.0  # search finds "123"
    assert regex_match(completion="abc 123 def", pattern=r"\d+", fullmatch=True) == 0.0
    assert regex_match(completion="123", pattern=r"\d+", fullmatch=True) == 1.0
    assert regex_match(completion="abc", pattern=r"\d+") == 0.0


def test_regex_match_dot_matches_newline():
    # DOTALL: "." also matches "\n", so a multi-line answer block matches.
    assert regex_match(completion="<a>\nx\n</a>", pattern=r"<a>.*</a>", fullmatch=True) == 1.0


def test_regex_match_missing_pattern_raises():
    with pytest.raises(ValueError, match="pattern"):
        regex_match(completion="abc")


# --------------------------------------------------------------------------- length_penalty


@pytest.mark.parametrize(
    "length, expected",
    [
        (0, 0.0),
        (10, 0.0),  # at max_length: no excess
        (11, -0.1),  # excess 1 / 10
        (15, -0.5),  # 1.5x: excess 5 / 10
        (20, -1.0),  # 2x: excess 10 / 10
        (40, -1.0),  # capped at -1
    ],
)
def test_length_penalty(length, expected):
    assert length_penalty(completion="x" * length, max_length=10) == pytest.approx(expected)


def test_length_penalty_default_max_length():
    # default max_length = 256: 384 chars = 1.5x -> -0.5
    assert length_penalty(completion="x" * 256) == 0.0
    assert length_penalty(completion="x" * 384) == pytest.approx(-0.5)


# --------------------------------------------------------------------------- contains_penalty


def test_contains_penalty_ignores_case_by_default():
    assert contains_penalty(completion="as an ai model", texts=["As an AI"]) == -1.0
    assert contains_penalty(completion="as an ai model", texts=["As an AI"], ignore_case=False) == 0.0


def test_contains_penalty_any_of_several_texts():
    assert contains_penalty(completion="I cannot help", texts=["sorry", "cannot"]) == -1.0
    assert contains_penalty(completion="Sure, here it is", texts=["sorry", "cannot"]) == 0.0


def test_contains_penalty_missing_texts_raises():
    with pytest.raises(ValueError, match="texts"):
        contains_penalty(completion="abc")


# --------------------------------------------------------------------------- verifiers


def test_matches_regex():
    assert matches_regex(completion="answer: 42", pattern=r"answer: \d+") is True
    assert matches_regex(completion="answer: x", pattern=r"answer: \d+") is False
    with pytest.raises(ValueError, match="pattern"):
        matches_regex(completion="abc")


def test_not_truncated(one_turn):
    assert not_truncated(trajectory=one_turn("done", truncated=False)) is True
    assert not_truncated(trajectory=one_turn("cut of", truncated=True)) is False
    assert not_truncated() is True  # no trajectory: nothing to fail on
    assert not_truncated(completion="x", trajectory=None) is True


def test_not_truncated_on_empty_trajectory():
    # A trajectory with no turns did not hit the budget.
    empty = Trajectory(record=PromptRecord(prompt="p"), prompt_ids=[0])
    assert not_truncated(trajectory=empty) is True


def test_non_empty():
    assert non_empty(completion="a") is True
    assert non_empty(completion="") is False
    assert non_empty(completion=" \n\t ") is False
