"""The model's context length, and prompts that do not fit in it.

A model reads at most its context length of tokens (`max_position_embeddings`, or `n_positions` for
GPT-2-style models; the tokenizer's `model_max_length` when that is smaller). Past it, a model with
learned positions crashes mid-training (an index error inside its embedding) and a RoPE model
silently runs outside what it was trained on. retrain's rule:

* Before training, every prompt of a finite training or validation split is rendered as the default
  environment renders it and must leave room for `max_completion_length` tokens; the first that does
  not stops the run before any rollout, naming the split, the record and the numbers.
* During rollouts (endless sources, environments that build their own prompts, multi-turn episodes
  whose context grows) a generation is cut where the context ends: the episode ends as truncated
  (counted in `train/frac_truncated`). A context with no room left at all is an error.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

from retrain.core.errors import ConfigError, ContextOverflowError  # noqa: F401  (ContextOverflowError: re-exported)
from retrain.core.records import PromptRecord

_UNBOUNDED = 10**8  # tokenizers without a limit report a huge model_max_length


def context_length(model: Any, tokenizer: Any = None) -> Optional[int]:
    """The most tokens `model` reads (None when neither it nor the tokenizer says)."""
    config = getattr(model, "config", None)
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    known = [int(v) for v in limits if isinstance(v, int) and 0 < v < _UNBOUNDED]
    return min(known) if known else None


def check_prompts_fit(
    records: Iterable[tuple[int, PromptRecord]],
    encode: Callable[[Any], list[int]],
    limit: int,
    max_completion_length: int,
    where: str,
) -> None:
    """Raise `ContextOverflowError` for the first record whose prompt leaves no room for the completion."""
    if max_completion_length >= limit:
        raise ContextOverflowError(
            f"model.init_args.max_completion_length={max_completion_length}: the model reads at most {limit} tokens "
            "(its context length), prompt included; lower max_completion_length."
        )
    room = limit - max_completion_length
    for index, record in records:
        length = len(encode(record.prompt))
        if length > room:
            raise ContextOverflowError(
                f"{where}, record {index}: the prompt is {length} tokens; with max_completion_length="
                f"{max_completion_length} that is {length + max_completion_length} tokens, and the model reads at most "
                f"{limit}. Prompt: {_head(record.prompt)}. Shorten or drop the record, lower max_completion_length, "
                "or use a model with a longer context."
            )


def check_datamodule_prompts(
    datamodule: Any, splits: Sequence[str], encode: Callable[[Any], list[int]], limit: int, max_completion_length: int
) -> None:
    """`check_prompts_fit` over this rank's records of each finite split of a `PromptDataModule`
    (an endless split is checked as its prompts arrive, by the sampler)."""
    sources = getattr(datamodule, "sources", {})
    for split in splits:
        if split not in sources:
            continue
        shard = datamodule.shard(split)
        if not hasattr(shard, "__len__"):
            continue
        records = ((shard.indices[i], shard[i]) for i in range(len(shard)))  # numbered as in the source
        check_prompts_fit(records, encode, limit, max_completion_length, f"{sources[split].where} ({split} split)")


def no_room_message(context_tokens: int, limit: int, text: str) -> str:
    return (
        f"a rollout's context is {context_tokens} tokens, and the model reads at most {limit}: there is no room to "
        f"generate. Context starts: {text!r}. Shorten the prompts (or what the environment adds each turn), or "
        "lower max_completion_length so that episodes end within the context."
    )


def _head(prompt: Any, size: int = 80) -> str:
    text = prompt if isinstance(prompt, str) else " | ".join(str(m.get("content", "")) for m in prompt)
    return repr(text[:size] + ("..." if len(text) > size else ""))
