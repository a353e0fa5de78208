"""retrain: reinforcement learning for language models, on Lightning.

The public names load lazily, so `import retrain.reward` or `import retrain.environment` does not
pull in torch.
"""

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BaseTrainer": "retrain.trainer.base",
    "GRPOTrainer": "retrain.trainer.grpo",
    "RLOOTrainer": "retrain.trainer.rloo",
    "RLTrainer": "retrain.trainer.module",
    "Environment": "retrain.environment.base",
    "EnvironmentObservation": "retrain.environment.base",
    "LLMAction": "retrain.environment.base",
    "SingleTurnEnvironment": "retrain.environment.single_turn",
    "RewardCalculator": "retrain.reward.calculator",
    "RewardSpec": "retrain.reward.calculator",
    "reward": "retrain.reward.registry",
    "verifier": "retrain.reward.registry",
    "PromptDataModule": "retrain.data.datamodule",
    "PromptRecord": "retrain.core.records",
    "PolicyConfig": "retrain.models.loading",
    "TinyModelConfig": "retrain.models.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'retrain' has no attribute {name!r}")
