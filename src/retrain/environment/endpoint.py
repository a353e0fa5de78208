"""`PolicyEndpoint`: the policy under training, served as an OpenAI-compatible HTTP API during rollouts.

Agents written against the `openai` SDK (or a framework on top of it) run unchanged against
`base_url`; every request is served by the trainer's batching sampler (`PolicyClient.generate`), so
the concurrent calls of many episodes become one batched generation, and every call's exact tokens
are recorded for the loss (`agent_tokens.EpisodeTokens`).

Routes, under `/e/<episode>/v1` (a random token per episode: that is how a call is attributed to its
episode, never by the text): `POST chat/completions` (messages, `tools`, `tool_choice`, `n`,
`max_tokens`/`max_completion_tokens`, `stop`, `logprobs`, `stream`; tool calls are parsed from the
policy's text with the same Hermes parser `ToolEnvironment` uses and returned as OpenAI `tool_calls`),
`POST completions` (text or token-id prompts) and `GET models`. With `"return_token_ids": true` a
response also carries `prompt_token_ids` and each choice's `token_ids` (vLLM's field names).

Security: the server binds 127.0.0.1 on a free port and every request needs the run's random key
(`Authorization: Bearer ...`); bodies over `max_request_bytes` get a 413, a body that does not
arrive within `read_timeout` a 408, anything malformed an OpenAI-style 4xx; an episode that ended
answers 404. A request can fail only itself: a failure of the policy itself (the sampler raising)
is answered with a 503 and kept, and the episode re-raises it when the agent returns, which stops
training as any sampler failure does.

The server runs on the rollout engine's event loop (uvicorn's `Server.startup`, without its signal
handlers), so it answers while rollouts run and is idle between them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from retrain.core.episode import Generation, LLMAction, PolicyClient
from retrain.core.errors import ContextOverflowError
from retrain.environment import openai_api as api
from retrain.environment.agent_tokens import EpisodeTokens, ModelCall
from retrain.environment.tool_parsing import parse_tool_calls

_MiB = 1 << 20


@dataclass
class EpisodeSession:
    """One episode's view of the endpoint: where its agent sends requests, and what they produced."""

    token: str
    base_url: str
    api_key: str
    tokens: EpisodeTokens
    policy: PolicyClient
    max_calls: int
    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("calls", "tool_calls", "parse_errors", "overridden_options", "refused_requests"), 0.0))
    failure: Optional[BaseException] = None
    """The policy's own failure while serving this episode (re-raised when the agent returns)."""
    loop: Optional[asyncio.AbstractEventLoop] = None
    _on_the_way: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # Requests an agent has sent but the server has not yet handed to the sampler: the sampler does
    # not serve a partial batch while any is on its way (`BatchingSampler.incoming`), which is what
    # makes N concurrent agent calls one generation instead of a race against the network stack.
    def sent(self, call_id: str) -> None:
        with self._lock:
            self._on_the_way.add(call_id)
        self._shift_incoming(1)

    def arrived(self, call_id: Optional[str]) -> None:
        with self._lock:
            if call_id not in self._on_the_way:
                return
            self._on_the_way.discard(call_id)
        self._shift_incoming(-1)

    def _shift_incoming(self, delta: int) -> None:
        if not hasattr(self.policy, "incoming"):
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self.loop is not None and running is not self.loop:  # a synchronous agent's worker thread
            self.loop.call_soon_threadsafe(self._add_incoming, delta)
        else:
            self._add_incoming(delta)

    def _add_incoming(self, delta: int) -> None:
        self.policy.incoming += delta  # type: ignore[attr-defined]

    def settle(self) -> None:
        """Forget requests that will never arrive (the episode is over)."""
        with self._lock:
            lost, self._on_the_way = len(self._on_the_way), set()
        if lost:
            self._shift_incoming(-lost)


