"""`ProceduralSource`: prompts made on demand by a user function, endless or of a fixed size.

Record `i` is `fn(random.Random(f"{seed}:{i}"), i)`: each index has its own generator seeded from
`(seed, i)`, so a record depends on nothing but its index. That is what makes the stream seekable
(a resumed run regenerates exactly the records it would have seen) and shardable (rank r of w
takes indices r, r + w, ...) without generating the records it skips.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from retrain.core.records import PromptRecord, record_from_mapping
from retrain.data.sources.base import DataSourceError, PromptSource
from retrain.core.registry import import_function


class ProceduralSource(PromptSource):
    """Records from a generator function ``fn(rng: random.Random, index: int) -> dict``.

    The function returns a prompt string or a mapping with the prompt field (text or chat
    messages), an optional answer field and any metadata, as a JSONL line would.

    Args:
        generator: the function, as an import path (``my_tasks.arith:make``) or a file path
            (``tasks/arith.py:make``, relative to the directory you run retrain in).
        size: how many records there are; None for an endless stream.
        seed: seeds every record's generator (with its index).
        prompt_field: the key holding the prompt.
        answer_field: the key holding the reference answer.
    """

    where = "data.source"

    def __init__(
        self,
        generator: str,
        size: Optional[int] = None,
        seed: int = 0,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
    ) -> None:
        if size is not None and size < 1:
            raise DataSourceError(f"ProceduralSource size={size}: must be at least 1, or null for an endless stream.")
        self.generator = generator
        self.size = size
        self.seed = seed
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.function = import_callable(generator, "ProceduralSource generator")
        self._checked = False

    def load(self) -> None:
        if not self._checked:
            self.record(0)  # the function runs and returns a valid record before training starts
            self._checked = True

    @property
    def num_records(self) -> Optional[int]:
        return self.size

    def record(self, index: int) -> PromptRecord:
        if self.size is not None and not 0 <= index < self.size:
            raise IndexError(f"ProceduralSource index {index} is outside its size {self.size}.")
        where = f"{self.where}: generator '{self.generator}' at index {index}"
        try:
            raw = self.function(random.Random(f"{self.seed}:{index}"), index)
        except Exception as err:
            raise DataSourceError(f"{where} raised {type(err).__name__}: {err}") from err
        try:
            return record_from_mapping(raw, prompt_field=self.prompt_field, answer_field=self.answer_field, where=where)
        except ValueError as err:
            raise DataSourceError(str(err)) from None


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """The callable named by ``package.module:name`` or ``path/to/file.py:name``.

    Raises:
        DataSourceError: naming `spec` and what went wrong (bad form, import failure, no such name).
    """
    module_part, sep, attribute = spec.rpartition(":")
    if not sep or not module_part or not attribute:
        raise DataSourceError(
            f"{what} '{spec}': expected 'package.module:function' or 'path/to/file.py:function'."
        )
    try:
        return import_function(spec, what)
    except KeyError as err:  # already names the path and the failure
        raise DataSourceError(str(err.args[0])) from None
