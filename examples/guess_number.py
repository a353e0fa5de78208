"""A complete custom environment: the policy guesses a secret number over several turns.

Run it (CPU, tiny local model, a few seconds):  python examples/guess_number.py
"""

from __future__ import annotations

import re

import lightning.pytorch as pl

from retrain import GRPOTrainer, PolicyConfig, PromptDataModule, RewardCalculator, RewardSpec, TinyModelConfig
from retrain.environment import Environment, EnvironmentObservation, LLMAction
from retrain.reward import reward


class GuessNumber(Environment):
    """The record's answer is the secret; each turn the policy guesses and hears "higher" or "lower".

    Args:
        max_turns: guesses allowed per episode.
    """

    def __init__(self, max_turns: int = 4) -> None:
        self.max_turns = max_turns

    async def reset(self, record) -> EnvironmentObservation:
        # reset() must set every piece of per-episode state: each rollout runs on its own spawn().
        self.secret = int(record.answer)
        self.guesses = 0
        return EnvironmentObservation(content=record.prompt)

    async def step(self, action: LLMAction) -> EnvironmentObservation:
        self.guesses += 1
        numbers = re.findall(r"-?\d+", action.text)
        if not numbers:
            return EnvironmentObservation(content=" (say a number) ", reward=-0.1)
        guess = int(numbers[-1])
        if guess == self.secret:
            return EnvironmentObservation(reward=1.0, done=True, info={"solved": True})
        hint = "higher" if guess < self.secret else "lower"
        return EnvironmentObservation(content=f" {hint}. guess: ", reward=0.0)

    def episode_metrics(self) -> dict[str, float]:
        return {"guesses": float(self.guesses)}  # logged as train/env/guesses


@reward
def solved(trajectory=None, **_) -> float:
    """1.0 when the episode ended on the right guess."""
    return 1.0 if trajectory.turns and trajectory.turns[-1].observation.info.get("solved") else 0.0


def main(max_steps: int = 2) -> pl.Trainer:
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path="outputs/tiny-char-llama", tiny=TinyModelConfig()),
        reward=RewardCalculator([RewardSpec(name="solved"), RewardSpec(name="step_reward_sum", weight=0.5)]),
        environment=GuessNumber(max_turns=3),
        num_generations=4,
        max_completion_length=32,
        learning_rate=1e-3,
    )
    data = PromptDataModule(prompts=[{"prompt": "secret between 0 and 9. guess: ", "answer": n} for n in range(10)], batch_size=2)
    return algo.fit(data, max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False)


if __name__ == "__main__":
    trainer = main()
    print({k: round(float(v), 3) for k, v in trainer.callback_metrics.items() if k.startswith(("train/reward", "train/env", "train/turns"))})
