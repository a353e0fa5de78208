"""Prompt data: records, sources and the `PromptDataModule`.

`PromptDataModule` and the stream (which import Lightning and torch) load on first use, so
environments and reward functions can import `PromptRecord` without pulling in torch.
"""

from typing import Any

from retrain.core.records import PromptRecord, record_from_mapping, with_system_prompt
from retrain.data.sources import (
    DataSourceError,
    HFDatasetSource,
    JSONLSource,
    ListSource,
    ProceduralSource,
    PromptSource,
    ReasoningGymSource,
    records_from_jsonl,
    records_from_list,
)

__all__ = [
    "DataSourceError",
    "HFDatasetSource",
    "JSONLSource",
    "ListSource",
    "ProceduralSource",
    "PromptDataModule",
    "PromptRecord",
    "PromptSource",
    "PromptStream",
    "ReasoningGymSource",
    "StreamPosition",
    "collate_records",
    "record_from_mapping",
    "records_from_jsonl",
    "records_from_list",
    "with_system_prompt",
]

_LAZY = {
    "PromptDataModule": "retrain.data.datamodule",
    "collate_records": "retrain.data.datamodule",
    "PromptStream": "retrain.data.stream",
    "StreamPosition": "retrain.data.stream",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retrain.data' has no attribute {name!r}")
