"""Tests for retrain.reward.reasoning_gym: answer extraction and the registered reward."""

from __future__ import annotations

import sys

import pytest

from retrain.reward import REWARDS
from retrain.reward.reasoning_gym import extract_answer, reasoning_gym_score


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<answer>42</answer>", "42"),
        ("<answer>1</answer> then <ANSWER> 2 </ANSWER>", "2"),  # the last tag wins
        ("<answer>\n7\n</answer>", "7"),
        ("Answer: 12", "12"),
        ("answer: 1\nFinal Answer:\n\n  -3  \nbecause...", "-3"),  # after the last marker, first non-empty line
        ("The answer is 5", "The answer is 5"),  # no marker: the whole completion
        ("  plain \n", "plain"),
        ("answer:", ""),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_registered_under_its_name():
    assert REWARDS.get("reasoning_gym_score") is reasoning_gym_score


def test_reward_module_does_not_import_reasoning_gym():
    code = "import sys, retrain.reward; print('reasoning_gym' in sys.modules)"
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_record_without_an_entry_explains_the_fix():
    with pytest.raises(ValueError, match="ReasoningGymSource"):
        reasoning_gym_score(completion="4", answer="4")


def test_extract_false_scores_the_whole_completion():
    pytest.importorskip("reasoning_gym")
    entry = {"question": "2 + 2 =", "answer": "4", "metadata": {"source_dataset": "chain_sum"}}
    assert reasoning_gym_score(completion="<answer>4</answer>", reasoning_gym_entry=entry) == 1.0
    assert reasoning_gym_score(completion="<answer>4</answer>", reasoning_gym_entry=entry, extract=False) < 1.0  # partial credit at most


def test_partial_credit_false_turns_the_task_score_into_pass_fail():
    pytest.importorskip("reasoning_gym")
    entry = {"question": "Spell this word backward (example: sun -> nus): stone", "answer": "enots",
             "metadata": {"source_dataset": "spell_backward", "word": "stone"}}
    partial = reasoning_gym_score(completion="enotz", reasoning_gym_entry=entry)
    assert partial == pytest.approx(0.8)  # spell_backward: 4 of 5 letters in place
    assert reasoning_gym_score(completion="enotz", reasoning_gym_entry=entry, partial_credit=False) == 0.0
    assert reasoning_gym_score(completion="enots", reasoning_gym_entry=entry, partial_credit=False) == 1.0
