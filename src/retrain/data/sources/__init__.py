"""Prompt sources: where `PromptRecord`s come from.

`ListSource` (records in the config), `JSONLSource` (a JSON Lines file), `HFDatasetSource` (a
Hugging Face dataset: local files, a `save_to_disk` directory or a hub id), `ProceduralSource` (a
user generator function, endless or sized) and `ReasoningGymSource` (reasoning-gym tasks). Write
your own by subclassing `PromptSource`. Optional packages (`datasets`, `reasoning_gym`) are
imported only when a source that needs them loads.
"""

from retrain.data.sources.base import (
    DataSourceError,
    JSONLSource,
    ListSource,
    PromptSource,
    records_from_jsonl,
    records_from_list,
)
from retrain.data.sources.hf import HFDatasetSource
from retrain.data.sources.procedural import ProceduralSource, import_callable
from retrain.data.sources.reasoning import ReasoningGymSource

__all__ = [
    "DataSourceError",
    "HFDatasetSource",
    "JSONLSource",
    "ListSource",
    "ProceduralSource",
    "PromptSource",
    "ReasoningGymSource",
    "import_callable",
    "records_from_jsonl",
    "records_from_list",
]
