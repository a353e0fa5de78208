"""The `PromptSource` contract, and the two sources written by hand: an in-config list and a JSONL file.

A source is an indexed collection of `PromptRecord`s, finite (`num_records` is a count) or endless
(`num_records` is None). `load()` reads and validates it; the data module calls it in
`prepare_data`, which Lightning runs before any model is prepared or loaded, so a malformed source
fails the run first, with the file, line or field in the message.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from retrain.core.errors import ConfigError
from retrain.core.records import PromptRecord, record_from_mapping


class DataSourceError(ConfigError):
    """A prompt source is missing, empty or malformed. The message names the file/line and the fix."""


class PromptSource(ABC):
    """Where prompt records come from (subclass it, and point `data.source.class_path` at the subclass).

    Subclasses implement `load`, `num_records` and `record`. `where` is the config key the source
    came from (e.g. ``data.val_source``); the data module sets it so error messages name it.
    """

    where: str = "data.source"

    @abstractmethod
    def load(self) -> None:
        """Read and validate the source; raise `DataSourceError` naming the problem. Idempotent."""

    @property
    @abstractmethod
    def num_records(self) -> Optional[int]:
        """How many records there are (after `load`), or None for an endless source."""

    @abstractmethod
    def record(self, index: int) -> PromptRecord:
        """The record at `index` (0-based; any index >= 0 for an endless source)."""


class _ReadOnceSource(PromptSource):
    """A source whose records are all read into memory on the first `load()` (by `_read`)."""

    _records: Optional[list[PromptRecord]] = None

    def _read(self) -> list[PromptRecord]:
        raise NotImplementedError

    def load(self) -> None:
        if self._records is None:
            self._records = self._read()

    @property
    def num_records(self) -> int:
        self.load()
        return len(self._records)

    def record(self, index: int) -> PromptRecord:
        self.load()
        return self._records[index]


class ListSource(_ReadOnceSource):
    """Prompt records written in the config.

    Args:
        prompts: strings, or objects with a prompt field (text or chat messages), an optional
            answer field and any metadata.
        prompt_field: the field holding the prompt.
        answer_field: the field holding the reference answer.
    """

    where = "data.prompts"

    def __init__(
        self, prompts: list[Union[str, dict[str, Any]]], prompt_field: str = "prompt", answer_field: str = "answer"
    ) -> None:
        self.prompts = prompts
        self.prompt_field = prompt_field
        self.answer_field = answer_field

    def _read(self) -> list[PromptRecord]:
        fields = {"prompt_field": self.prompt_field, "answer_field": self.answer_field}
        return records_from_list(self.prompts, **fields, where=self.where)



class JSONLSource(_ReadOnceSource):
    """A JSON Lines file: one JSON object (or string) per line; blank lines are skipped.

    Args:
        path: the file; relative paths are resolved from the directory you run retrain in.
        prompt_field: the field holding the prompt.
        answer_field: the field holding the reference answer.
    """

    where = "data.path"

    def __init__(self, path: str, prompt_field: str = "prompt", answer_field: str = "answer") -> None:
        self.path = path
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        if not Path(path).is_file():
            # Checked at instantiation, so a typo fails before any model is loaded.
            raise DataSourceError(_missing_file_message(self.where, path))

    def _read(self) -> list[PromptRecord]:
        fields = {"prompt_field": self.prompt_field, "answer_field": self.answer_field}
        return records_from_jsonl(self.path, **fields, where=self.where)



def _missing_file_message(where: str, path: Union[str, Path]) -> str:
    return (
        f"{where}: prompt file '{path}' does not exist (resolved to '{Path(path).resolve()}'). "
        "Check the path; relative paths are resolved from the directory you run retrain in."
    )


def records_from_list(
    items: Sequence[Any], *, prompt_field: str = "prompt", answer_field: str = "answer", where: str = "data.prompts"
) -> list[PromptRecord]:
    """Records from an in-config list of strings or mappings; errors name `where[index]`."""
    if not items:
        raise DataSourceError(f"{where} is an empty list: give at least one prompt, or use another source.")
    records = []
    for i, item in enumerate(items):
        try:
            records.append(
                record_from_mapping(item, prompt_field=prompt_field, answer_field=answer_field, where=f"{where}[{i}]")
            )
        except ValueError as err:
            raise DataSourceError(str(err)) from None
    return records


def records_from_jsonl(
    path: Union[str, Path], *, prompt_field: str = "prompt", answer_field: str = "answer", where: str = "data.path"
) -> list[PromptRecord]:
    """Records from a JSON Lines file; a malformed line raises `DataSourceError` naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(_missing_file_message(where, path))
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"{path}:{line_number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(f"{location}: not valid JSON ({err.msg} at column {err.colno}).") from None
            try:
                records.append(
                    record_from_mapping(raw, prompt_field=prompt_field, answer_field=answer_field, where=location)
                )
            except ValueError as err:
                raise DataSourceError(str(err)) from None
    if not records:
        raise DataSourceError(f"{path}: the file holds no records. Add one JSON object per line.")
    return records
