"""The shared types every other package reads: prompt records, episodes (actions, observations,
turns, trajectories) and the function registry. This package imports nothing else of retrain,
so `environment`, `reward` and `data` can all build on it without importing each other."""

from retrain.core.episode import EnvironmentObservation, Generation, LLMAction, PolicyClient, ToolCall, Trajectory, Turn
from retrain.core.records import Message, Prompt, PromptRecord, record_from_mapping, with_system_prompt
from retrain.core.registry import Registry, call_with_accepted, import_function

__all__ = [
    "EnvironmentObservation",
    "Generation",
    "LLMAction",
    "Message",
    "PolicyClient",
    "Prompt",
    "PromptRecord",
    "Registry",
    "ToolCall",
    "Trajectory",
    "Turn",
    "call_with_accepted",
    "import_function",
    "record_from_mapping",
    "with_system_prompt",
]
