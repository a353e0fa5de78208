"""OpenAI's request and response formats, as the policy endpoint reads and writes them.

Pure functions over JSON-like dicts (no server, no torch): reading a chat or text completion
request into what the policy needs (chat-template messages, tools, a token budget, how many choices),
deciding which sampling options an agent may not change, and writing responses and errors in the
shapes the `openai` SDK parses. `retrain.environment.endpoint` serves them.

Sampling options that would change the distribution the tokens are drawn from (`temperature`,
`top_p`, penalties, `logit_bias`, ...) are not the agent's to choose: the trainer's log-probs
describe the trainer's sampler. They are overridden (the response lists each under `retrain.overridden`)
or, with `on_sampling_mismatch="refuse"`, refused with a 400.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from retrain.core.episode import ToolCall
from retrain.core.records import Message
from retrain.environment.tool_parsing import CLOSE, OPEN

MismatchPolicy = Literal["override", "refuse"]
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_CHOICES = 16
# Options whose non-neutral values change what is sampled; their neutral value.
_DISTRIBUTION_OPTIONS = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "repetition_penalty": 1, "min_p": 0}
# Accepted and without effect on the tokens (noted in the response when set).
_IGNORED_OPTIONS = ("seed", "response_format", "parallel_tool_calls", "user", "metadata", "store", "service_tier", "top_logprobs")


class RequestError(ValueError):
    """A request the endpoint cannot serve: an OpenAI-style 4xx error."""

    def __init__(self, message: str, *, param: Optional[str] = None, status: int = 400, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(self.status, "invalid_request_error")
        return error_body(str(self), kind, param=self.param, code=self.code)


def error_body(message: str, kind: str, *, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Sampling:
    """What one request asks of the sampler, after the trainer's rules were applied."""

    max_tokens: Optional[int]
    n: int = 1
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    return_token_ids: bool = False
    stream: bool = False
    overridden: dict[str, dict[str, Any]] = field(default_factory=dict)
    """option -> {"requested": ..., "used": ...} for each option the trainer's value replaced."""
    ignored: list[str] = field(default_factory=list)


@dataclass
class ChatRequest:
    messages: list[Message]
    """The conversation in the form chat templates read (tool-call arguments as objects)."""
    tools: Optional[list[dict[str, Any]]]
    sampling: Sampling
    model: str


@dataclass
class CompletionRequest:
    prompt: Union[str, list[int]]
    """Text, or token ids (rendered by the agent: used as they are)."""
    sampling: Sampling
    model: str