class PolicyEndpoint:
    """An OpenAI-compatible server over the policy; see the module docstring.

    Args:
        model_name: the id `GET /v1/models` lists (requests may name any model: the policy serves all).
        on_sampling_mismatch: what to do with a request whose sampling options differ from the
            trainer's: "override" (serve it with the trainer's, and say so in `retrain.overridden`)
            or "refuse" (a 400 naming the option).
        max_request_bytes: the largest request body accepted.
        read_timeout: seconds a request body may take to arrive.
    """

    def __init__(
        self,
        model_name: str = "policy",
        on_sampling_mismatch: api.MismatchPolicy = "override",
        max_request_bytes: int = 4 * _MiB,
        read_timeout: float = 30.0,
    ) -> None:
        if on_sampling_mismatch not in ("override", "refuse"):
            raise ValueError(f"on_sampling_mismatch={on_sampling_mismatch!r}: use 'override' or 'refuse'.")
        self.model_name = model_name
        self.on_sampling_mismatch = on_sampling_mismatch
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.api_key = f"retrain-{secrets.token_urlsafe(24)}"
        self.sessions: dict[str, EpisodeSession] = {}
        self.port: Optional[int] = None
        self._server: Any = None
        self._socket: Optional[socket.socket] = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/e/{episode}/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/e/{episode}/v1/completions", self._completions, methods=["POST"]),
            Route("/e/{episode}/v1/models", self._models, methods=["GET"]),
        ]
        app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))  # loopback only, a free port
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app, lifespan="off", log_level="warning", access_log=False, timeout_keep_alive=30,
            h11_max_incomplete_event_size=64 * 1024,
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)  # what Server.serve sets; serve would also take over Ctrl-C
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        await self._server.startup(sockets=[self._socket])

    async def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._server.shutdown(sockets=[self._socket] if self._socket else None)
            self._server = self._socket = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the endpoint is not started (await endpoint.start())")
        return f"http://127.0.0.1:{self.port}"

    def open_episode(self, policy: PolicyClient, budget: Optional[int], max_calls: int = 64) -> EpisodeSession:
        token = secrets.token_urlsafe(12)
        session = EpisodeSession(
            token=token, base_url=f"{self.url}/e/{token}/v1", api_key=self.api_key,
            tokens=EpisodeTokens(policy, budget), policy=policy, max_calls=max_calls, loop=asyncio.get_running_loop(),
        )
        self.sessions[token] = session
        return session

    def close_episode(self, session: EpisodeSession) -> None:
        self.sessions.pop(session.token, None)
        session.settle()

    # ------------------------------------------------------------------ HTTP
    async def _chat(self, request: Any) -> Any:
        return await self._serve(request, chat=True)

    async def _completions(self, request: Any) -> Any:
        return await self._serve(request, chat=False)

    async def _models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            self._session(request)
        except api.RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "retrain"}]})

    async def _serve(self, request: Any, chat: bool) -> Any:
        from starlette.responses import JSONResponse

        call_id = request.headers.get("x-retrain-call")
        session: Optional[EpisodeSession] = None
        try:
            session = self._session(request)
            body = await self._read_json(request)
            trainer = getattr(session.policy, "sampling_options", {})
            parsed = (api.read_chat_request if chat else api.read_completion_request)(body, trainer, self.on_sampling_mismatch)
            if session.counts["calls"] + parsed.sampling.n > session.max_calls:
                raise api.RequestError(
                    f"this episode has made {int(session.counts['calls'])} model calls, the most it may make is "
                    f"{session.max_calls} (AgentEnvironment.max_calls).", status=429, code="episode_call_limit",
                )
        except api.RequestError as err:
            if session is not None:
                session.arrived(call_id)
                session.counts["refused_requests"] += 1
            return JSONResponse(err.body(), status_code=err.status)
        try:
            response = await self._generate(session, parsed, chat, call_id)
        except api.RequestError as err:
            session.counts["refused_requests"] += 1
            return JSONResponse(err.body(), status_code=err.status)
        except _PolicyFailure as failure:
            return JSONResponse(api.error_body(str(failure), "server_error", code="policy_failure"), status_code=503)
        if parsed.sampling.stream and chat:
            return _event_stream(api.stream_chunks(response))
        return JSONResponse(response)

    def _session(self, request: Any) -> EpisodeSession:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise api.RequestError("missing or wrong API key (Authorization: Bearer <key>).", status=401, code="invalid_api_key")
        session = self.sessions.get(request.path_params["episode"])
        if session is None:
            raise api.RequestError("no such episode: it has ended, or the URL is wrong.", status=404, code="episode_not_found")
        return session

    async def _read_json(self, request: Any) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise _too_large(self.max_request_bytes)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.read_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_request_bytes:
                        raise _too_large(self.max_request_bytes)
                    chunks.append(chunk)
        except TimeoutError:
            raise api.RequestError(f"the request body did not arrive within {self.read_timeout:g} s.", status=408) from None
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise api.RequestError(f"the request body is not valid JSON: {err}") from None

    async def _not_found(self, request: Any, exc: Exception) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse(api.error_body(f"no route {request.url.path}", "not_found_error"), status_code=404)

    async def _not_allowed(self, request: Any, exc: Exception) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse(api.error_body(f"{request.method} is not allowed on {request.url.path}", "invalid_request_error"), status_code=405)

    # ------------------------------------------------------------------ generation
    async def _generate(self, session: EpisodeSession, parsed: Any, chat: bool, call_id: Optional[str]) -> dict[str, Any]:
        tokens, sampling = session.tokens, parsed.sampling
        try:
            context = tokens.chat_context(parsed.messages, parsed.tools) if chat else tokens.text_context(parsed.prompt)
            room = tokens.room(context)
            budget = room if sampling.max_tokens is None else sampling.max_tokens if room is None else min(room, sampling.max_tokens)
            spent = room is not None and room <= 0
            if spent:  # the sample's token budget is used up: nothing is generated or recorded
                tokens.exhaust(context)
                generations = [Generation(token_ids=[], text="", truncated=True) for _ in range(sampling.n)]
            else:
                generations = await asyncio.gather(*(session.policy.generate(context, budget) for _ in range(sampling.n)))
        except ContextOverflowError as err:  # the agent's context outgrew the model: its request fails, as OpenAI's would
            raise api.RequestError(str(err), param="messages", code="context_length_exceeded") from None
        except Exception as err:  # the sampler itself failed: the episode re-raises it when the agent returns
            session.failure = session.failure or err
            raise _PolicyFailure(f"the policy could not generate ({type(err).__name__}: {err}); training stops.") from err
        finally:
            session.arrived(call_id)
        session.counts["overridden_options"] += len(sampling.overridden)
        choices = [self._choice(session, i, context, g, parsed, chat, record=not spent) for i, g in enumerate(generations)]
        usage = {
            "prompt_tokens": len(context), "completion_tokens": sum(len(g.token_ids) for g in generations),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        notes: dict[str, Any] = {}
        if sampling.overridden:
            notes["overridden"] = sampling.overridden
        if sampling.ignored:
            notes["ignored"] = sampling.ignored
        response = api.response(chat, parsed.model or self.model_name, choices, usage, notes)
        if sampling.return_token_ids:
            response["prompt_token_ids"] = list(context)
        return response

    def _choice(
        self, session: EpisodeSession, index: int, context: list[int], generation: Generation, parsed: Any, chat: bool, record: bool,
    ) -> dict[str, Any]:
        sampling = parsed.sampling
        token_ids, logprobs, text, truncated = _cut_at_stop(session.policy, generation, sampling.stop)
        calls, error = parse_tool_calls(text) if chat else ([], None)
        if error is not None:
            session.counts["parse_errors"] += 1
            calls = []
        action = LLMAction(text=text, tool_calls=calls, parse_error=error, token_ids=token_ids, truncated=truncated)
        session.counts["calls"] += record
        session.counts["tool_calls"] += len(calls)
        finish = "length" if truncated else "tool_calls" if calls else "stop"
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        if chat:
            message = api.assistant_message(text, calls)
            history = [*parsed.messages, api.template_message(message)]
            if record:
                session.tokens.record(ModelCall(context, action, logprobs, history=history, tools=parsed.tools, policy_version=generation.policy_version))
            choice["message"] = message
            if sampling.logprobs and len(logprobs) == len(token_ids):
                choice["logprobs"] = {"content": [_token_logprob(session.policy, t, lp) for t, lp in zip(token_ids, logprobs)], "refusal": None}
        else:
            prompt_text = parsed.prompt if isinstance(parsed.prompt, str) else None
            if record:
                session.tokens.record(ModelCall(
                    context, action, logprobs, text=None if prompt_text is None else prompt_text + text, policy_version=generation.policy_version,
                ))
            choice["text"] = text
            if sampling.logprobs and len(logprobs) == len(token_ids):
                entries = [_token_logprob(session.policy, t, lp) for t, lp in zip(token_ids, logprobs)]
                choice["logprobs"] = {
                    "tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": None, "text_offset": None,
                }
        if sampling.return_token_ids:
            choice["token_ids"] = list(token_ids)
        return choice


class _PolicyFailure(Exception):
    pass


def _too_large(limit: int) -> api.RequestError:
    return api.RequestError(f"the request body is larger than {limit} bytes (PolicyEndpoint.max_request_bytes).", status=413)


def _cut_at_stop(policy: PolicyClient, generation: Generation, stops: list[str]) -> tuple[list[int], list[float], str, bool]:
    """The generation up to the first stop string: the tokens through the one that completes it
    (what was sampled, and what the loss sees), the text before it (what OpenAI returns)."""
    tokens, logprobs, text = list(generation.token_ids), list(generation.logprobs), generation.text
    found = [(text.find(s), s) for s in stops if s in text]
    if not found:
        return tokens, logprobs, text, generation.truncated
    at, stop = min(found)
    decode = getattr(getattr(policy, "tokenizer", None), "decode", None)
    keep = len(tokens)
    if decode is not None:
        keep = next((k for k in range(1, len(tokens) + 1) if stop in decode(tokens[:k], skip_special_tokens=True)), len(tokens))
    return tokens[:keep], logprobs[:keep], text[:at], False


def _token_logprob(policy: PolicyClient, token_id: int, logprob: float) -> dict[str, Any]:
    tokenizer = getattr(policy, "tokenizer", None)
    token = tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)
    return {"token": token, "logprob": float(logprob), "bytes": list(token.encode()), "top_logprobs": []}


def _event_stream(chunks: list[dict[str, Any]]) -> Any:
    from starlette.responses import StreamingResponse

    async def events() -> Any:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
