"""Tools the policy can call: the `@tool` registry, tool specs and tool providers.

A tool is a typed Python function (sync or async) whose JSON schema comes from its type hints and
Google-style docstring (through `transformers.utils.get_json_schema`, the same schema format chat
templates render with `tools=`). A `ToolProvider` supplies tools to a `ToolEnvironment`:
`FunctionToolProvider` wraps Python functions; `MCPToolProvider` (in `retrain.environment.mcp`)
discovers and calls the tools of a running MCP server.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from retrain.core.registry import Registry

TOOLS = Registry("tool")


class ToolError(RuntimeError):
    """A tool call failed; the message is shown to the policy as the tool's result."""


@dataclass
class ToolSpec:
    """A tool as the policy sees it: name, description and JSON schema of the arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def to_chat_template(self) -> dict[str, Any]:
        """The OpenAI-style function schema that chat templates render via `tools=`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def tool(function: Union[Callable[..., Any], str, None] = None, *, name: Optional[str] = None) -> Any:
    """Register a tool: `@tool`, `@tool("name")` or `@tool(name="name")`.

    The function needs type hints and a Google-style docstring with an `Args:` section; its
    schema is checked at registration, so a tool without them fails at import, not mid-training.
    """
    if isinstance(function, str):
        name, function = function, None

    def register(f: Callable[..., Any]) -> Callable[..., Any]:
        spec_from_function(f, name)  # validate now
        return TOOLS.add(f, name)

    return register if function is None else register(function)


def spec_from_function(function: Callable[..., Any], name: Optional[str] = None) -> ToolSpec:
    """The `ToolSpec` of a typed, documented Python function."""
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(function)["function"]
    except Exception as err:
        raise ValueError(
            f"tool '{name or getattr(function, '__name__', function)}': cannot derive its schema ({err}). "
            "Give every argument a type hint and document it in an 'Args:' docstring section."
        ) from None
    return ToolSpec(name=name or schema["name"], description=schema.get("description", ""), parameters=schema["parameters"])


def format_result(value: Any) -> str:
    """Tool results become text for the policy: strings as they are, everything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


class ToolProvider(ABC):
    """A source of tools. `start` once (per rollout engine), then `list_tools` and `call` freely."""

    async def start(self) -> None:
        """Connect or launch whatever serves the tools (default: nothing)."""

    async def close(self) -> None:
        """Release what `start` acquired (default: nothing)."""

    @abstractmethod
    async def list_tools(self) -> list[ToolSpec]:
        """Every tool this provider serves."""

    @abstractmethod
    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """Run tool `name`; return its result as text, or raise `ToolError` (shown to the policy)."""


class FunctionToolProvider(ToolProvider):
    """Tools from Python functions: registered names, import paths, or the functions themselves.

    Args:
        tools: `@tool` names, import paths (`pkg.mod:fn`, `file.py:fn`) or callables.
    """

    def __init__(self, tools: Sequence[Union[str, Callable[..., Any]]]) -> None:
        if not tools:
            raise ValueError("FunctionToolProvider.tools is empty: give at least one tool.")
        self.functions: dict[str, Callable[..., Any]] = {}
        self.specs: list[ToolSpec] = []
        for entry in tools:
            function = TOOLS.get(entry) if isinstance(entry, str) else entry
            registered = entry if isinstance(entry, str) and entry in TOOLS else None
            spec = spec_from_function(function, registered)
            if spec.name in self.functions:
                raise ValueError(f"FunctionToolProvider: two tools are named '{spec.name}'.")
            self.functions[spec.name] = function
            self.specs.append(spec)

    async def list_tools(self) -> list[ToolSpec]:
        return list(self.specs)

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        function = self.functions.get(name)
        if function is None:
            raise ToolError(f"unknown tool '{name}'; available: {', '.join(self.functions)}")
        try:
            inspect.signature(function).bind(**arguments)
        except TypeError as err:
            raise ToolError(f"bad arguments for '{name}': {err}") from None
        try:
            if inspect.iscoroutinefunction(function):
                result = await function(**arguments)
            else:  # a blocking tool must not stall the other episodes' event loop
                result = await asyncio.to_thread(function, **arguments)
        except Exception as err:
            raise ToolError(f"{type(err).__name__}: {err}") from None
        return format_result(result)
