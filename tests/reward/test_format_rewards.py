"""Tests for retrain.reward.format_rewards: tag-structure rewards."""

from __future__ import annotations

import doctest

import pytest

import retrain.reward.format_rewards as format_rewards
from retrain.reward.calculator import RewardCalculator, RewardError, RewardSpec
from retrain.reward.format_rewards import answer_tag_match, tag_content, think_answer_format, xml_tags_present

# --------------------------------------------------------------------------- think_answer_format


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>6*7</think><answer>42</answer>", 1.0),
        ("\n <think>\nmultiply\n</think>\n\n<answer> 42 </answer>\n\n", 1.0),  # whitespace anywhere around
        ("<think></think><answer></answer>", 1.0),  # empty blocks still have the format
        ("<think>a < b and c > d</think><answer>yes</answer>", 1.0),  # angle brackets inside are text
        ("Sure! <think>x</think><answer>42</answer>", 0.0),  # text before
        ("<think>x</think><answer>42</answer> Hope it helps", 0.0),  # text after
        ("<think>x</think> therefore <answer>42</answer>", 0.0),  # text between
        ("<answer>42</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think>", 0.0),  # no answer
        ("<answer>42</answer>", 0.0),  # no reasoning
        ("<think>x</think><answer>42", 0.0),  # unclosed
        ("<think>x</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
        ("<think>x <answer>1</answer></think><answer>2</answer>", 0.0),  # an answer tag inside the reasoning
        ("<think>x</think><think>y</think><answer>2</answer>", 0.0),
        ("<THINK>x</THINK><ANSWER>42</ANSWER>", 0.0),  # tags are case-sensitive
        ("<think >x</think><answer>42</answer>", 0.0),  # exact tags only
        ("", 0.0),
    ],
)
def test_think_answer_format(completion, expected):
    assert think_answer_format(completion=completion) == expected


def test_think_answer_format_custom_tags():
    text = "<reasoning>r</reasoning>\n<final>4</final>"
    assert think_answer_format(completion=text, think_tag="reasoning", answer_tag="final") == 1.0
    assert think_answer_format(completion=text, think_tag="<reasoning>", answer_tag="<final>") == 1.0
    assert think_answer_format(completion=text) == 0.0  # the default tags are absent
    # tag names with regex metacharacters are matched literally
    assert think_answer_format(completion="<a.b>x</a.b><c+>y</c+>", think_tag="a.b", answer_tag="c+") == 1.0
    assert think_answer_format(completion="<aXb>x</aXb><c+>y</c+>", think_tag="a.b", answer_tag="c+") == 0.0


@pytest.mark.parametrize("options", [{"think_tag": ""}, {"answer_tag": "a b"}, {"think_tag": "<x/>"}, {"think_tag": "x", "answer_tag": "x"}])
def test_think_answer_format_rejects_bad_tags(options):
    with pytest.raises(ValueError):
        think_answer_format(completion="<think>a</think><answer>b</answer>", **options)


# --------------------------------------------------------------------------- xml_tags_present


@pytest.mark.parametrize(
    "completion, tags, expected",
    [
        ("<think>a</think><answer>b</answer>", ["think", "answer"], 1.0),
        ("text <answer>b</answer> text", ["think", "answer"], 0.5),
        ("nothing tagged", ["think", "answer"], 0.0),
        ("<think>a</think><think>b</think><answer>c</answer>", ["think", "answer"], 0.5),  # think twice
        ("<think>a<answer>c</answer>", ["think", "answer"], 0.5),  # think unclosed
        ("</answer>c<answer>", ["answer"], 0.0),  # closed before opened
        ("<a>1</a><b>2</b><c>3</c>", ["a", "b", "c", "d"], 0.75),
        ("<a>1</a><b>2</b><c>3</c>", ["<a>", "</b>", " c "], 1.0),  # tag spellings
        ("<a>1</a>", ["a", "a"], 1.0),  # listed twice, weighs twice
        ("<a>1</a>", ["a", "b", "b"], 1 / 3),
    ],
)
def test_xml_tags_present(completion, tags, expected):
    assert xml_tags_present(completion=completion, tags=tags) == pytest.approx(expected)


