"""An agent written only against the official `openai` SDK: it answers an arithmetic question,
calling a calculator tool in a loop. Nothing here knows about retrain; retrain trains it unchanged:

    retrain fit --config configs/agent_calculator.yaml

(`AgentEnvironment` gives `agent` a client pointed at the policy under training and records the
exact tokens of every call.) Point the same agent at any OpenAI-compatible server to run it for real:
`python examples/calculator_agent.py --base-url http://localhost:8000/v1 --model <name>`.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from typing import Any

import openai

SYSTEM = "Answer with a number. Use the calculate tool for arithmetic."
TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculate",
        "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12 * (3 + 4)"}},
            "required": ["expression"],
        },
    },
}]
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, or an error message the model reads."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError("only numbers and + - * / ( )")

    try:
        result = value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as err:
        return f"Error: {err}"
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


def run_tool(call: Any) -> str:
    if call.function.name != "calculate":
        return f"Error: unknown tool {call.function.name!r}"
    try:
        arguments = json.loads(call.function.arguments or "{}")
        return calculate(str(arguments["expression"]))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"Error: bad arguments ({err})"


async def agent(client: openai.AsyncOpenAI, record: Any, model: str = "policy", max_turns: int = 3) -> dict[str, Any]:
    """Ask, run the tool calls, repeat until a plain answer; return the reward and what happened."""
    question = record.prompt if isinstance(record.prompt, str) else record.prompt[-1]["content"]
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    tool_calls = 0
    for _ in range(max_turns):
        response = await client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=48)
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            break
        for call in message.tool_calls:
            tool_calls += 1
            messages.append({"role": "tool", "tool_call_id": call.id, "content": run_tool(call)})
    answer = messages[-1].get("content") or "" if messages[-1]["role"] == "assistant" else ""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", answer)
    correct = bool(numbers) and record.answer is not None and float(numbers[-1]) == float(record.answer)
    return {"reward": float(correct), "answer": answer, "tool_calls": tool_calls}


if __name__ == "__main__":
    import argparse
    import asyncio
    import os
    from types import SimpleNamespace

    parser = argparse.ArgumentParser(description="Run the agent once against an OpenAI-compatible server.")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"))
    parser.add_argument("--model", default="policy")
    parser.add_argument("--question", default="What is 17 * 23?")
    parser.add_argument("--answer", default="391")
    args = parser.parse_args()
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "none"))
    print(asyncio.run(agent(client, SimpleNamespace(prompt=args.question, answer=args.answer), model=args.model)))
