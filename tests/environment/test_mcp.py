"""Tests for retrain.environment.mcp.MCPToolProvider against real MCP servers over the real protocol.

Servers: retrain's calculator (`python -m retrain.environment.servers.calculator`, stdio), the PyPI
package `mcp-server-time` (a third-party server, stdio) and `servers/mcp_test_server.py` (the SDK's
FastMCP/MCPServer; stdio, or streamable HTTP on a free loopback port). No mocks. Every test starts and
closes its own servers.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

pytest.importorskip("mcp")

from retrain.environment.mcp import MAX_RESTARTS_WITHOUT_SUCCESS, MCPServerError, MCPToolProvider  # noqa: E402
from retrain.environment.tools import ToolError  # noqa: E402

pytestmark = pytest.mark.timeout(60)

TEST_SERVER = str(Path(__file__).parent / "servers" / "mcp_test_server.py")
HANG_GUARD = 30.0  # seconds: a bound only a hang breaks; what a test proves is its outcome, not its speed


def calculator(**kwargs: Any) -> MCPToolProvider:
    return MCPToolProvider(command=sys.executable, args=["-m", "retrain.environment.servers.calculator"], startup_timeout=15.0, **kwargs)


def our_server(*extra_args: str, **kwargs: Any) -> MCPToolProvider:
    return MCPToolProvider(command=sys.executable, args=[TEST_SERVER, *extra_args], startup_timeout=15.0, **kwargs)


def run(provider: MCPToolProvider, body: Callable[[MCPToolProvider], Awaitable[Any]]) -> Any:
    """Start `provider`, run `body`, always close it (within the test's event loop)."""

    async def main() -> Any:
        await provider.start()
        try:
            return await body(provider)
        finally:
            started = time.monotonic()
            await provider.close()
            assert time.monotonic() - started < HANG_GUARD, "close() hung"

    return asyncio.run(main())


# -- retrain's calculator server over stdio ---------------------------------------------------------------


def test_calculator_lists_its_tool_with_a_schema():
    async def body(provider: MCPToolProvider):
        specs = await provider.list_tools()
        assert [spec.name for spec in specs] == ["calculate"]
        (spec,) = specs
        assert spec.description
        assert spec.parameters["type"] == "object"
        assert "expression" in spec.parameters["properties"]
        assert spec.parameters["required"] == ["expression"]
        assert spec.to_chat_template()["function"]["name"] == "calculate"

    run(calculator(), body)


def test_calculator_computes():
    async def body(provider: MCPToolProvider):
        assert await provider.call("calculate", {"expression": "2 * (3 + 4)"}) == "14"
        assert float(await provider.call("calculate", {"expression": "sqrt(16) / 8"})) == 0.5

    run(calculator(), body)


def test_calculator_concurrent_calls_all_answer_right():
    expressions = {f"{i} * {i} + 1": str(i * i + 1) for i in range(8)}

    async def body(provider: MCPToolProvider):
        results = await asyncio.gather(*(provider.call("calculate", {"expression": e}) for e in expressions))
        assert results == list(expressions.values())

    run(calculator(), body)


def test_calculator_bad_expression_and_unknown_tool_are_tool_errors():
    async def body(provider: MCPToolProvider):
        with pytest.raises(ToolError) as bad:
            await provider.call("calculate", {"expression": "2 +* ("})
        assert "calculate" in str(bad.value) and "not an arithmetic expression" in str(bad.value)
        with pytest.raises(ToolError) as unknown:
            await provider.call("integrate", {"expression": "x"})
        assert "unknown tool 'integrate'" in str(unknown.value) and "calculate" in str(unknown.value)
        with pytest.raises(ToolError):  # missing required argument: the server rejects it
            await provider.call("calculate", {})
        # the server is still fine afterwards
        assert await provider.call("calculate", {"expression": "1 + 1"}) == "2"

    run(calculator(), body)


def test_a_third_party_server_from_pypi():
    """mcp-server-time (a test dependency: its absence fails here, it is not skipped), on the same mcp major."""
    provider = MCPToolProvider(command=sys.executable, args=["-m", "mcp_server_time", "--local-timezone", "UTC"], startup_timeout=20.0)

    async def body(provider: MCPToolProvider):
        names = [spec.name for spec in await provider.list_tools()]
        assert "get_current_time" in names
        answer = json.loads(await provider.call("get_current_time", {"timezone": "UTC"}))
        assert answer["timezone"] == "UTC" and answer["datetime"][:4].isdigit()

    run(provider, body)


# -- the FastMCP test server over stdio -------------------------------------------------------------


def test_echo_error_result_and_allow_list():
    async def body(provider: MCPToolProvider):
        assert [spec.name for spec in await provider.list_tools()] == ["echo", "fail"]
        assert await provider.call("echo", {"text": "héllo\nworld"}) == "héllo\nworld"
        with pytest.raises(ToolError, match="nope-123"):
            await provider.call("fail", {"message": "nope-123"})
        with pytest.raises(ToolError, match="unknown tool 'crash'"):  # served, but not allowed
            await provider.call("crash", {})

    run(our_server(tools=["echo", "fail"]), body)


def test_allow_list_naming_a_missing_tool_fails_at_start():
    provider = our_server(tools=["echo", "teleport"])
    with pytest.raises(ValueError, match="teleport"):
        asyncio.run(provider.start())


def test_timeout_is_a_tool_error_and_the_server_keeps_working():
    async def body(provider: MCPToolProvider):
        with pytest.raises(ToolError, match=r"tool 'slow' timed out after 1 s"):  # a call of 10 minutes, cut off
            await provider.call("slow", {"seconds": 600})
        assert await provider.call("slow", {"seconds": 0.1}) == "slept 0.1 s"
        assert provider.restarts == 0

    run(our_server(call_timeout=1.0), body)


def test_calls_run_concurrently():
    async def body(provider: MCPToolProvider):
        # The server answers only once all 8 calls are in flight at once; serially, the first fails.
        results = await asyncio.gather(*(provider.call("meet", {"parties": 8, "timeout": HANG_GUARD}) for _ in range(8)))
        assert results == ["met"] * 8

    run(our_server(), body)


def test_crash_without_restart_raises_server_error_with_stderr():
    async def body(provider: MCPToolProvider):
        with pytest.raises(MCPServerError) as crashed:
            await provider.call("crash", {})
        assert "boom-4711" in str(crashed.value)
        with pytest.raises(MCPServerError, match="boom-4711"):  # and it stays down
            await provider.call("echo", {"text": "hi"})
        assert provider.restarts == 0

    run(our_server(restart_on_failure=False), body)


def test_crash_with_restart_restarts_and_the_next_call_works():
    async def body(provider: MCPToolProvider):
        first_pid = json.loads(await provider.call("pid", {}))
        # crash() kills the restarted server too: this call fails, the provider does not
        with pytest.raises(ToolError, match="boom-4711"):
            await provider.call("crash", {})
        assert provider.restarts == 1
        assert await provider.call("echo", {"text": "still here"}) == "still here"
        assert provider.restarts == 2
        assert json.loads(await provider.call("pid", {})) != first_pid

    run(our_server(), body)


def test_crash_once_is_retried_transparently(tmp_path: Path):
    async def body(provider: MCPToolProvider):
        assert await provider.call("crash", {"once_flag": str(tmp_path / "crashed")}) == "survived"
        assert provider.restarts == 1

    run(our_server(), body)


def test_concurrent_calls_share_one_restart(tmp_path: Path):
    async def body(provider: MCPToolProvider):
        # Slow calls in flight when the server dies are all retried on the one restarted server.
        slow = [asyncio.ensure_future(provider.call("slow", {"seconds": 2})) for _ in range(4)]
        await asyncio.sleep(0.3)
        assert await provider.call("crash", {"once_flag": str(tmp_path / "crashed")}) == "survived"
        assert await asyncio.gather(*slow) == ["slept 2 s"] * 4
        assert provider.restarts == 1

    run(our_server(), body)


def test_server_that_dies_while_idle_is_restarted_on_the_next_call():
    async def body(provider: MCPToolProvider):
        pid = json.loads(await provider.call("pid", {}))
        os.kill(pid, 9)
        await asyncio.sleep(0.3)
        assert await provider.call("echo", {"text": "back"}) == "back"
        assert provider.restarts == 1

    run(our_server(), body)


def test_failed_restart_raises_server_error(tmp_path: Path):
    refuse = tmp_path / "refuse"

    async def body(provider: MCPToolProvider):
        refuse.touch()  # from now on the server refuses to start
        with pytest.raises(MCPServerError) as failed:
            await provider.call("crash", {})
        message = str(failed.value)
        assert "restarting it failed too" in message and "refuse-4712" in message and "boom-4711" in message
        with pytest.raises(MCPServerError):
            await provider.call("echo", {"text": "hi"})

    run(our_server("--refuse-start-if", str(refuse)), body)


def test_server_that_cannot_start_raises_server_error_with_stderr(tmp_path: Path):
    refuse = tmp_path / "refuse"
    refuse.touch()
    provider = our_server("--refuse-start-if", str(refuse))
    started = time.monotonic()
    with pytest.raises(MCPServerError, match="refuse-4712"):
        asyncio.run(provider.start())
    assert time.monotonic() - started < HANG_GUARD


def test_startup_timeout():
    # A "server" that never speaks MCP: start() gives up after startup_timeout.
    provider = MCPToolProvider(command=sys.executable, args=["-c", "import time; time.sleep(60)"], startup_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(MCPServerError, match="did not start within startup_timeout=1 s"):
        asyncio.run(provider.start())
    assert time.monotonic() - started < HANG_GUARD  # the "server" would sleep 60 s


def test_missing_executable_is_a_server_error():
    provider = MCPToolProvider(command="/nonexistent/mcp-server-xyz")
    with pytest.raises(MCPServerError, match="could not be started"):
        asyncio.run(provider.start())


def test_calls_after_close_raise_and_start_reopens_on_a_new_event_loop():
    provider = our_server()

    async def first_loop():
        await provider.start()
        assert await provider.call("echo", {"text": "one"}) == "one"
        await provider.close()
        await provider.close()  # idempotent
        with pytest.raises(MCPServerError, match="closed"):
            await provider.call("echo", {"text": "hi"})

    asyncio.run(first_loop())
    # e.g. the rollout engine closed its environment and event loop, and a new one starts it again
    assert run(provider, lambda p: p.call("echo", {"text": "two"})) == "two"


def test_a_server_that_keeps_dying_is_given_up_on():
    async def body(provider: MCPToolProvider):
        for _ in range(MAX_RESTARTS_WITHOUT_SUCCESS):
            with pytest.raises(ToolError, match="boom-4711"):
                await provider.call("crash", {})
        assert provider.restarts == MAX_RESTARTS_WITHOUT_SUCCESS
        with pytest.raises(MCPServerError, match="giving up"):
            await provider.call("crash", {})
        with pytest.raises(MCPServerError, match="giving up"):
            await provider.call("echo", {"text": "hi"})

    run(our_server(), body)


def test_built_from_a_config_by_jsonargparse():
    from jsonargparse import ArgumentParser

    from retrain.environment.tools import ToolProvider

    parser = ArgumentParser()
    parser.add_argument("--provider", type=ToolProvider)
    init_args = {"command": sys.executable, "args": ["-m", "retrain.environment.servers.calculator"], "call_timeout": 5, "tools": ["calculate"]}
    config = parser.parse_args(
        ["--provider", json.dumps({"class_path": "retrain.environment.mcp.MCPToolProvider", "init_args": init_args})]
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    provider = instantiate(config).provider
    assert isinstance(provider, MCPToolProvider)
    assert (provider.args, provider.call_timeout, provider.tools, provider.restart_on_failure) == (
        ["-m", "retrain.environment.servers.calculator"], 5.0, ["calculate"], True,
    )


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        MCPToolProvider()
    with pytest.raises(ValueError, match="exactly one"):
        MCPToolProvider(command="x", url="http://127.0.0.1:1/mcp")
    with pytest.raises(ValueError, match="empty"):
        MCPToolProvider(command="x", tools=[])


# -- the FastMCP test server over streamable HTTP ---------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HttpServer:
    """The test server on streamable HTTP at `url` (a free loopback port), as a subprocess."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.log_path = log_path
        self.process: "subprocess.Popen[bytes] | None" = None

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, TEST_SERVER, "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"test MCP HTTP server did not come up:\n{self.log_path.read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None


@pytest.fixture
def http_server(tmp_path: Path):
    server = HttpServer(tmp_path / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_streamable_http_lists_and_calls(http_server: str):
    async def body(provider: MCPToolProvider):
        names = {spec.name for spec in await provider.list_tools()}
        assert {"echo", "slow", "crash", "fail", "pid"} <= names
        assert await provider.call("echo", {"text": "over http"}) == "over http"
        results = await asyncio.gather(*(provider.call("echo", {"text": str(i)}) for i in range(8)))
        assert results == [str(i) for i in range(8)]
        with pytest.raises(ToolError, match="nope-456"):
            await provider.call("fail", {"message": "nope-456"})

    run(MCPToolProvider(url=http_server.url, startup_timeout=15.0), body)


def test_streamable_http_reconnects_to_a_restarted_server(http_server: HttpServer):
    async def body(provider: MCPToolProvider):
        first_pid = json.loads(await provider.call("pid", {}))
        http_server.stop()
        http_server.start()  # same port, new process: it does not know the old session
        assert json.loads(await provider.call("pid", {})) != first_pid
        assert provider.restarts == 1

    run(MCPToolProvider(url=http_server.url, startup_timeout=15.0), body)


def test_streamable_http_server_gone_raises_server_error(http_server: HttpServer):
    async def body(provider: MCPToolProvider):
        assert await provider.call("echo", {"text": "a"}) == "a"
        http_server.stop()
        started = time.monotonic()
        with pytest.raises(MCPServerError, match="restarting it failed too"):
            await provider.call("echo", {"text": "b"})
        assert time.monotonic() - started < HANG_GUARD

    run(MCPToolProvider(url=http_server.url, startup_timeout=5.0), body)


def test_streamable_http_unreachable_is_a_server_error():
    provider = MCPToolProvider(url=f"http://127.0.0.1:{free_loopback_port()}/mcp", startup_timeout=5.0)
    started = time.monotonic()
    with pytest.raises(MCPServerError):
        asyncio.run(provider.start())
    assert time.monotonic() - started < HANG_GUARD


def test_result_text_of_every_content_kind():
    from mcp import types

    from retrain.environment.mcp import _result_text

    result = types.CallToolResult.model_validate(
        {
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image", "data": "QUJD", "mimeType": "image/png"},
                {"type": "resource", "resource": {"uri": "file:///x.txt", "text": "inside"}},
                {"type": "resource", "resource": {"uri": "file:///x.bin", "blob": "QUJD", "mimeType": "application/octet-stream"}},
                {"type": "resource_link", "uri": "file:///y", "name": "y"},
            ]
        }
    )
    assert _result_text(result).splitlines() == [
        "a",
        "[image image/png, 4 base64 characters]",
        "inside",
        "[binary resource file:///x.bin application/octet-stream]",
        "[resource link: file:///y]",
    ]
    assert _result_text(types.CallToolResult.model_validate({"content": [], "structuredContent": {"result": 3}})) == '{"result": 3}'
