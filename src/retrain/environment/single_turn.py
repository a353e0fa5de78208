"""`SingleTurnEnvironment`: the prompt goes in, one completion comes out, the episode ends.

This is the classic GRPO setting (what TRL's `GRPOTrainer` does without tools). All scoring is done
by the `RewardCalculator`; the environment gives no step reward.
"""

from __future__ import annotations

from typing import Optional

from retrain.core.records import PromptRecord
from retrain.environment.base import Environment, EnvironmentObservation, LLMAction


class SingleTurnEnvironment(Environment):
    """Prompt in, one completion out.

    Args:
        system_prompt: when set, chat prompts get this system message first, and text prompts
            become chat messages with it (so the tokenizer's chat template applies).
    """

    max_turns = 1

    def __init__(self, system_prompt: Optional[str] = None) -> None:
        self.system_prompt = system_prompt

    async def reset(self, record: PromptRecord) -> EnvironmentObservation:
        if self.system_prompt is None:
            return EnvironmentObservation(content=record.prompt)
        messages = record.prompt if record.is_chat else [{"role": "user", "content": record.prompt}]
        return EnvironmentObservation(content=[{"role": "system", "content": self.system_prompt}, *messages])

    async def step(self, action: LLMAction) -> EnvironmentObservation:
        return EnvironmentObservation(done=True)
