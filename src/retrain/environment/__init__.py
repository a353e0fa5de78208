"""Environments: the world the policy acts in (no torch imports here)."""

from retrain.environment.base import (
    Environment,
    EnvironmentObservation,
    Generation,
    LLMAction,
    PolicyClient,
    ToolCall,
    Trajectory,
    Turn,
)
from retrain.environment.single_turn import SingleTurnEnvironment

__all__ = [
    "Environment",
    "EnvironmentObservation",
    "Generation",
    "LLMAction",
    "PolicyClient",
    "SingleTurnEnvironment",
    "ToolCall",
    "Trajectory",
    "Turn",
]
