"""Tests for ReasoningGymSource and, through its records, the `reasoning_gym_score` reward."""

from __future__ import annotations

import socket

import pytest

from retrain.data import DataSourceError, PromptDataModule, ReasoningGymSource
from retrain.reward.registry import REWARDS, call_with_accepted

pytest.importorskip("reasoning_gym")


@pytest.fixture
def no_network(monkeypatch):
    """reasoning-gym ships its data: generating and scoring must not open a connection."""

    def refuse(*args, **kwargs):
        raise AssertionError("reasoning-gym tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def score(record, completion: str) -> float:
    function = REWARDS.get("reasoning_gym_score")
    return call_with_accepted(function, {**record.reward_kwargs(), "completion": completion})


@pytest.mark.parametrize("task", ["basic_arithmetic", "leg_counting", "chain_sum"])
def test_records_keep_question_answer_and_entry(no_network, task):
    source = ReasoningGymSource(task=task, size=4, seed=1)
    source.load()
    assert source.num_records == 4
    record = source.record(2)
    entry = record.metadata["reasoning_gym_entry"]
    assert record.prompt == entry["question"] and record.answer == entry["answer"]
    assert record.metadata["reasoning_gym_task"] == task
    assert entry["metadata"]["source_dataset"] == task


@pytest.mark.parametrize("task", ["basic_arithmetic", "leg_counting", "chain_sum"])
def test_reward_scores_correct_and_wrong_answers(no_network, task):
    source = ReasoningGymSource(task=task, size=3, seed=5)
    record = source.record(0)
    assert score(record, f"Let me work it out.\n<answer>{record.answer}</answer>") == 1.0
    assert score(record, f"The answer: {record.answer}") == 1.0
    assert score(record, f" {record.answer} ") == 1.0
    wrong = str(int(record.answer) + 1)
    assert score(record, f"<answer>{wrong}</answer>") == 0.0
    assert score(record, "I do not know.") == 0.0


def test_same_seed_same_tasks_different_seed_different_tasks(no_network):
    def questions(seed):
        source = ReasoningGymSource(task="chain_sum", size=5, seed=seed)
        return [source.record(i).prompt for i in range(5)]

    assert questions(0) == questions(0)
    assert questions(0) != questions(1)


def test_task_kwargs_reach_the_task_and_the_scorer(no_network):
    source = ReasoningGymSource(task="chain_sum", size=3, seed=0, task_kwargs={"min_terms": 5, "max_terms": 5})
    record = source.record(0)
    assert record.metadata["reasoning_gym_entry"]["metadata"]["num_terms"] == 5
    assert record.metadata["reasoning_gym_config"] == {"min_terms": 5, "max_terms": 5}
    assert score(record, f"<answer>{record.answer}</answer>") == 1.0


def test_unknown_task_suggests_names():
    with pytest.raises(DataSourceError) as err:
        ReasoningGymSource(task="chain_sums")
    assert "'chain_sums' is not a reasoning-gym dataset" in str(err.value)
    assert "chain_sum" in str(err.value)


def test_bad_task_kwargs_name_the_task():
    source = ReasoningGymSource(task="chain_sum", task_kwargs={"no_such_option": 1})
    with pytest.raises(DataSourceError, match="task 'chain_sum' rejected task_kwargs"):
        source.load()


def test_in_the_data_module_with_a_system_prompt(no_network):
    module = PromptDataModule(
        source=ReasoningGymSource(task="basic_arithmetic", size=8, seed=0), batch_size=4, system_prompt="Think, then answer."
    )
    module.prepare_data()
    batch = next(iter(module.train_dataloader()))
    assert len(batch) == 4
    for record in batch:
        system, user = record.prompt
        assert system == {"role": "system", "content": "Think, then answer."}
        assert user["content"] == record.metadata["reasoning_gym_entry"]["question"]
        assert score(record, f"<answer>{record.answer}</answer>") == 1.0


def test_exclude_keeps_a_held_out_split_out_of_the_training_tasks(no_network):
    kwargs = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
    held_out = ReasoningGymSource(task="chain_sum", size=200, seed=1, task_kwargs=kwargs)
    train = ReasoningGymSource(task="chain_sum", size=500, seed=0, task_kwargs=kwargs, exclude={"seed": 1, "size": 200})
    plain = ReasoningGymSource(task="chain_sum", size=500, seed=0, task_kwargs=kwargs)
    questions = {held_out.record(i).prompt for i in range(200)}
    assert any(plain.record(i).prompt in questions for i in range(500))  # without it, the splits overlap
    assert train.num_records == 500 and not any(train.record(i).prompt in questions for i in range(500))
    with pytest.raises(DataSourceError, match="task space is too small"):
        tiny = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
        # 200 distinct questions in all, every one of them in a held-out split of 5000
        ReasoningGymSource(task="chain_sum", size=10, seed=0, task_kwargs=tiny, exclude={"seed": 1, "size": 5000}).load()
