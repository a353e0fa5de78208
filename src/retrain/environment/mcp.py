"""Tools from an MCP (Model Context Protocol) server, for `ToolEnvironment`.

Why: many tools already exist as MCP servers (calculators, code runners, search, databases). With
`MCPToolProvider` a training config points at such a server instead of re-wrapping its tools as
Python functions: the provider launches the server as a subprocess speaking MCP over stdio
(`command`/`args`/`env`) or connects to one already running over streamable HTTP (`url`), lists its
tools once, and forwards every tool call of every episode over one long-lived session.

How: one background asyncio task owns the MCP client's context managers (transport and
`ClientSession`), enters and exits them itself (anyio cancel scopes must be entered and left in the
same task) and otherwise just waits for `close()`. Episodes call tools concurrently from their own
tasks; requests are multiplexed on the session by JSON-RPC id. The server's stderr goes to a temporary
file whose tail is quoted in error messages (it is not echoed to the console).

Failure policy (every wait is bounded, nothing hangs):

- Unknown tool, bad arguments, a tool reporting an error (`isError`), a JSON-RPC error or a call
  running past `call_timeout`: `ToolError`; the policy sees the message and the episode goes on. A
  timed-out call is abandoned on the client side; the server is not restarted for it.
- The server dies or the connection drops (the stdio subprocess exits, the HTTP endpoint goes away):
  - with `restart_on_failure=False`: `MCPServerError`, and every later call raises it too;
  - with `restart_on_failure=True`: the server is restarted (relaunched or reconnected) once and the
    call retried once. Concurrent calls caught by the same failure share that one restart. If the
    retried call kills the restarted server again, that call gets a `ToolError` (the server itself
    starts fine; this call is what breaks it) and the next call restarts it again.
  - If a restart itself fails (the server cannot be launched, initialized or listed within
    `startup_timeout`), or the server fails again after `MAX_RESTARTS_WITHOUT_SUCCESS` restarts with
    no call answered in between (answered with an error counts): `MCPServerError`, and every later
    call raises it too (until `close()` and a new `start()`).
- `MCPServerError` is deliberately *not* a `ToolError`: it means the tools are gone, not that one call
  failed, so it propagates out of the rollout and stops training with the server's stderr tail in the
  message, rather than training on episodes whose every tool call fails.

One call may thus take up to `call_timeout` + restart (at most `startup_timeout`) + `call_timeout`; a
caller's own, shorter timeout (`ToolEnvironment.tool_timeout`) cancels it cleanly, a restart included
(the next call then starts the server). Works with the MCP SDK 1.x (>= 1.10) and 2.x.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import shlex
import tempfile
from contextlib import AsyncExitStack
from typing import IO, Any, Optional

from retrain.core.errors import TrainingFault
from retrain.environment.tools import ToolError, ToolProvider, ToolSpec, format_result

log = logging.getLogger(__name__)

#: Restarts allowed in a row without one successful tool call in between before giving up.
MAX_RESTARTS_WITHOUT_SUCCESS = 3
#: JSON-RPC error code the MCP SDK uses for "Connection closed" (the same in mcp 1.x and 2.x).
_CONNECTION_CLOSED = -32000
_STDERR_TAIL_BYTES = 4096
_STDERR_TAIL_LINES = 30
_STDERR_FILE_LIMIT = 8 * 1024 * 1024  # trim the captured stderr of a chatty server beyond this
_CLOSE_TIMEOUT = 15.0  # the SDK's stdio shutdown: close stdin, wait 2 s, SIGTERM, wait 2 s, SIGKILL


class MCPServerError(TrainingFault):
    """The MCP server is unusable (died, cannot be (re)started); stops training instead of one call."""


class _ServerDied(Exception):
    """Internal: the connection used for a call is gone."""


def _field(obj: Any, camel: str, snake: str, default: Any = None) -> Any:
    """An attribute of an MCP type: mcp 1.x spells fields in camelCase, mcp 2.x in snake_case."""
    value = getattr(obj, camel, None)
    if value is None:
        value = getattr(obj, snake, None)
    return default if value is None else value


def _is_connection_closed(err: BaseException) -> bool:
    """Whether a failed request means the connection is gone (rather than the server refusing it)."""
    import anyio

    if isinstance(err, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, ConnectionError)):
        return True  # the session's streams were closed under it: the transport ended
    error = getattr(err, "error", None)
    if getattr(error, "code", None) == _CONNECTION_CLOSED:
        return True
    # Streamable HTTP: the server no longer knows our session (HTTP 404), e.g. it was restarted. The
    # SDK's client reports that as "Session terminated" (1.x) or passes on the server's message (2.x).
    message = str(getattr(error, "message", "")).strip().lower()
    return message in ("session terminated", "session not found")


def _describe(err: BaseException) -> str:
    """One line for an exception, unwrapping (nested) exception groups from anyio task groups."""
    while hasattr(err, "exceptions") and len(getattr(err, "exceptions")) == 1:
        err = err.exceptions[0]  # type: ignore[attr-defined]
    message = str(err).strip()
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _block_text(block: Any) -> str:
    """One content block as text: text as it is, binary content summarized (never base64 into a prompt)."""
    kind = getattr(block, "type", None)
    if kind == "text":
        return str(block.text)
    if kind in ("image", "audio"):
        return f"[{kind} {_field(block, 'mimeType', 'mime_type', '')}, {len(getattr(block, 'data', '') or '')} base64 characters]"
    if kind == "resource":  # an embedded resource: its text if it has some
        resource = block.resource
        text = getattr(resource, "text", None)
        return text if isinstance(text, str) else f"[binary resource {resource.uri} {_field(resource, 'mimeType', 'mime_type', '')}]"
    if kind == "resource_link":
        return f"[resource link: {block.uri}]"
    dump = block.model_dump(mode="json", by_alias=True, exclude_none=True) if hasattr(block, "model_dump") else block
    return format_result(dump)


def _result_text(result: Any) -> str:
    """The text of a `CallToolResult`: its content blocks joined, or else its structured content as JSON."""
    parts = [_block_text(block) for block in _field(result, "content", "content", [])]
    if parts:
        return "\n".join(parts)
    structured = _field(result, "structuredContent", "structured_content")
    return format_result(structured) if structured is not None else ""


async def _list_all_tools(session: Any) -> list[Any]:
    """Every tool the session's server lists, following pagination cursors."""
    result = await session.list_tools()
    tools = list(result.tools)
    cursor = _field(result, "nextCursor", "next_cursor")
    for _ in range(1000):  # a server whose cursors never end must not hang start()
        if not cursor:
            break
        if "params" in inspect.signature(session.list_tools).parameters:
            from mcp import types

            result = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
        else:  # mcp < 1.2x: cursor only
            result = await session.list_tools(cursor)
        tools.extend(result.tools)
        cursor = _field(result, "nextCursor", "next_cursor")
    return tools


