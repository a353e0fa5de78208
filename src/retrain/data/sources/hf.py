"""`HFDatasetSource`: prompts from a Hugging Face `datasets` dataset.

Three ways in: local files (`data_files`: json/jsonl/csv/parquet, read by `datasets.load_dataset`
with the builder inferred from the extension), a directory written by `save_to_disk`, or a hub id
(`path`, with `name`, `split` and `revision`). The split is checked as a whole on `load` (the
fields exist, it is not empty); rows become `PromptRecord`s only when they are read, so a large
dataset costs no conversion up front. `datasets` is imported only when a source loads.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Optional, Union

from retrain.core.records import PromptRecord, record_from_mapping
from retrain.data.sources.base import DataSourceError, PromptSource

DataFiles = Union[str, list[str], dict[str, Union[str, list[str]]]]

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes (DatasetDict, Dataset)


class HFDatasetSource(PromptSource):
    """A split of a Hugging Face dataset: local files, a `save_to_disk` directory or a hub id.

    Args:
        path: a hub dataset id (``openai/gsm8k``), or a directory written by `save_to_disk`.
        data_files: local data files instead of `path`: one file or glob, a list, or a mapping from
            split name to files (``{train: train.jsonl, test: test.jsonl}``); one file or list is the
            ``train`` split.
        builder: the `datasets` builder that reads `data_files` (``json``, ``csv``, ``parquet``);
            inferred from the file extension when omitted.
        name: the dataset configuration (hub datasets with several, e.g. ``main`` for gsm8k).
        split: the split to read.
        revision: a hub branch, tag or commit, to pin the data.
        prompt_field: the column holding the prompt (text or chat messages).
        answer_field: the column holding the reference answer. The default ``answer`` may be absent
            (records then have no answer); any other name you set must be a column.
        cache_dir: where `datasets` caches downloads and Arrow files (default: its own cache).
    """

    def __init__(
        self,
        path: Optional[str] = None,
        data_files: Optional[DataFiles] = None,
        builder: Optional[str] = None,
        name: Optional[str] = None,
        split: str = "train",
        revision: Optional[str] = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        cache_dir: Optional[str] = None,
    ) -> None:
        if (path is None) == (data_files is None):
            raise DataSourceError(
                "HFDatasetSource: give exactly one of 'path' (a hub id or a save_to_disk directory) "
                "or 'data_files' (local json/jsonl/csv/parquet files)."
            )
        self.path = path
        self.data_files = data_files
        self.builder = builder
        self.name = name
        self.split = split
        self.revision = revision
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.cache_dir = cache_dir
        self._dataset: Any = None
        if data_files is not None:
            self._files = _expand_files(data_files)  # fails now, at instantiation, on a missing file
            self.builder = builder or _infer_builder(self._files)

    @property
    def description(self) -> str:
        """The dataset as the config names it, for messages."""
        if self.data_files is not None:
            return f"data_files={self.data_files!r}"
        return f"'{self.path}'" + (f" (name '{self.name}')" if self.name else "")

    def load(self) -> None:
        if self._dataset is not None:
            return
        dataset = self._load_split()
        if len(dataset) == 0:
            raise DataSourceError(f"{self.where}: split '{self.split}' of {self.description} is empty; choose a split with rows.")
        columns = list(dataset.column_names)
        required = [self.prompt_field] + ([self.answer_field] if self.answer_field != "answer" else [])
        for field in required:
            if field not in columns:
                kind = "prompt_field" if field == self.prompt_field else "answer_field"
                raise DataSourceError(
                    f"{self.where}: {kind} '{field}' is not a column of split '{self.split}' of {self.description} "
                    f"(columns: {', '.join(columns)}). Set {kind} to the column that holds it."
                )
        self._dataset = dataset

    @property
    def num_records(self) -> int:
        self.load()
        return len(self._dataset)

    def record(self, index: int) -> PromptRecord:
        self.load()
        where = f"{self.where}: {self.description} split '{self.split}' row {index}"
        try:
            return record_from_mapping(
                self._dataset[index], prompt_field=self.prompt_field, answer_field=self.answer_field, where=where
            )
        except ValueError as err:
            raise DataSourceError(str(err)) from None

    def _load_split(self) -> Any:
        import datasets

        if self.data_files is not None:
            try:
                loaded = datasets.load_dataset(self.builder, data_files=self.data_files, cache_dir=self.cache_dir)
            except Exception as err:
                raise self._read_error(err) from None
            return self._pick_split(loaded)
        if _is_saved_dataset(Path(self.path)):
            try:
                saved = datasets.load_from_disk(self.path)
            except Exception as err:
                raise DataSourceError(
                    f"{self.where}: cannot read the saved dataset {self.description}: {type(err).__name__}: {err}"
                ) from err
            return self._pick_split(saved)
        try:
            return datasets.load_dataset(
                self.path, self.name, split=self.split, revision=self.revision, cache_dir=self.cache_dir
            )
        except Exception as err:
            if "corresponds to no data" in str(err):
                raise DataSourceError(f"{self.where}: split '{self.split}' of {self.description} is empty.") from None
            if isinstance(err, ValueError) and "split" in str(err).lower():
                raise DataSourceError(f"{self.where}: split '{self.split}' of {self.description}: {err}") from None
            raise DataSourceError(
                f"{self.where}: cannot load {self.description}: {type(err).__name__}: {err}. Check the id, name "
                "and revision, and that the hub is reachable (or the dataset is in the cache when HF_HUB_OFFLINE=1)."
            ) from err

    def _pick_split(self, loaded: Any) -> Any:
        if not hasattr(loaded, "keys"):  # a saved single Dataset: it is the split
            return loaded
        if self.split not in loaded:
            raise DataSourceError(
                f"{self.where}: {self.description} has no split '{self.split}' (splits: {', '.join(loaded)}). "
                "Set split to one of them."
            )
        return loaded[self.split]

    def _read_error(self, err: Exception) -> DataSourceError:
        if "corresponds to no data" in str(err):
            return DataSourceError(f"{self.where}: split '{self.split}' of {self.description} is empty; add rows.")
        located = _locate_json_error(self._files) if self.builder == "json" else None
        cause = err.__cause__ or err
        detail = located or f"{type(cause).__name__}: {cause}"
        return DataSourceError(f"{self.where}: cannot read {self.description} with the '{self.builder}' builder: {detail}")


def _expand_files(data_files: DataFiles) -> list[Path]:
    """Every file `data_files` names (globs expanded); a name that matches nothing is an error."""
    if isinstance(data_files, dict):
        patterns = [p for v in data_files.values() for p in ([v] if isinstance(v, str) else v)]
    else:
        patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataSourceError(
                f"HFDatasetSource: data file '{pattern}' does not exist (resolved to '{Path(pattern).resolve()}'). "
                "Check the path; relative paths are resolved from the directory you run retrain in."
            )
        files += [Path(m) for m in matches]
    return files


def _infer_builder(files: list[Path]) -> str:
    builders = {_BUILDERS.get(f.suffix.lower()) for f in files}
    if len(builders) != 1 or None in builders:
        suffixes = ", ".join(sorted({f.suffix or "(none)" for f in files}))
        raise DataSourceError(
            f"HFDatasetSource: cannot tell how to read files with extensions {suffixes}; set builder "
            f"(one of {', '.join(sorted(set(_BUILDERS.values())))})."
        )
    return builders.pop()


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS)


def _locate_json_error(files: list[Path]) -> Optional[str]:
    """`file:line: ...` for the first malformed JSON in `files` (JSON Lines or one JSON document)."""
    for file in files:
        text = file.read_text(encoding="utf-8")
        try:
            json.loads(text)
            continue  # one valid JSON document
        except json.JSONDecodeError as whole:
            first = next((line for line in text.splitlines() if line.strip()), "")
            if not _parses(first):  # not JSON Lines: the whole-document position is the right one
                return f"{file}:{whole.lineno}: not valid JSON ({whole.msg} at column {whole.colno})."
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{file}:{line_number}: not valid JSON ({err.msg} at column {err.colno})."
    return None


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False
