"""`BatchingSampler`: serves every episode's pending generation request with one `generate` call.

Episodes run as asyncio tasks and `await sampler.generate(context)`. Requests are collected until
every episode still in flight is waiting (or until no new request arrives for a few event-loop
turns, e.g. while some episodes wait on a slow tool, and none is known to be on its way: an agent's
HTTP request, `incoming`), then one left-padded, KV-cached, no-grad
`generate` call serves them all. So G x B single-turn episodes cost one call, and T-turn episodes
cost T calls, never one per episode.

Under FSDP2 (a policy sharded by `retrain.rollout.sharding.shard_model`), each call follows the
policy's sharded-generation mode: inside the trainer's `generation_context` the parameters are
either gathered for the whole rollout phase (no collectives while decoding) or each call joins a
lockstep round and decodes with `synced_gpus`. Used on its own, the sampler wraps each call in that
context itself, which is correct when every rank makes the same number of calls.

Backends. `backend="auto"` decodes Llama-family policies (Llama, Qwen2, Qwen3, Mistral; with or
without LoRA adapters) with retrain's own KV-cached decoder (`retrain.rollout.decoding`: same
weights, same sampling rules, far less per-token overhead) and everything else -- other
architectures, DoRA, sharded policies -- with `transformers`' `generate`; `backend="retrain"`
insists on the decoder (refusing, with the reason, a policy it does not support) and
`backend="transformers"` always uses `generate`; `backend="vllm"` samples with a colocated vLLM
engine (`retrain.rollout.vllm_engine`, holding the policy's weights as the trainer pushed them last).
Every backend returns, with each token, the
sampler's log-prob of it under the distribution it was drawn from (after temperature, top-k, top-p).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import warnings
from typing import Any, Literal, Optional, Sequence, Union

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from retrain.core.records import Message
from retrain.core.episode import Generation
from retrain.core.errors import ConfigError
from retrain.rollout import decoding
from retrain.rollout.context import ContextOverflowError, context_length, no_room_message
from retrain.rollout.sharding import LockstepGeneration, generate_kwargs, generation_context, generation_state

_IDLE_TURNS = 4  # event-loop turns without a new request before a partial batch is served
Backend = Literal["auto", "retrain", "transformers", "vllm"]


def _neutral_generation_options() -> dict[str, Any]:
    """`transformers`' global defaults, plus off-values for the options whose default is unset."""
    defaults = getattr(GenerationConfig(), "_get_default_generation_params", dict)()
    # Lengths come from max/min_new_tokens; setting max_length/min_length too makes generate warn on every call.
    defaults = {key: value for key, value in defaults.items() if key not in ("max_length", "min_length")}
    return {**defaults, "min_p": 0.0, "suppress_tokens": [], "begin_suppress_tokens": []}


