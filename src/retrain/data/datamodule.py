"""`PromptDataModule`: streams prompt records to the RL trainer.

RL training is measured in optimizer steps, not epochs, so the training stream is endless: it walks
the records in a seeded shuffled order, reshuffles at the end of each pass, and Lightning's
`max_steps` decides when to stop. Each DDP rank reads a disjoint slice of the records.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import lightning.pytorch as pl
from torch.utils.data import DataLoader, IterableDataset

from retrain.data.records import PromptRecord
from retrain.data.sources import DataSourceError, records_from_jsonl, records_from_list


def collate_records(batch: list[PromptRecord]) -> list[PromptRecord]:
    """Keep a batch as a list of records: prompts are tokenized by the rollout, not here."""
    return batch


class PromptStream(IterableDataset):
    """An endless, seeded, reshuffling pass over `records` (or one pass when `repeat` is False)."""

    def __init__(self, records: list[PromptRecord], *, shuffle: bool, seed: int, repeat: bool = True) -> None:
        self.records = records
        self.shuffle = shuffle
        self.seed = seed
        self.repeat = repeat

    def __iter__(self) -> Iterator[PromptRecord]:
        epoch = 0
        while True:
            order = list(range(len(self.records)))
            if self.shuffle:
                # A string seed keeps (seed, pass) pairs apart: seed 1's first pass is not seed 0's second.
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
            for index in order:
                yield self.records[index]
            epoch += 1
            if not self.repeat:
                return


class PromptDataModule(pl.LightningDataModule):
    """Prompt records from an in-config list or a JSONL file.

    Args:
        prompts: prompt records written in the config: strings, or objects with a prompt field
            (text or chat messages), an optional answer field and any metadata.
        path: a JSON Lines file of such records (one per line). Give `prompts` or `path`, not both.
        batch_size: prompts per generation on each device; each becomes `num_generations`
            rollouts, which `steps_per_generation` may split over several optimizer steps.
        shuffle: visit the records in a seeded random order, reshuffled every pass.
        seed: the shuffle seed.
        prompt_field: the field holding the prompt.
        answer_field: the field holding the reference answer.
    """

    def __init__(
        self,
        prompts: Optional[list[Union[str, dict[str, Any]]]] = None,
        path: Optional[str] = None,
        batch_size: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
    ) -> None:
        super().__init__()
        if (prompts is None) == (path is None):
            raise DataSourceError("data: give exactly one of 'prompts' (a list in the config) or 'path' (a JSONL file).")
        if batch_size < 1:
            raise DataSourceError(f"data.batch_size must be at least 1, got {batch_size}.")
        if path is not None and not Path(path).is_file():
            # Checked here, at instantiation, so a typo fails before any model is loaded.
            raise DataSourceError(
                f"data.path: prompt file '{path}' does not exist (resolved to '{Path(path).resolve()}')."
            )
        self.prompts = prompts
        self.path = path
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.records: list[PromptRecord] = []
        self._loaded: Optional[list[PromptRecord]] = None

    def prepare_data(self) -> None:
        """Validate the whole source first: Lightning runs this before any model is prepared or loaded."""
        self._loaded = self.load_records()

    def load_records(self) -> list[PromptRecord]:
        """Read and validate every record of the configured source."""
        fields = {"prompt_field": self.prompt_field, "answer_field": self.answer_field}
        if self.path is not None:
            return records_from_jsonl(self.path, **fields)
        return records_from_list(self.prompts or [], **fields)

    def setup(self, stage: str = "fit") -> None:
        if self.records:
            return
        records = self._loaded if self._loaded is not None else self.load_records()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        shard = records[rank::world]
        if not shard:
            raise DataSourceError(
                f"data: {len(records)} records cannot give each of {world} ranks at least one; add records."
            )
        self.records = shard

    def train_dataloader(self) -> DataLoader:
        if not self.records:
            self.setup("fit")
        stream = PromptStream(self.records, shuffle=self.shuffle, seed=self.seed)
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=collate_records, num_workers=0)
