"""Reading tool calls out of generated text.

The format is Hermes-style, which Qwen, Hermes and many other chat templates use and render:

    <tool_call>
    {"name": "calculate", "arguments": {"expression": "2 + 3"}}
    </tool_call>

Several calls may follow one another in one turn. `arguments` may also be a JSON-encoded string
(some models emit that). Text with no `<tool_call>` tag is a plain answer. Anything else that
starts a tool call but cannot be read (bad JSON, no name, no closing tag) is a parse error, which
the environment shows to the policy rather than dropping.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple, Optional

from retrain.core.episode import ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class ParsedCalls(NamedTuple):
    calls: list[ToolCall]
    error: Optional[str]


def parse_tool_calls(text: str) -> ParsedCalls:
    """The Hermes-style tool calls in `text`, or the reason they cannot be read.

    >>> parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>').calls
    [ToolCall(name='add', arguments={'a': 1})]
    >>> parse_tool_calls("The answer is 4.")
    ParsedCalls(calls=[], error=None)
    """
    if OPEN not in text:
        return ParsedCalls([], None)
    calls = []
    for body in _BLOCK.findall(text):
        call, error = _parse_one(body.strip())
        if error:
            return ParsedCalls(calls, error)
        calls.append(call)
    if text.count(OPEN) > len(calls):
        return ParsedCalls(calls, f"a {OPEN} has no matching {CLOSE}")
    return ParsedCalls(calls, None)


def _parse_one(body: str) -> tuple[Optional[ToolCall], Optional[str]]:
    try:
        payload: Any = json.loads(body)
    except json.JSONDecodeError as err:
        return None, f"the tool call is not valid JSON ({err.msg} at column {err.colno}): {body[:200]}"
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str) or not payload["name"]:
        return None, 'a tool call must be a JSON object with a "name" and "arguments", e.g. {"name": "f", "arguments": {}}'
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None, f"the arguments of '{payload['name']}' are not valid JSON: {arguments[:200]}"
    if not isinstance(arguments, dict):
        return None, f"the arguments of '{payload['name']}' must be a JSON object, got {type(arguments).__name__}"
    return ToolCall(name=payload["name"], arguments=arguments), None
