"""`ToolEnvironment`: multi-turn episodes in which the policy calls tools.

Each turn the policy writes text. If the text holds tool calls (`tool_parsing`), the environment
runs them, concurrently, each bounded by `tool_timeout`, and the results come back as `tool`
messages, rendered through the tokenizer's chat template, as the next observation. Text with no
tool call is the policy's answer and ends the episode. The episode also ends after `max_turns`
policy turns or when the token budget (`max_completion_length`) is spent.

Faults are observations, never crashes: a tool that raises, times out, is unknown, or gets
arguments that are not valid JSON produces an error message the policy reads next turn, and is
counted (`tool_errors`, `tool_timeouts`, `parse_errors` in the episode metrics). Only a tool
provider that cannot serve at all (e.g. an MCP server that died and could not be restarted)
raises, which stops training with its error.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional, Union

from retrain.core.records import Message, PromptRecord
from retrain.environment.base import Environment, EnvironmentObservation, Generation, LLMAction, PolicyClient, ToolCall
from retrain.environment.tool_parsing import parse_tool_calls
from retrain.environment.tools import ToolError, ToolProvider, ToolSpec



class ToolEnvironment(Environment):
    """The policy answers a prompt, calling tools as it goes.

    Args:
        tools: the providers whose tools the policy may call (e.g. `FunctionToolProvider`,
            `MCPToolProvider`).
        max_turns: the most policy turns per episode (tool-calling turns plus the answer).
        tool_timeout: seconds one tool call may take before it becomes a timeout error.
        max_tool_calls_per_turn: calls beyond this in one turn get an error result.
        system_prompt: a system message placed before the prompt.
        tools_in_system_prompt: write the tool schemas, and how to call them, into the system
            message instead of passing them to the chat template as `tools=`: for templates that
            ignore `tools=` (the policy would never see the tools; retrain warns when it finds one).
    """

    def __init__(
        self,
        tools: Union[ToolProvider, list[ToolProvider]],
        max_turns: int = 4,
        tool_timeout: float = 30.0,
        max_tool_calls_per_turn: int = 4,
        system_prompt: Optional[str] = None,
        tools_in_system_prompt: bool = False,
    ) -> None:
        providers = tools if isinstance(tools, list) else [tools]
        if not providers:
            raise ValueError("ToolEnvironment.tools is empty: give at least one tool provider.")
        if max_turns < 1 or tool_timeout <= 0 or max_tool_calls_per_turn < 1:
            raise ValueError("ToolEnvironment: max_turns and max_tool_calls_per_turn must be >= 1 and tool_timeout > 0.")
        self.providers = providers
        self.max_turns = max_turns
        self.tool_timeout = tool_timeout
        self.max_tool_calls_per_turn = max_tool_calls_per_turn
        self.system_prompt = system_prompt
        self.tools_in_system_prompt = tools_in_system_prompt
        self.specs: list[ToolSpec] = []
        self._owner: dict[str, ToolProvider] = {}

    # ------------------------------------------------------------------ shared resources
    async def setup(self) -> None:
        for provider in self.providers:
            await provider.start()
            for spec in await provider.list_tools():
                if spec.name in self._owner:
                    raise ValueError(f"ToolEnvironment: two providers serve a tool named '{spec.name}'.")
                self._owner[spec.name] = provider
                self.specs.append(spec)

    async def close(self) -> None:
        for provider in self.providers:
            await provider.close()

    @property
    def tool_schemas(self) -> list[dict[str, Any]]:
        return [spec.to_chat_template() for spec in self.specs]

    @property
    def _template_tools(self) -> Optional[list[dict[str, Any]]]:
        """What the chat template gets as `tools=` (nothing when the system message carries them)."""
        return None if self.tools_in_system_prompt else self.tool_schemas

    def _system_message(self) -> Optional[str]:
        if not self.tools_in_system_prompt:
            return self.system_prompt
        listed = "\n".join(json.dumps(schema) for schema in self.tool_schemas)
        tools = (
            "You may call these tools:\n<tools>\n" + listed + "\n</tools>\n"
            'To call one, write <tool_call>{"name": <tool name>, "arguments": <arguments object>}</tool_call>.'
        )
        return tools if self.system_prompt is None else f"{self.system_prompt}\n\n{tools}"

    # ------------------------------------------------------------------ one episode
    async def reset(self, record: PromptRecord) -> EnvironmentObservation:
        messages: list[Message] = record.prompt if record.is_chat else [{"role": "user", "content": record.prompt}]
        system = self._system_message()
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        self.messages: list[Message] = list(messages)
        self.pending: list[Message] = []
        self.counts = {"tool_calls": 0, "tool_errors": 0, "tool_timeouts": 0, "parse_errors": 0}
        return EnvironmentObservation(content=list(messages))

    def parse_action(self, generation: Generation) -> LLMAction:
        calls, error = parse_tool_calls(generation.text)
        return LLMAction(
            text=generation.text, tool_calls=calls, parse_error=error,
            token_ids=list(generation.token_ids), truncated=generation.truncated,
        )

    async def step(self, action: LLMAction) -> EnvironmentObservation:
        self.messages.append({"role": "assistant", "content": action.text})
        if action.parse_error is not None:
            self.counts["parse_errors"] += 1
            return self._respond([{"role": "tool", "content": f"Error: {action.parse_error}"}])
        if not action.tool_calls:
            return EnvironmentObservation(done=True)  # a plain answer ends the episode
        calls = action.tool_calls
        results = await asyncio.gather(*(self._run(call) for call in calls[: self.max_tool_calls_per_turn]))
        results += [f"Error: at most {self.max_tool_calls_per_turn} tool calls per turn"] * (len(calls) - len(results))
        return self._respond([{"role": "tool", "name": call.name, "content": result} for call, result in zip(calls, results)])

    def _respond(self, messages: list[Message]) -> EnvironmentObservation:
        self.pending = messages
        return EnvironmentObservation(content=messages, info={"tool_results": [m["content"] for m in messages]})

    async def _run(self, call: ToolCall) -> str:
        self.counts["tool_calls"] += 1
        provider = self._owner.get(call.name)
        if provider is None:
            self.counts["tool_errors"] += 1
            return f"Error: unknown tool '{call.name}'. Available tools: {', '.join(self._owner) or 'none'}."
        try:
            return await asyncio.wait_for(provider.call(call.name, call.arguments), timeout=self.tool_timeout)
        except asyncio.TimeoutError:
            self.counts["tool_timeouts"] += 1
            return f"Error: tool '{call.name}' timed out after {self.tool_timeout:g} s."
        except ToolError as err:
            self.counts["tool_errors"] += 1
            return f"Error: {err}"

    def encode_prompt(self, policy: PolicyClient, observation: EnvironmentObservation) -> list[int]:
        return policy.encode(observation.content, tools=self._template_tools)

    def encode_observation(self, policy: PolicyClient, observation: EnvironmentObservation) -> list[int]:
        history, self.messages = self.messages, [*self.messages, *self.pending]
        return policy.encode_continuation(history, self.pending, tools=self._template_tools)

    def episode_metrics(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.counts.items()}
