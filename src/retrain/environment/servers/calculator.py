"""An arithmetic MCP server over stdio: `python -m retrain.environment.servers.calculator`.

One tool, `calculate(expression)`, for the tool-use config and tests. It ships with retrain so the
shipped config runs on whichever `mcp` major is installed (the PyPI calculator servers pin mcp 1.x,
and current MCP servers and vLLM need 2.x). Expressions are parsed, never `eval`ed: numbers,
+ - * / // % **, parentheses and a few math functions; exponents and results are bounded so a
policy cannot stall the server.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "log": math.log, "exp": math.exp,
}
_MAX_EXPONENT = 1000
_MAX_MAGNITUDE = 1e100


def evaluate(expression: str) -> float | int:
    """The value of an arithmetic `expression`; `ValueError` says what is not allowed.

    >>> evaluate("2 * (3 + 4)"), evaluate("sqrt(16) / 8"), evaluate("7 // 2")
    (14, 0.5, 3)
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {expression!r} ({err.msg})") from None
    value = _value(tree.body)
    if abs(value) > _MAX_MAGNITUDE:
        raise ValueError("the result is too large")
    return value


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponents above {_MAX_EXPONENT} are not allowed")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
        return _FUNCTIONS[node.func.id](*(_value(arg) for arg in node.args))
    allowed = ", ".join(_FUNCTIONS)
    raise ValueError(f"only numbers, + - * / // % **, parentheses and {allowed} are allowed (got {ast.unparse(node)!r})")


def _format(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def main() -> None:
    try:  # mcp 1.x
        from mcp.server.fastmcp import FastMCP as Server
        from mcp.server.fastmcp.exceptions import ToolError
    except ImportError:  # mcp 2.x renamed FastMCP to MCPServer
        from mcp.server.mcpserver import MCPServer as Server
        from mcp.server.mcpserver.exceptions import ToolError

    server = Server("retrain-calculator", log_level="WARNING")

    @server.tool()
    def calculate(expression: str) -> str:
        """Evaluate an arithmetic expression, e.g. "2 * (3 + 4)" or "sqrt(16) / 8".

        Args:
            expression: numbers, + - * / // % **, parentheses, and sqrt, abs, round, floor, ceil, log, exp.
        """
        try:
            return _format(evaluate(expression))
        except (ValueError, TypeError, OverflowError) as err:
            raise ToolError(f"calculate: {err}") from None

    server.run()  # stdio


if __name__ == "__main__":
    main()
