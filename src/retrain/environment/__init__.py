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
from retrain.environment.agent import AgentEnvironment, AgentResult
from retrain.environment.endpoint import PolicyEndpoint
from retrain.environment.gym import GymEnvironment
from retrain.environment.mcp import MCPServerError, MCPToolProvider
from retrain.environment.single_turn import SingleTurnEnvironment
from retrain.environment.tool_env import ToolEnvironment
from retrain.environment.tool_parsing import parse_tool_calls
from retrain.environment.tools import TOOLS, FunctionToolProvider, ToolError, ToolProvider, ToolSpec, tool

__all__ = [
    "AgentEnvironment",
    "AgentResult",
    "PolicyEndpoint",
    "Environment",
    "EnvironmentObservation",
    "Generation",
    "GymEnvironment",
    "LLMAction",
    "MCPServerError",
    "MCPToolProvider",
    "PolicyClient",
    "SingleTurnEnvironment",
    "TOOLS",
    "FunctionToolProvider",
    "ToolEnvironment",
    "ToolError",
    "ToolProvider",
    "ToolSpec",
    "parse_tool_calls",
    "tool",
    "ToolCall",
    "Trajectory",
    "Turn",
]
