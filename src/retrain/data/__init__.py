"""Prompt data: records, sources and the `PromptDataModule`.

`PromptDataModule` (which imports Lightning) loads on first use, so environments and reward
functions can import `PromptRecord` without pulling in torch.
"""

from typing import Any

from retrain.data.records import PromptRecord, record_from_mapping
from retrain.data.sources import DataSourceError, records_from_jsonl, records_from_list

__all__ = [
    "DataSourceError",
    "PromptDataModule",
    "PromptRecord",
    "PromptStream",
    "collate_records",
    "record_from_mapping",
    "records_from_jsonl",
    "records_from_list",
]


def __getattr__(name: str) -> Any:
    if name in ("PromptDataModule", "PromptStream", "collate_records"):
        from retrain.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'retrain.data' has no attribute {name!r}")
