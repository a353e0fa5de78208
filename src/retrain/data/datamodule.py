"""`PromptDataModule`: streams prompt records to the RL trainer, and holds its place in checkpoints.

RL training is measured in optimizer steps, not epochs, so the training stream is endless: it walks
the records in a seeded shuffled order, reshuffles at the end of each pass, and Lightning's
`max_steps` decides when to stop. Each DDP rank reads a disjoint slice (rank::world_size).

Resuming. The stream's position is the number of records handed to the trainer, counted in
`on_before_batch_transfer`, which Lightning calls once for each batch it gives `training_step`.
Counting where the DataLoader pulls records would be wrong: Lightning's fetcher pulls one batch
ahead (to know whether a batch is the last), so at a checkpoint the DataLoader has read a batch
the trainer has not trained on. The count lives in `state_dict()`, which Lightning stores in every
checkpoint and hands back to `load_state_dict()` on resume, before it asks for the dataloader; the
new stream starts at that count (see `retrain.data.stream` for why that is a seek, not a replay).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from retrain.core.records import PromptRecord, with_system_prompt
from retrain.data.sources.base import DataSourceError, JSONLSource, ListSource, PromptSource
from retrain.data.stream import EndlessShard, PromptStream, Shard, StreamPosition

Prompts = Optional[list[Union[str, dict[str, Any]]]]
SPLITS = ("train", "val", "test")


def collate_records(batch: list[PromptRecord]) -> list[PromptRecord]:
    """Keep a batch as a list of records: prompts are tokenized by the rollout, not here."""
    return batch


class PromptDataModule(pl.LightningDataModule):
    """Prompt records for training, and optionally for validation and test.

    Training data is one of `prompts`, `path` or `source`; validation and test data are optional,
    each given the same three ways (`val_prompts`/`val_path`/`val_source`, and `test_...`).

    Args:
        prompts: prompt records written in the config: strings, or objects with a prompt field
            (text or chat messages), an optional answer field and any metadata.
        path: a JSON Lines file of such records (one per line).
        batch_size: prompts per generation on each device; each becomes `num_generations`
            rollouts, which `steps_per_generation` may split over several optimizer steps.
            Validation and test batches have the same size.
        shuffle: visit the training records in a seeded random order, reshuffled every pass
            (validation and test keep source order).
        seed: the shuffle seed.
        prompt_field: the field holding the prompt (for `prompts`/`path`; a `source` has its own).
        answer_field: the field holding the reference answer (likewise).
        source: any `PromptSource`, chosen by class_path: `retrain.data.HFDatasetSource`,
            `retrain.data.ProceduralSource`, `retrain.data.ReasoningGymSource`, or your own.
        system_prompt: when set, every record becomes chat messages starting with this system
            message (a text prompt becomes the user message), so the tokenizer's chat template applies.
        val_prompts: validation records in the config.
        val_path: a JSON Lines file of validation records.
        val_source: a `PromptSource` of validation records (finite).
        test_prompts: test records in the config.
        test_path: a JSON Lines file of test records.
        test_source: a `PromptSource` of test records (finite).
    """

    def __init__(
        self,
        prompts: Prompts = None,
        path: Optional[str] = None,
        batch_size: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        source: Optional[PromptSource] = None,
        system_prompt: Optional[str] = None,
        val_prompts: Prompts = None,
        val_path: Optional[str] = None,
        val_source: Optional[PromptSource] = None,
        test_prompts: Prompts = None,
        test_path: Optional[str] = None,
        test_source: Optional[PromptSource] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataSourceError(f"data.batch_size must be at least 1, got {batch_size}.")
        self.prompts, self.path = prompts, path
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.system_prompt = system_prompt
        fields = {"prompt_field": prompt_field, "answer_field": answer_field}
        self.sources: dict[str, PromptSource] = {}
        for split, (p, f, s) in {
            "train": (prompts, path, source),
            "val": (val_prompts, val_path, val_source),
            "test": (test_prompts, test_path, test_source),
        }.items():
            chosen = _split_source(split, p, f, s, fields)
            if chosen is not None:
                self.sources[split] = chosen
        # Lightning runs a validation/test loop only when the data module defines the dataloader,
        # so these exist only for configured splits (as LightningDataModule.from_datasets does).
        if "val" in self.sources:
            self.val_dataloader = functools.partial(self._eval_dataloader, "val")  # type: ignore[method-assign]
        if "test" in self.sources:
            self.test_dataloader = functools.partial(self._eval_dataloader, "test")  # type: ignore[method-assign]
        self.position = StreamPosition()
        self.train_stream: Optional[PromptStream] = None
        self._shards: dict[str, Any] = {}

    # ------------------------------------------------------------------ loading and sharding
    def prepare_data(self) -> None:
        """Validate every configured source first: Lightning runs this before any model is prepared or loaded."""
        for source in self.sources.values():
            source.load()

    def setup(self, stage: str = "fit") -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for split in splits:
            if split in self.sources:
                self.shard(split)

    def shard(self, split: str = "train") -> Any:
        """This rank's records of `split`: a `Shard` (a lazy sequence) or, for an endless source, an `EndlessShard`."""
        if split in self._shards:
            return self._shards[split]
        if split not in self.sources:
            raise DataSourceError(f"data: no {split} data configured; set {_keys(split)}.")
        source = self.sources[split]
        source.load()
        rank, world = self._rank_and_world()
        transform = functools.partial(with_system_prompt, system_prompt=self.system_prompt) if self.system_prompt else None
        if source.num_records is None:
            if split != "train":
                raise DataSourceError(f"{source.where}: an endless source cannot be a {split} split (one pass must end); give it a size.")
            shard: Any = EndlessShard(source, rank, world, transform)
        else:
            shard = Shard(source, rank, world, transform)
            if len(shard) == 0:
                raise DataSourceError(
                    f"{source.where}: {source.num_records} records cannot give each of {world} ranks at least one; add records."
                )
        self._shards[split] = shard
        return shard

    @property
    def records(self) -> Any:
        """This rank's training records (see `shard`)."""
        return self.shard("train")

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    # ------------------------------------------------------------------ dataloaders
    def train_dataloader(self) -> DataLoader:
        self.train_stream = PromptStream(self.shard("train"), shuffle=self.shuffle, seed=self.seed, position=self.position)
        return _loader(self.train_stream, self.batch_size)

    def _eval_dataloader(self, split: str) -> DataLoader:
        """One pass over `split` in source order, as lists of records."""
        stream = PromptStream(self.shard(split), shuffle=False, seed=self.seed, repeat=False)
        return _loader(stream, self.batch_size)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training records the trainer receives (the stream position a checkpoint stores)."""
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "training", False):
            self.position.consumed += len(batch)
        return batch

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The training stream's position: records consumed, and the pass and offset they come to.

        The shuffle state is `seed` and the pass: pass p's order is a pure function of (seed, p).
        """
        state: dict[str, Any] = {"records_consumed": self.position.consumed, "seed": self.seed, "shuffle": self.shuffle}
        state["world_size"] = self._rank_and_world()[1]
        shard = self._shards.get("train")
        size = len(shard) if isinstance(shard, Shard) else None
        state["shard_size"] = size
        if size:
            state["pass_index"], state["pass_offset"] = divmod(self.position.consumed, size)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream from a checkpoint's position (warns if the data changed since)."""
        self.position.consumed = int(state_dict.get("records_consumed", 0))
        current = self.state_dict()
        changed = [
            f"{key} {state_dict[key]} -> {current[key]}"
            for key in ("seed", "shuffle", "world_size", "shard_size")
            if key in state_dict and current[key] is not None and state_dict[key] != current[key]
        ]
        if changed:
            rank_zero_warn(
                "data: resuming the prompt stream at record "
                f"{self.position.consumed}, but the data setup changed since the checkpoint ({'; '.join(changed)}): "
                "the resumed run will not see the prompts an uninterrupted run would have."
            )