class _Connection:
    """One server process (or HTTP session) and the task that owns its MCP client contexts."""

    def __init__(self, provider: MCPToolProvider) -> None:
        self.provider = provider
        self.session: Any = None
        self.tools: list[Any] = []
        self.task: Optional[asyncio.Task[None]] = None
        self.stop = asyncio.Event()
        self.error: Optional[BaseException] = None  # what ended the owner task, if anything did
        self.errlog: Optional[IO[str]] = None
        if provider.command is not None:
            # Opened by path in append mode: the server appends with O_APPEND whatever our own read
            # offset is; the path is unlinked at once, the open file lives until `close`.
            fd, path = tempfile.mkstemp(prefix="retrain-mcp-", suffix=".stderr")
            os.close(fd)
            self.errlog = open(path, "a+", encoding="utf-8", errors="replace")
            os.unlink(path)

    @property
    def alive(self) -> bool:
        return self.session is not None and self.task is not None and not self.task.done()

    async def open(self, timeout: float) -> None:
        """Launch/connect, initialize and list the tools, within `timeout` seconds."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._own(ready), name=f"mcp:{self.provider.label}")
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except asyncio.TimeoutError:
            ready.cancel()
            tail = self.stderr_tail()
            await self.close()
            raise MCPServerError(
                f"MCP server {self.provider.label} did not start within startup_timeout={self.provider.startup_timeout:g} s."
                + tail
            ) from None
        except BaseException as err:
            ready.cancel()
            tail = self.stderr_tail()
            await self.close()
            if isinstance(err, Exception):
                raise MCPServerError(f"MCP server {self.provider.label} could not be started: {_describe(err)}." + tail) from err
            raise

    async def _own(self, ready: asyncio.Future[None]) -> None:
        """The owner task: enters the transport and session, then waits for `stop`, then exits them."""
        from mcp import ClientSession

        try:
            async with AsyncExitStack() as stack:
                streams = await stack.enter_async_context(self._transport())
                session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
                await session.initialize()
                self.tools = await _list_all_tools(session)
                self.session = session
                if not ready.done():
                    ready.set_result(None)
                await self.stop.wait()
        except Exception as err:  # includes the exception groups of the SDK's anyio task groups
            self.error = err
            if not ready.done():
                ready.set_exception(err)
            elif not self.stop.is_set():
                log.debug("MCP connection to %s ended: %s", self.provider.label, _describe(err))
        finally:
            if not ready.done():
                ready.set_exception(MCPServerError("the MCP connection ended before it was ready"))

    def _transport(self) -> Any:
        provider = self.provider
        if provider.url is not None:
            from mcp.client import streamable_http

            if hasattr(streamable_http, "streamable_http_client"):
                return streamable_http.streamable_http_client(provider.url)
            return streamable_http.streamablehttp_client(provider.url)  # mcp < 1.2x
        from mcp.client.stdio import StdioServerParameters, stdio_client

        assert provider.command is not None and self.errlog is not None
        params = StdioServerParameters(command=provider.command, args=list(provider.args), env=provider.env)
        return stdio_client(params, errlog=self.errlog)

    async def close(self) -> None:
        """Exit the client contexts (which stops a stdio server), bounded in time; idempotent."""
        self.stop.set()
        task = self.task
        if task is not None and not task.done():
            if self.session is None:  # still starting (e.g. stuck in initialize): nothing waits for `stop`
                task.cancel()
            done, _ = await asyncio.wait({task}, timeout=_CLOSE_TIMEOUT)
            if not done:
                log.warning("MCP server %s did not shut down within %g s; cancelling.", self.provider.label, _CLOSE_TIMEOUT)
                task.cancel()
                await asyncio.wait({task}, timeout=5.0)
        self.session = None
        if self.errlog is not None:
            self.errlog.close()

    def stderr_tail(self) -> str:
        """The last lines the server wrote to stderr, formatted for an error message ('' if none)."""
        if self.errlog is None:
            return ""
        try:
            fd = self.errlog.fileno()
            size = os.fstat(fd).st_size
            start = max(0, size - _STDERR_TAIL_BYTES)
            data = os.pread(fd, size - start, start).decode("utf-8", errors="replace")
        except (OSError, ValueError):
            return ""
        lines = data.splitlines()[-_STDERR_TAIL_LINES:]
        if start > 0 and len(lines) > 1:
            lines = lines[1:]  # the first line is probably cut
        if not any(line.strip() for line in lines):
            return "\nThe server wrote nothing to stderr."
        return "\nLast lines of the server's stderr:\n" + "\n".join(f"  | {line}" for line in lines)

    def trim_stderr(self) -> None:
        """Keep the captured stderr of a long run bounded: past the limit keep only its tail."""
        if self.errlog is None:
            return
        try:
            fd = self.errlog.fileno()
            size = os.fstat(fd).st_size
            if size <= _STDERR_FILE_LIMIT:
                return
            keep = os.pread(fd, _STDERR_TAIL_BYTES, size - _STDERR_TAIL_BYTES)
            os.ftruncate(fd, 0)
            os.write(fd, keep)  # O_APPEND: lands at the (new) end
        except (OSError, ValueError):
            pass


class MCPToolProvider(ToolProvider):
    """Tools served by an MCP server: a subprocess over stdio, or a running server over streamable HTTP.

    The server is started (or connected to) by `start()`, its tools are listed once, and one session
    stays open for every call until `close()`. See the module docstring for the failure policy: a
    failing call is a `ToolError` shown to the policy; a server that is gone for good raises
    `MCPServerError`, which stops training.

    Args:
        command: Executable that runs the server over stdio, e.g. `python`, `uvx` or `npx`. Give
            exactly one of `command` and `url`.
        args: Arguments for `command`, e.g. `["-m", "mcp_server_calculator"]`.
        env: Environment variables for the server process. The MCP SDK starts servers with a
            minimal environment (HOME, PATH, SHELL, TERM, USER, LOGNAME); these are added to it.
        url: Endpoint of a running MCP server speaking streamable HTTP, e.g.
            `http://127.0.0.1:8000/mcp`.
        call_timeout: Seconds one tool call may take; a slower call becomes a `ToolError`.
        startup_timeout: Seconds to launch or connect, initialize the session and list the tools.
        restart_on_failure: If the server dies or the connection drops, restart it once and retry the
            call once. If False, or if the restart fails, raise `MCPServerError`.
        tools: Names of the server's tools to expose (all of them if not given). A name the server
            does not have is an error at `start()`.
    """

    def __init__(
        self,
        command: Optional[str] = None,
        args: list[str] = [],  # noqa: B006 - copied below; a list default keeps the jsonargparse signature plain
        env: Optional[dict[str, str]] = None,
        url: Optional[str] = None,
        call_timeout: float = 30.0,
        startup_timeout: float = 30.0,
        restart_on_failure: bool = True,
        tools: Optional[list[str]] = None,
    ) -> None:
        if (command is None) == (url is None):
            raise ValueError("MCPToolProvider: give exactly one of `command` (stdio server) and `url` (streamable HTTP).")
        if url is not None and (args or env):
            raise ValueError("MCPToolProvider: `args` and `env` apply to a `command`, not to a `url`.")
        if call_timeout <= 0 or startup_timeout <= 0:
            raise ValueError("MCPToolProvider: call_timeout and startup_timeout must be positive.")
        if tools is not None and not tools:
            raise ValueError("MCPToolProvider.tools is empty: leave it out to expose every tool of the server.")
        self.command = command
        self.args = list(args)
        self.env = dict(env) if env is not None else None
        self.url = url
        self.call_timeout = float(call_timeout)
        self.startup_timeout = float(startup_timeout)
        self.restart_on_failure = restart_on_failure
        self.tools = list(tools) if tools is not None else None
        self.label = f"'{url}'" if url is not None else f"`{shlex.join([command or '', *self.args])}`"
        #: How many times the server was restarted (relaunched or reconnected).
        self.restarts = 0
        self._connection: Optional[_Connection] = None
        self._specs: dict[str, ToolSpec] = {}
        self._lock: Optional[asyncio.Lock] = None  # created on first use, inside the event loop
        self._broken: Optional[str] = None  # set once the server is gone for good
        self._closed = False
        self._restarts_without_success = 0

    # -- lifecycle ----------------------------------------------------------------------------------

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def start(self) -> None:
        """Launch or connect to the server, initialize the session and list its tools (idempotent).

        After `close()` this starts afresh (possibly on another event loop), forgetting past failures.
        """
        if self._closed:
            self._closed = False
            self._broken = None
            self._lock = None  # an asyncio.Lock may be bound to the previous event loop
            self._restarts_without_success = 0
        await self._connected()

    async def close(self) -> None:
        """Stop the server (stdio) or end the session (HTTP); calls afterwards raise `MCPServerError`."""
        self._closed = True
        async with self._get_lock():
            connection, self._connection = self._connection, None
            if connection is not None:
                await connection.close()

    async def _connected(self) -> _Connection:
        """The live connection, starting the server on first use."""
        connection = self._connection
        if connection is not None and not self._closed and self._broken is None:
            return connection
        async with self._get_lock():
            self._check_usable()
            if self._connection is None:
                self._connection = await self._open()
            return self._connection

    def _check_usable(self) -> None:
        if self._closed:
            raise MCPServerError(f"MCPToolProvider for {self.label} is closed.")
        if self._broken is not None:
            raise MCPServerError(self._broken)

    async def _open(self) -> _Connection:
        """A new, initialized connection whose tool list matches `tools` (caller holds the lock)."""
        connection = _Connection(self)
        await connection.open(self.startup_timeout)
        specs = {}
        for mcp_tool in connection.tools:
            schema = _field(mcp_tool, "inputSchema", "input_schema") or {"type": "object", "properties": {}}
            specs[mcp_tool.name] = ToolSpec(name=mcp_tool.name, description=mcp_tool.description or "", parameters=dict(schema))
        if self.tools is not None:
            missing = [name for name in self.tools if name not in specs]
            if missing:
                await connection.close()
                raise ValueError(
                    f"MCPToolProvider.tools names {', '.join(missing)}, which the MCP server {self.label} does not "
                    f"serve; it serves: {', '.join(specs) or '(nothing)'}."
                )
            specs = {name: specs[name] for name in self.tools}
        self._specs = specs
        return connection

    async def _restart(self, failed: _Connection, cause: str) -> _Connection:
        """Replace `failed` by a new connection, once however many calls saw it fail."""
        async with self._get_lock():
            self._check_usable()
            if self._connection is not failed and self._connection is not None:
                return self._connection  # another call restarted it already
            tail = failed.stderr_tail()
            await failed.close()
            self._connection = None
            if self._restarts_without_success >= MAX_RESTARTS_WITHOUT_SUCCESS:
                self._broken = (
                    f"MCP server {self.label} failed again ({cause}) after {self._restarts_without_success} restarts "
                    f"without a successful tool call in between; giving up." + tail
                )
                raise MCPServerError(self._broken)
            log.warning("MCP server %s failed (%s); restarting it.%s", self.label, cause, tail)
            self.restarts += 1
            self._restarts_without_success += 1
            try:
                self._connection = await self._open()
            except Exception as err:
                self._broken = f"MCP server {self.label} failed ({cause}), and restarting it failed too. {err}"
                if tail:
                    self._broken += f"\nBefore the restart:{tail}"
                raise MCPServerError(self._broken) from None
            return self._connection

    # -- tools --------------------------------------------------------------------------------------

    async def list_tools(self) -> list[ToolSpec]:
        await self._connected()
        return list(self._specs.values())

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        connection = await self._connected()
        if name not in self._specs:
            raise ToolError(f"unknown tool '{name}'; available: {', '.join(self._specs)}")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ToolError(f"bad arguments for '{name}': expected a JSON object, got {type(arguments).__name__}")
        try:
            return await self._attempt(connection, name, arguments)
        except _ServerDied as died:
            cause = str(died)
            if self._closed:
                raise MCPServerError(f"MCPToolProvider for {self.label} was closed during a call to '{name}'.") from None
            if not self.restart_on_failure:
                async with self._get_lock():
                    if self._broken is None:
                        self._broken = f"MCP server {self.label} failed ({cause}) during a call to '{name}'."
                        self._broken += connection.stderr_tail()
                raise MCPServerError(self._broken) from None
        connection = await self._restart(connection, cause)
        try:
            return await self._attempt(connection, name, arguments)
        except _ServerDied as died:
            if self._closed:
                raise MCPServerError(f"MCPToolProvider for {self.label} was closed during a call to '{name}'.") from None
            raise ToolError(
                f"tool '{name}' broke the MCP server ({died}) again after a restart; it will be restarted for the next call."
                + connection.stderr_tail()
            ) from None

    async def _attempt(self, connection: _Connection, name: str, arguments: dict[str, Any]) -> str:
        """One call on one connection: its text, a `ToolError`, or `_ServerDied`."""
        owner = connection.task
        if not connection.alive or owner is None:
            raise _ServerDied(_describe(connection.error) if connection.error else "connection closed")
        request = asyncio.ensure_future(connection.session.call_tool(name, arguments))
        try:
            # Wait for the answer, the connection's end (a dead server may never answer) or the timeout.
            done, _ = await asyncio.wait({request, owner}, timeout=self.call_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not request.done():
                request.cancel()
                await asyncio.wait({request}, timeout=5.0)
            if request.done() and not request.cancelled():
                request.exception()  # mark retrieved
        if request in done:
            try:
                result = request.result()
            except Exception as err:
                if _is_connection_closed(err):
                    raise _ServerDied("connection closed") from None
                self._restarts_without_success = 0  # the server answered, if with an error
                raise ToolError(f"tool '{name}' failed: {_describe(err)}") from None
            self._restarts_without_success = 0
            connection.trim_stderr()
            text = _result_text(result)
            if _field(result, "isError", "is_error", False):
                raise ToolError(text or f"tool '{name}' reported an error")
            return text
        if owner in done:
            raise _ServerDied(_describe(connection.error) if connection.error else "connection closed")
        raise ToolError(f"tool '{name}' timed out after {self.call_timeout:g} s")
