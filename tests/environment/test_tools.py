import asyncio
import uuid

import pytest

from retrain.environment.base import ToolCall
from retrain.environment.tool_parsing import parse_tool_calls
from retrain.environment.tools import TOOLS, FunctionToolProvider, ToolError, spec_from_function, tool


def multiply(a: float, b: float) -> float:
    """Multiply two numbers.

    Args:
        a: the first factor.
        b: the second factor.
    """
    return a * b


async def slow_echo(text: str, seconds: float = 0.2) -> str:
    """Echo after a pause.

    Args:
        text: what to echo.
        seconds: how long to wait.
    """
    await asyncio.sleep(seconds)
    return text


def test_schema_comes_from_type_hints_and_docstring():
    spec = spec_from_function(multiply)
    assert spec.name == "multiply" and spec.description == "Multiply two numbers."
    assert spec.parameters["properties"]["a"] == {"type": "number", "description": "the first factor."}
    assert spec.parameters["required"] == ["a", "b"]
    assert spec.to_chat_template()["function"]["name"] == "multiply"


def test_tool_registry_validates_at_registration():
    name = f"mul_{uuid.uuid4().hex[:6]}"
    tool(name=name)(multiply)
    assert TOOLS.get(name) is multiply

    def undocumented(x):
        return x

    with pytest.raises(ValueError, match="type hint"):
        tool(undocumented)


def test_function_provider_calls_sync_and_async_tools():
    provider = FunctionToolProvider([multiply, slow_echo])

    async def run():
        assert [s.name for s in await provider.list_tools()] == ["multiply", "slow_echo"]
        return await provider.call("multiply", {"a": 6, "b": 7}), await provider.call("slow_echo", {"text": "hi", "seconds": 0})

    assert asyncio.run(run()) == ("42", "hi")


def test_async_tools_run_concurrently(meeting):
    everyone = meeting(5)

    async def meet(text: str) -> str:
        """Return the text once all five calls are in flight.

        Args:
            text: what to return.
        """
        await everyone.attend()
        return text

    async def run():
        return await asyncio.gather(*(FunctionToolProvider([meet]).call("meet", {"text": str(i)}) for i in range(5)))

    assert asyncio.run(run()) == ["0", "1", "2", "3", "4"]  # a serial schedule would raise TimeoutError
    assert everyone.rounds == 1


@pytest.mark.parametrize(
    "name, arguments, message",
    [("multiply", {"a": 1}, "bad arguments for 'multiply'"), ("divide", {}, "unknown tool 'divide'")],
)
def test_provider_errors_are_tool_errors(name, arguments, message):
    with pytest.raises(ToolError, match=message):
        asyncio.run(FunctionToolProvider([multiply]).call(name, arguments))


def test_a_raising_tool_becomes_a_tool_error():
    def broken(x: int) -> int:
        """Always fails.

        Args:
            x: ignored.
        """
        raise ZeroDivisionError("division by zero")

    with pytest.raises(ToolError, match="ZeroDivisionError: division by zero"):
        asyncio.run(FunctionToolProvider([broken]).call("broken", {"x": 1}))


@pytest.mark.parametrize(
    "text, calls, error",
    [
        ("no tools here", [], None),
        ('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', [ToolCall("f", {"x": 1})], None),
        ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 2}"}\n</tool_call>', [ToolCall("f", {"x": 2})], None),
        (
            'a <tool_call>{"name": "f", "arguments": {}}</tool_call> b <tool_call>{"name": "g"}</tool_call>',
            [ToolCall("f", {}), ToolCall("g", {})],
            None,
        ),
        ('<tool_call>{"name": "f", "arguments": {</tool_call>', [], "not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', [], 'with a "name"'),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', [], "must be a JSON object"),
        ('<tool_call>{"name": "f", "arguments": {}}', [], "no matching </tool_call>"),
    ],
)
def test_hermes_tool_call_parsing(text, calls, error):
    parsed = parse_tool_calls(text)
    assert parsed.calls == calls
    assert (parsed.error is None) if error is None else (error in parsed.error)
