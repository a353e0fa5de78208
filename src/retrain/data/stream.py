"""The training stream: a seekable, seeded walk over one rank's shard of a prompt source.

The stream's whole state is one number, the records handed to the trainer so far (`consumed`):
pass `p` visits the shard in the order `Random(f"{seed}:{p}")` shuffles it to, so record `consumed`
is pass ``consumed // n``, position ``consumed % n``, for a shard of `n` records. An endless source
has no passes: record `consumed` is the source's index ``rank + consumed * world_size``. Starting
a stream at `consumed` therefore needs no replay of what came before, which is what makes a resumed
run see exactly the prompts an uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from torch.utils.data import IterableDataset

from retrain.core.records import PromptRecord
from retrain.data.sources.base import PromptSource

Transform = Callable[[PromptRecord], PromptRecord]


class Shard(Sequence):
    """Rank `rank` of `world_size`'s records of a finite source (indices rank, rank + world, ...).

    Records are read from the source (and `transform`ed) when indexed, not copied.
    """

    def __init__(self, source: PromptSource, rank: int = 0, world_size: int = 1, transform: Optional[Transform] = None) -> None:
        self.source, self.transform = source, transform
        self.indices = range(rank, source.num_records, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        record = self.source.record(self.indices[i])
        return self.transform(record) if self.transform else record


class EndlessShard:
    """Rank `rank` of `world_size`'s records of an endless source: item i is source index rank + i * world_size."""

    def __init__(self, source: PromptSource, rank: int = 0, world_size: int = 1, transform: Optional[Transform] = None) -> None:
        self.source, self.rank, self.world_size, self.transform = source, rank, world_size, transform

    def __getitem__(self, i: int) -> PromptRecord:
        record = self.source.record(self.rank + i * self.world_size)
        return self.transform(record) if self.transform else record


@dataclass
class StreamPosition:
    """Where the training stream stands: records handed to the trainer (not merely fetched)."""

    consumed: int = 0


class PromptStream(IterableDataset):
    """A seeded walk over `records` from `position.consumed` on: endless (reshuffled each pass) or,
    with `repeat=False`, one pass.

    Args:
        records: a finite sequence (a list or a `Shard`), or an `EndlessShard`.
        shuffle: visit each pass in a seeded random order; otherwise in source order.
        seed: the shuffle seed.
        repeat: start another pass at the end of each one (training); False gives one pass (evaluation).
        position: where to start, read each time the stream is iterated; the data module advances it
            as the trainer receives batches. Default: the beginning.
    """

    def __init__(
        self,
        records: Union[Sequence, EndlessShard],
        *,
        shuffle: bool,
        seed: int,
        repeat: bool = True,
        position: Optional[StreamPosition] = None,
    ) -> None:
        self.records = records
        self.shuffle = shuffle
        self.seed = seed
        self.repeat = repeat
        self.position = position or StreamPosition()
        # The position after the last record yielded to the DataLoader, batches Lightning prefetched included.
        self.fetched = self.position.consumed

    def order(self, pass_index: int) -> list[int]:
        """The order pass `pass_index` visits the records in."""
        order = list(range(len(self.records)))
        if self.shuffle:
            # A string seed keeps (seed, pass) pairs apart: seed 1's first pass is not seed 0's second.
            random.Random(f"{self.seed}:{pass_index}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[PromptRecord]:
        start = self.position.consumed
        self.fetched = start
        if isinstance(self.records, EndlessShard):
            index = start
            while True:
                self.fetched += 1
                yield self.records[index]
                index += 1
        pass_index, offset = divmod(start, len(self.records))
        while True:
            for index in self.order(pass_index)[offset:]:
                self.fetched += 1
                yield self.records[index]
            pass_index, offset = pass_index + 1, 0
            if not self.repeat:
                return
