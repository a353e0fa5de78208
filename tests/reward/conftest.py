"""Fixtures for the reward tests: real one-turn trajectories to score."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from retrain.data.records import PromptRecord
from retrain.environment.base import EnvironmentObservation, LLMAction, Trajectory, Turn


@pytest.fixture
def one_turn() -> Callable[..., Trajectory]:
    """`one_turn(completion, answer=None, prompt="q")`: a finished one-turn episode that wrote `completion`."""

    def make(completion: str, answer: Any = None, prompt: str = "q") -> Trajectory:
        action = LLMAction(text=completion, token_ids=[1] * len(completion))
        return Trajectory(
            record=PromptRecord(prompt=prompt, answer=answer),
            prompt_ids=[0],
            completion_ids=list(action.token_ids),
            completion_mask=[1] * len(completion),
            turns=[Turn(action=action, observation=EnvironmentObservation(done=True))],
        )

    return make