def _loader(stream: PromptStream, batch_size: int) -> DataLoader:
    """A DataLoader of record lists that leaves torch's global random state alone.

    Every `iter()` of a DataLoader draws a base seed from its `generator`, by default the global
    one the sampler generates with. On a resume Lightning starts the training iterator after the
    checkpoint's random state is restored (and every validation starts an eval iterator), so without
    a private generator that draw would shift the sampling of every later step, and a resumed run
    would sample differently from the uninterrupted one. The streams need no randomness
    from it (their shuffle is seeded by `seed` and the pass).
    """
    return DataLoader(stream, batch_size=batch_size, collate_fn=collate_records, num_workers=0, generator=torch.Generator())


def _keys(split: str) -> str:
    prefix = "" if split == "train" else f"{split}_"
    return f"'{prefix}prompts', '{prefix}path' or '{prefix}source'"


def _split_source(
    split: str, prompts: Prompts, path: Optional[str], source: Optional[PromptSource], fields: dict[str, str]
) -> Optional[PromptSource]:
    """The one source configured for `split` (None if none, which only train forbids), labelled with its key."""
    prefix = "" if split == "train" else f"{split}_"
    given = [name for name, value in (("prompts", prompts), ("path", path), ("source", source)) if value is not None]
    if split == "train" and len(given) != 1:
        raise DataSourceError(f"data: give exactly one of {_keys(split)} for the training prompts (got {given or 'none'}).")
    if len(given) > 1:
        raise DataSourceError(f"data: give at most one of {_keys(split)} (got {', '.join(prefix + g for g in given)}).")
    if not given:
        return None
    if prompts is not None:
        chosen: PromptSource = ListSource(prompts, **fields)
    elif path is not None:
        if not Path(path).is_file():
            # Checked here, at instantiation, so a typo fails before any model is loaded.
            raise DataSourceError(
                f"data.{prefix}path: prompt file '{path}' does not exist (resolved to '{Path(path).resolve()}'). "
                "Check the path; relative paths are resolved from the directory you run retrain in."
            )
        chosen = JSONLSource(path, **fields)
    else:
        chosen = source
    chosen.where = f"data.{prefix}{given[0]}"
    return chosen
