"""Where prompt records come from: an in-config list or a JSONL file.

Each source is validated as a whole when it is loaded, so a malformed line fails the run before any
model is loaded, with the file and line number in the message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from retrain.data.records import PromptRecord, record_from_mapping


class DataSourceError(ValueError):
    """A prompt source is missing, empty or malformed. The message names the file/line and the fix."""


def records_from_list(
    items: Sequence[Any], *, prompt_field: str = "prompt", answer_field: str = "answer"
) -> list[PromptRecord]:
    """Records from an in-config list of strings or mappings."""
    if not items:
        raise DataSourceError("data.prompts is an empty list: give at least one prompt, or set data.path.")
    records = []
    for i, item in enumerate(items):
        try:
            records.append(
                record_from_mapping(item, prompt_field=prompt_field, answer_field=answer_field, where=f"data.prompts[{i}]")
            )
        except ValueError as err:
            raise DataSourceError(str(err)) from None
    return records


def records_from_jsonl(
    path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer"
) -> list[PromptRecord]:
    """Records from a JSON Lines file: one JSON object (or string) per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(
            f"data.path: prompt file '{path}' does not exist (resolved to '{path.resolve()}'). "
            "Check the path; relative paths are resolved from the directory you run retrain in."
        )
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).") from None
            try:
                records.append(
                    record_from_mapping(raw, prompt_field=prompt_field, answer_field=answer_field, where=where)
                )
            except ValueError as err:
                raise DataSourceError(str(err)) from None
    if not records:
        raise DataSourceError(f"{path}: the file holds no records. Add one JSON object per line.")
    return records
