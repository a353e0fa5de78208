"""Fixtures for the reward tests: real one-turn trajectories to score."""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest

from retrain.core.records import PromptRecord
from retrain.environment.base import EnvironmentObservation, LLMAction, Trajectory, Turn


def _one_turn(
    completion: str, answer: Any = None, prompt: Any = "What is 6*7?", *, metadata: Optional[dict[str, Any]] = None,
    truncated: bool = False,
) -> Trajectory:
    token_ids = [ord(c) for c in completion]  # one token per character
    action = LLMAction(text=completion, token_ids=token_ids, truncated=truncated)
    return Trajectory(
        record=PromptRecord(prompt=prompt, answer=answer, metadata=dict(metadata or {})),
        prompt_ids=[ord(c) for c in str(prompt)],
        completion_ids=list(token_ids),
        completion_mask=[1] * len(token_ids),
        turns=[Turn(action=action, observation=EnvironmentObservation(done=True))],
    )


@pytest.fixture
def one_turn() -> Callable[..., Trajectory]:
    """`one_turn(completion, answer=None, prompt="What is 6*7?", *, metadata=None, truncated=False)`:
    a finished one-turn episode whose policy wrote `completion` (one token per character)."""
    return _one_turn