def read_sampling(body: dict[str, Any], trainer: dict[str, float], policy: MismatchPolicy) -> Sampling:
    """The request's sampling options, checked against the trainer's (`trainer`: temperature, top_p, top_k)."""
    n = _integer(body, "n", 1, low=1, high=MAX_CHOICES)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _integer(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", None, low=1)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)) or len(stops) > 4:
        raise RequestError("'stop' must be a non-empty string or a list of at most 4 of them.", param="stop")
    wanted = body.get("logprobs")  # chat: true/false; completions: how many alternatives (0 = just the token's)
    logprobs = wanted is True or (isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 0)
    sampling = Sampling(
        max_tokens=max_tokens, n=n, stop=stops, logprobs=logprobs,
        return_token_ids=bool(body.get("return_token_ids")), stream=bool(body.get("stream")),
    )
    requested = {name: body[name] for name in ("temperature", "top_p", "top_k") if body.get(name) is not None}
    requested.update({name: body[name] for name, neutral in _DISTRIBUTION_OPTIONS.items() if body.get(name) not in (None, neutral, {})})
    for name, value in requested.items():
        used = trainer.get(name, _DISTRIBUTION_OPTIONS.get(name))
        if name in ("temperature", "top_p", "top_k") and _same(value, used):
            continue
        if policy == "refuse":
            raise RequestError(
                f"'{name}'={value!r}: this endpoint samples with the trainer's settings ({name}={used!r}), because the "
                "loss's log-probs describe that distribution. Leave the option out (or set the trainer's value).",
                param=name, code="sampling_option_refused",
            )
        sampling.overridden[name] = {"requested": value, "used": used}
    sampling.ignored = [name for name in _IGNORED_OPTIONS if body.get(name) not in (None, False, 0)]
    return sampling


def _same(requested: Any, used: Any) -> bool:
    try:
        return abs(float(requested) - float(used)) < 1e-9
    except (TypeError, ValueError):
        return False


def _integer(body: dict[str, Any], name: str, default: Optional[int], *, low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise RequestError(f"'{name}' must be an integer {bound}, got {value!r}.", param=name)
    return value


def read_chat_request(body: Any, trainer: dict[str, float], policy: MismatchPolicy) -> ChatRequest:
    """A `POST /v1/chat/completions` body, validated (raises `RequestError` naming the field)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of messages.", param="messages")
    messages = [template_message(message, i) for i, message in enumerate(raw)]
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools):
            raise RequestError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects.", param="tools")
        tools = tools or None
    sampling = read_sampling(body, trainer, policy)
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        # Forcing a call would need constrained decoding: another distribution than the trainer's.
        sampling.overridden["tool_choice"] = {"requested": choice, "used": "auto"}
    if choice == "none":
        tools = None
    return ChatRequest(messages=messages, tools=tools, sampling=sampling, model=str(body.get("model", "")))


def read_completion_request(body: Any, trainer: dict[str, float], policy: MismatchPolicy) -> CompletionRequest:
    """A `POST /v1/completions` body: one prompt, as text or as token ids."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object.")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    valid_ids = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not valid_ids:
        raise RequestError("'prompt' must be non-empty text or a list of token ids (one prompt per request).", param="prompt")
    if body.get("echo") or body.get("suffix") or (body.get("best_of") not in (None, 1)):
        raise RequestError("'echo', 'suffix' and 'best_of' are not supported.", param="echo")
    return CompletionRequest(prompt=prompt, sampling=read_sampling(body, trainer, policy), model=str(body.get("model", "")))


def template_message(message: Any, index: int = 0) -> Message:
    """One OpenAI message as chat templates read it: text content, tool calls with object arguments."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"{where} must be an object with a 'role' in {', '.join(ROLES)}.", param=where)
    role = "system" if message["role"] == "developer" else message["role"]
    out: Message = {"role": role, "content": _text(message.get("content"), where)}
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = [_template_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(message["tool_calls"])]
    for key in ("tool_call_id", "name"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    return out


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""  # an assistant turn that only calls tools
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text") and isinstance(part.get("text"), str)):
                raise RequestError(f"{where}.content: only text parts are supported (got {str(part)[:80]}).", param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}.content must be text or a list of text parts.", param=where)


def _template_call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}.", param=where)
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            arguments = {"_raw": arguments}  # what the model wrote, kept so the history stays comparable
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def message_key(message: Message) -> tuple:
    """What identifies a message when an agent sends its history back: role, text and tool calls
    (names and arguments, not the call ids nor any extra fields the SDK adds)."""
    calls = tuple(
        (c["function"]["name"], json.dumps(c["function"]["arguments"], sort_keys=True)) for c in message.get("tool_calls", ())
    )
    return (message["role"], message.get("content") or "", calls, message.get("tool_call_id") if message["role"] == "tool" else None)


def strip_tool_calls(text: str) -> str:
    """The text outside the `<tool_call>` blocks (the content of an assistant message that calls tools)."""
    while OPEN in text and CLOSE in text.split(OPEN, 1)[1]:
        head, rest = text.split(OPEN, 1)
        text = head + rest.split(CLOSE, 1)[1]
    return text.strip()


def assistant_message(text: str, calls: list[ToolCall]) -> dict[str, Any]:
    """The OpenAI assistant message for a generation (tool calls get fresh ids)."""
    if not calls:
        return {"role": "assistant", "content": text}
    return {
        "role": "assistant",
        "content": strip_tool_calls(text) or None,
        "tool_calls": [
            {"id": f"call_{secrets.token_hex(8)}", "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in calls
        ],
    }


def response(chat: bool, model: str, choices: list[dict[str, Any]], usage: dict[str, int], notes: dict[str, Any]) -> dict[str, Any]:
    """A `chat.completion` (or, with `chat=False`, a `text_completion`) body; `notes` go under `retrain`."""
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": model, "choices": choices, "usage": usage,
    }
    if notes:
        body["retrain"] = notes
    return body


def stream_chunks(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat completion as the `chat.completion.chunk` events of a stream: the role, the content and
    tool calls of each choice, then its finish reason (the whole generation is sampled first: the
    batch it belongs to finishes together)."""
    base = {"id": response["id"], "object": "chat.completion.chunk", "created": response["created"], "model": response["model"]}
    chunks = []
    for choice in response["choices"]:
        message, index = choice["message"], choice["index"]
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(message["tool_calls"])]
        first = {"index": index, "delta": delta, "finish_reason": None}
        if choice.get("logprobs") is not None:
            first["logprobs"] = choice["logprobs"]
        chunks.append({**base, "choices": [first]})
        chunks.append({**base, "choices": [{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    chunks.append({**base, "choices": [], "usage": response["usage"]})
    return chunks