def test_xml_tags_present_defaults_and_single_string():
    assert xml_tags_present(completion="<think>a</think><answer>b</answer>") == 1.0  # default: think, answer
    assert xml_tags_present(completion="<answer>b</answer>", tags="answer") == 1.0


@pytest.mark.parametrize("tags", [[], [""], ["a b"]])
def test_xml_tags_present_rejects_bad_tags(tags):
    with pytest.raises(ValueError):
        xml_tags_present(completion="<a>1</a>", tags=tags)


# --------------------------------------------------------------------------- answer_tag_match


@pytest.mark.parametrize(
    "completion, answer, options, expected",
    [
        ("<think>x</think><answer>42</answer>", "42", {}, 1.0),
        ("<answer>\n 42 \n</answer>", " 42", {}, 1.0),  # both sides stripped
        ("<answer>42</answer>", 42, {}, 1.0),  # the reference is compared as str
        ("<answer>42.0</answer>", 42, {}, 0.0),  # exact text, not numeric
        ("<answer>Paris</answer>", "paris", {}, 0.0),
        ("<answer>Paris</answer>", "paris", {"ignore_case": True}, 1.0),
        ("<answer>STRASSE</answer>", "straße", {"ignore_case": True}, 1.0),  # casefold
        ("<answer>1</answer> sorry, <answer>2</answer>", "2", {}, 1.0),  # the last block counts
        ("<answer>1</answer> sorry, <answer>2</answer>", "1", {}, 0.0),
        ("<answer>42", "42", {}, 0.0),  # unclosed
        ("the answer is 42", "42", {}, 0.0),  # no block
        ("<answer>the answer is 42</answer>", "42", {}, 0.0),  # exact match, not containment
        ("<final>7</final>", "7", {"tag": "final"}, 1.0),
        ("<answer></answer>", "", {}, 1.0),
    ],
)
def test_answer_tag_match(completion, answer, options, expected):
    assert answer_tag_match(completion=completion, answer=answer, **options) == expected


def test_answer_tag_match_needs_the_reference_answer():
    with pytest.raises(ValueError, match="answer"):
        answer_tag_match(completion="<answer>1</answer>")


def test_tag_content():
    assert tag_content("<a> x </a>", "a") == " x "
    assert tag_content("<a>1</a><a>2", "a") is None  # the last opening is unclosed
    assert tag_content("no tags", "a") is None


# --------------------------------------------------------------------------- through the calculator


def test_each_format_reward_through_the_calculator(one_turn):
    rollouts = [
        one_turn("<think>6*7</think>\n<answer>42</answer>", answer="42"),
        one_turn("<think>6*7</think> so <answer>41</answer>", answer="42"),
        one_turn("42", answer="42"),
    ]
    for name, expected in [
        ("think_answer_format", [1.0, 0.0, 0.0]),
        ("xml_tags_present", [1.0, 1.0, 0.0]),
        ("answer_tag_match", [1.0, 0.0, 0.0]),
    ]:
        result = RewardCalculator([RewardSpec(name=name)]).score(rollouts)
        assert result.total == expected, name
        assert result.components == {name: expected}


def test_format_rewards_combined_with_options(one_turn):
    calculator = RewardCalculator(
        [
            RewardSpec(name="think_answer_format", weight=0.5, kwargs={"think_tag": "reasoning"}),
            RewardSpec(name="xml_tags_present", weight=0.25, kwargs={"tags": ["reasoning", "answer", "check"]}),
            RewardSpec(name="answer_tag_match", weight=1.0, kwargs={"ignore_case": True}),
        ]
    )
    result = calculator.score([one_turn("<reasoning>r</reasoning><answer>Yes</answer>", answer="yes")])
    # 0.5 * 1.0 + 0.25 * (2/3) + 1.0 * 1.0
    assert result.total == [pytest.approx(0.5 + 0.25 * 2 / 3 + 1.0)]


def test_answer_tag_match_without_answer_stops_the_calculator(one_turn):
    with pytest.raises(RewardError, match="answer_tag_match"):
        RewardCalculator([RewardSpec(name="answer_tag_match")]).score([one_turn("<answer>1</answer>")])


def test_doctests_pass():
    result = doctest.testmod(format_rewards)
    assert result.failed == 0
    assert result.attempted == 18