class BatchingSampler:
    """The trainer's `PolicyClient`: tokenization plus batched sampling from the policy.

    Args:
        model: the policy (already on its device).
        tokenizer: the policy's tokenizer (left padding is used for batching).
        max_new_tokens: default token budget per request.
        temperature, top_p, top_k: sampling settings (TRL's names and meanings; `top_k=0` is off).
        min_new_tokens: force at least this many tokens (benchmarks use it for equal work).
        backend: "auto" (retrain's decoder for Llama-family policies, else `generate`),
            "retrain", "transformers" (always `generate`) or "vllm" (needs `engine`); see the module
            docstring.
        engine: the `VLLMEngine` that samples when `backend="vllm"` (the caller keeps its weights current).
        policy_version: the version of `model`'s weights (the trainer's optimizer updates), stamped on
            every `Generation`; with an engine, the version the engine holds is stamped instead.
        draw: how retrain's decoder draws tokens: "inverse_cdf" (exact and cheap at any vocabulary
            size) or "generate" (token for token what `generate` draws for the same random state);
            see `retrain.rollout.decoding`. `generate` and vLLM use their own samplers.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_new_tokens: int = 0,
        backend: Backend = "auto",
        engine: Optional[Any] = None,
        policy_version: Optional[int] = None,
        draw: decoding.Draw = "inverse_cdf",
    ) -> None:
        if draw not in ("inverse_cdf", "generate"):
            raise ValueError(f"draw={draw!r}: use 'inverse_cdf' or 'generate'.")
        self.draw = draw
        if backend not in ("auto", "retrain", "transformers", "vllm"):
            raise ValueError(f"backend={backend!r}: use 'auto', 'retrain', 'transformers' or 'vllm'.")
        if (backend == "vllm") != (engine is not None):
            raise ValueError("backend='vllm' samples with a VLLMEngine: pass engine= with it (and only with it).")
        self.model = model
        self.backend = backend
        self.engine = engine
        self.policy_version = policy_version
        self._own_decoder: Optional[bool] = None  # decided on first use: the policy does not change class
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        # Every sampling option explicit: `generate` fills options left unset from the checkpoint's
        # generation_config.json (a hub model's repetition_penalty, min_p, suppress_tokens, ...),
        # which would sample from a distribution other than the one the loss's log-probs describe.
        self.generation_config = GenerationConfig(**{
            **_neutral_generation_options(),
            "do_sample": True,
            "use_cache": True,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_new_tokens": min_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        })
        self.context_limit = context_length(model, tokenizer)
        if engine is not None:  # the engine serves at most its max_model_len
            self.context_limit = min(filter(None, (self.context_limit, engine.max_model_len)))
        self._template_renders_tools: Optional[bool] = None
        self.active_episodes = 0
        self.incoming = 0  # requests known to be on their way (an agent's HTTP call not yet read): worth waiting for
        self.generate_calls = 0
        self._pending: list[tuple[list[int], int, asyncio.Future]] = []
        self._flush_task: Optional[asyncio.Task] = None

    def encode(
        self, content: Union[str, list[Message]], *, add_generation_prompt: bool = True, tools: Optional[list[dict[str, Any]]] = None
    ) -> list[int]:
        if isinstance(content, str):
            return self.tokenizer(content, add_special_tokens=add_generation_prompt)["input_ids"]
        if tools:
            self._check_template_renders_tools(tools)
        return self._tokens(self._render(content, add_generation_prompt, tools))

    def _check_template_renders_tools(self, tools: list[dict[str, Any]]) -> None:
        """Warn (once: the same message from the same line) when the chat template drops `tools=`."""
        if self._template_renders_tools is None:
            probe = [{"role": "user", "content": "?"}]
            self._template_renders_tools = self._render(probe, True, tools) != self._render(probe, True, None)
        if not self._template_renders_tools:
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            warnings.warn(
                f"The chat template of the policy's tokenizer ({name}) ignores `tools=`: the policy never sees the tool "
                "schemas. Set `tools_in_system_prompt: true` on the ToolEnvironment (the schemas and the <tool_call> "
                "format go into the system message), or give the tokenizer a chat template that renders tools.",
                UserWarning, stacklevel=2,
            )

    def encode_continuation(
        self, history: list[Message], new_messages: list[Message], *, tools: Optional[list[dict[str, Any]]] = None
    ) -> list[int]:
        full = self._render([*history, *new_messages], True, tools)
        prefix = self._render(history, False, tools)
        # Templates render a conversation append-only, so the new messages are the suffix. Where a
        # template rewrites earlier turns (rare), render the new messages on their own instead.
        delta = full[len(prefix) :] if full.startswith(prefix) else self._render(new_messages, True, None)
        return self._tokens(delta)

    def _render(self, messages: list[Message], add_generation_prompt: bool, tools: Optional[list[dict[str, Any]]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def generate(self, context_ids: Sequence[int], max_new_tokens: Optional[int] = None) -> Generation:
        budget = self.max_new_tokens if max_new_tokens is None else min(max_new_tokens, self.max_new_tokens)
        if self.context_limit is not None:  # generation ends where the context does (retrain.rollout.context)
            room = self.context_limit - len(context_ids)
            if room < 1:
                head = self.tokenizer.decode(list(context_ids[:60]), skip_special_tokens=True)
                raise ContextOverflowError(no_room_message(len(context_ids), self.context_limit, head))
            budget = min(budget, room)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((list(context_ids), max(budget, 1), future))
        if self._flush_task is None:
            self._flush_task = asyncio.ensure_future(self._flush_when_ready())
        return await future

    async def _flush_when_ready(self) -> None:
        idle = 0
        while len(self._pending) < self.active_episodes and (idle < _IDLE_TURNS or self.incoming > 0):
            seen = len(self._pending)
            # Waiting only for requests on their way: sleep a little instead of spinning, which would
            # hold the GIL against a synchronous agent's thread that is sending one.
            await asyncio.sleep(0 if idle < _IDLE_TURNS else 1e-4)
            idle = idle + 1 if len(self._pending) == seen else 0
        pending, self._pending, self._flush_task = self._pending, [], None
        for batch in self._within_context(pending):
            try:
                tokens, logprobs = self._sample_batch([context for context, _, _ in batch], max(b for _, b, _ in batch))
            except BaseException as err:  # hand the failure to every waiting episode
                for _, _, future in pending:
                    if not future.done():
                        future.set_exception(err)
                return
            for i, (_, budget, future) in enumerate(batch):
                future.set_result(self._to_generation(tokens[i][:budget], logprobs[i][:budget] if logprobs else []))

    def _within_context(self, pending: list[tuple[list[int], int, asyncio.Future]]) -> list[list[tuple[list[int], int, asyncio.Future]]]:
        """The requests as batches whose padded width plus their longest budget fits the context: one
        batch normally; near the context's end, one per context length (a short row's larger budget
        must not push the longest row past the last position)."""
        longest = max(len(context) for context, _, _ in pending)
        if self.context_limit is None or longest + max(b for _, b, _ in pending) <= self.context_limit:
            return [pending]
        by_length: dict[int, list[tuple[list[int], int, asyncio.Future]]] = {}
        for request in pending:
            by_length.setdefault(len(request[0]), []).append(request)
        return list(by_length.values())

    def _generate_batch(self, contexts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The sampled tokens of one batch (`_sample_batch` without the log-probs)."""
        return self._sample_batch(contexts, max_new_tokens)[0]

    @torch.no_grad()
    def _sample_batch(self, contexts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
        """One batched call of the backend: per context, the sampled tokens and the sampler's log-prob
        of each (under the warped distribution it drew from)."""
        self.generate_calls += 1
        if self.engine is not None:
            config = self.generation_config
            return self.engine.generate(
                contexts, max_new_tokens, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or 0,
                min_new_tokens=config.min_new_tokens or 0, eos_token_ids=self.eos_token_ids,
            )
        batch = self.tokenizer.pad({"input_ids": contexts}, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        was_training = self.model.training
        self.model.eval()
        config = copy.copy(self.generation_config)
        config.max_new_tokens = max_new_tokens
        config.min_new_tokens = min(config.min_new_tokens or 0, max_new_tokens)
        state = generation_state(self.model)
        if state is None and self.uses_own_decoder:
            try:
                tokens, logprobs = self._sample_own(input_ids, attention_mask, config)
                return tokens.tolist(), logprobs.tolist()
            finally:
                self.model.train(was_training)
        context = contextlib.nullcontext() if state is not None else generation_context(self.model)
        try:
            with context:
                state = generation_state(self.model)
                if isinstance(state, LockstepGeneration):
                    state.round(True)
                config.output_scores = config.return_dict_in_generate = True  # the scores give the sampler's log-probs
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **generate_kwargs(self.model)
                )
        finally:
            self.model.train(was_training)
        tokens = output.sequences[:, input_ids.size(1) :]  # [B, T]
        # `scores` are the processed (warped) logits each token was drawn from, one [B, V] per step
        # (generate keeps them all: T x [B, V] more memory on this backend; custom logits processors
        # run before generate's warpers, so they cannot see the drawn-from distribution instead).
        logprobs = torch.stack(
            [step.float().log_softmax(-1).gather(-1, tokens[:, t, None]).squeeze(-1) for t, step in enumerate(output.scores)], dim=1
        )  # [B, T]
        return tokens.tolist(), logprobs.tolist()

    @property
    def sampling_options(self) -> dict[str, float]:
        """The distribution every request is sampled from (what an agent may not change: `PolicyEndpoint`)."""
        config = self.generation_config
        return {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k or 0}

    @property
    def eos_token_ids(self) -> list[int]:
        """`generation_config.eos_token_id` as a list (it may be one id, a list, or unset)."""
        eos = self.generation_config.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    @property
    def uses_own_decoder(self) -> bool:
        """Whether calls outside a sharded rollout use `retrain.rollout.decoding` (see `backend`)."""
        if self._own_decoder is None:
            reason = None if self.backend in ("transformers", "vllm") else decoding.unsupported_reason(self.model)
            if self.backend == "retrain" and reason is not None:
                raise ConfigError(
                    f"generation_backend=retrain: retrain's decoder cannot sample this policy ({reason}); "
                    "use generation_backend: auto (falls back to transformers' generate) or transformers."
                )
            self._own_decoder = self.backend not in ("transformers", "vllm") and reason is None
        return self._own_decoder

    def describe_backend(self) -> str:
        """Which backend samples, and why (the unsupported reason when `auto` falls back), for the run's log."""
        if self.engine is not None:
            return self.engine.describe()
        if self.uses_own_decoder:
            return "retrain's KV-cached decoder"
        if self.backend == "transformers":
            return "transformers' generate (generation_backend: transformers)"
        return f"transformers' generate (retrain's decoder does not support this policy: {decoding.unsupported_reason(self.model)})"

    def _sample_own(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return decoding.sample(
            self.model, input_ids, attention_mask, max_new_tokens=config.max_new_tokens,
            eos_token_ids=self.eos_token_ids, pad_token_id=config.pad_token_id,
            temperature=config.temperature, top_k=config.top_k or 0, top_p=config.top_p, min_new_tokens=config.min_new_tokens or 0,
            with_logprobs=True, draw=self.draw,
        )

    def _to_generation(self, tokens: list[int], logprobs: list[float]) -> Generation:
        """Cut at the first end-of-sequence token (kept: the policy chose it) and decode."""
        eos_ids = set(self.eos_token_ids)
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), None)
        kept = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        version = self.engine.weights_version if self.engine is not None else self.policy_version
        return Generation(token_ids=kept, text=text, truncated=end is None, logprobs=list(logprobs[: len(kept)]), policy_version=version)
