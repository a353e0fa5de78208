"""A tiny MCP server for tests/environment/test_mcp.py, built on the MCP SDK's FastMCP (MCPServer in mcp 2).

Run over stdio (default) or, with `--port N`, over streamable HTTP on 127.0.0.1:N at `/mcp`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=None, help="serve streamable HTTP on 127.0.0.1:PORT instead of stdio")
parser.add_argument("--refuse-start-if", default=None, help="exit at once, with a message on stderr, if this file exists")
options = parser.parse_args()

if options.refuse_start_if and os.path.exists(options.refuse_start_if):
    sys.stderr.write("test-server: refusing to start (refuse-4712)\n")
    sys.exit(3)

try:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP
    from mcp.server.fastmcp.exceptions import ToolError

    server = FastMCP("retrain-test-server", host="127.0.0.1", port=options.port or 8000, log_level="WARNING")
    http_options: dict = {}
except ImportError:  # mcp 2.x renamed FastMCP to MCPServer; host and port go to run()
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer("retrain-test-server", log_level="WARNING")
    http_options = {"host": "127.0.0.1", "port": options.port}


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep, then say so."""
    await asyncio.sleep(seconds)
    return f"slept {seconds:g} s"


_meeting: dict = {"waiting": 0, "event": None}


@server.tool()
async def meet(parties: int, timeout: float) -> str:
    """Return "met" once `parties` calls are in flight at once; fail after `timeout` seconds alone."""
    if _meeting["event"] is None:
        _meeting["event"] = asyncio.Event()
    event = _meeting["event"]
    _meeting["waiting"] += 1
    if _meeting["waiting"] == parties:
        _meeting["waiting"], _meeting["event"] = 0, None
        event.set()
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        raise ToolError(f"waited {timeout:g} s for {parties} concurrent calls") from None
    return "met"


@server.tool()
def crash(once_flag: str = "") -> str:
    """Kill the server process. With `once_flag` (a file path), crash only if that file does not exist yet."""
    if once_flag:
        if os.path.exists(once_flag):
            return "survived"
        with open(once_flag, "w"):
            pass
    sys.stderr.write("test-server: about to crash on purpose (boom-4711)\n")
    sys.stderr.flush()
    os._exit(1)


@server.tool()
def fail(message: str) -> str:
    """Raise an error with `message` (the client sees a tool result with isError)."""
    raise ToolError(message)


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


if __name__ == "__main__":
    if options.port:
        server.run(transport="streamable-http", **http_options)
    else:
        server.run(transport="stdio")
