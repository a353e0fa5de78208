"""The unit of prompt data: one `PromptRecord` per task instance.

Kept free of torch so environments and reward functions can import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Union

Message = dict[str, Any]
Prompt = Union[str, list[Message]]


@dataclass
class PromptRecord:
    """One prompt and what is known about it.

    Attributes:
        prompt: plain text, or chat messages (``[{"role": "user", "content": "..."}]``) that the
            tokenizer's chat template renders.
        answer: the reference answer, when the task has one (used by `exact_match` and friends).
        metadata: any other fields of the source record; reward functions receive them as keyword
            arguments.
    """

    prompt: Prompt
    answer: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)

    def reward_kwargs(self) -> dict[str, Any]:
        """The record's fields as reward-function keyword arguments (metadata never shadows these)."""
        return {**self.metadata, "prompt": self.prompt, "answer": self.answer}


def record_from_mapping(
    raw: Any, *, prompt_field: str = "prompt", answer_field: str = "answer", where: str = "record"
) -> PromptRecord:
    """Build a `PromptRecord` from a plain string or a mapping, or raise a `ValueError` naming `where`.

    A string is a prompt with no answer. In a mapping, `prompt_field` (text or a list of chat
    messages) is required; `answer_field` is optional; every other key becomes metadata.
    """
    if isinstance(raw, str):
        if not raw:
            raise ValueError(f"{where}: the prompt is an empty string.")
        return PromptRecord(prompt=raw)
    if not isinstance(raw, dict):
        raise ValueError(
            f"{where}: expected a string or an object with a '{prompt_field}' field, got {type(raw).__name__}."
        )
    if prompt_field not in raw:
        keys = ", ".join(sorted(map(str, raw))) or "none"
        raise ValueError(
            f"{where}: missing the prompt field '{prompt_field}' (fields present: {keys}). "
            f"Add it, or set prompt_field to the field that holds the prompt."
        )
    prompt = raw[prompt_field]
    if isinstance(prompt, list):
        for i, message in enumerate(prompt):
            if not (isinstance(message, dict) and "role" in message and "content" in message):
                raise ValueError(
                    f"{where}: field '{prompt_field}' message {i} must be an object with 'role' and 'content'."
                )
    elif not isinstance(prompt, str) or not prompt:
        raise ValueError(
            f"{where}: field '{prompt_field}' must be non-empty text or a list of chat messages, got {prompt!r}."
        )
    metadata = {k: v for k, v in raw.items() if k not in (prompt_field, answer_field)}
    return PromptRecord(prompt=prompt, answer=raw.get(answer_field), metadata=metadata)


def with_system_prompt(record: PromptRecord, system_prompt: str) -> PromptRecord:
    """`record` as chat messages that start with `system_prompt`, so the chat template applies.

    A text prompt becomes ``[system, user]``; chat messages get the system message first, unless they
    already start with a system message of their own, which is kept as the more specific one.

    >>> with_system_prompt(PromptRecord(prompt="2+2?"), "Be brief.").prompt
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2?'}]
    """
    messages = list(record.prompt) if record.is_chat else [{"role": "user", "content": record.prompt}]
    if not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return replace(record, prompt=messages)
