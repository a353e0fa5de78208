"""Tests for retrain.data.datamodule: PromptDataModule and the endless PromptStream."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

from retrain.data import DataSourceError, PromptDataModule, PromptRecord
from retrain.data.datamodule import PromptStream, collate_records


def take_batches(module: PromptDataModule, n: int) -> list[list[PromptRecord]]:
    return list(itertools.islice(iter(module.train_dataloader()), n))


def flat_prompts(batches) -> list:
    return [record.prompt for batch in batches for record in batch]


def write_jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "answer": i}) + "\n" for i, p in enumerate(prompts)), encoding="utf-8")
    return path


LETTERS = [chr(ord("a") + i) for i in range(10)]


# --------------------------------------------------------------------------- construction


def test_needs_prompts_or_path(tmp_path):
    with pytest.raises(DataSourceError, match="exactly one"):
        PromptDataModule()
    path = write_jsonl(tmp_path / "p.jsonl", ["a"])
    with pytest.raises(DataSourceError, match="exactly one"):
        PromptDataModule(prompts=["a"], path=str(path))


def test_missing_path_fails_at_construction(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataSourceError) as err:
        PromptDataModule(path=str(missing))
    assert str(missing) in str(err.value)
    assert "does not exist" in str(err.value)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_fails(batch_size):
    with pytest.raises(DataSourceError, match="batch_size"):
        PromptDataModule(prompts=["a"], batch_size=batch_size)


def test_empty_prompt_list_fails_on_load():
    module = PromptDataModule(prompts=[])
    with pytest.raises(DataSourceError, match="empty"):
        module.setup("fit")


def test_malformed_file_fails_on_setup(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\nnot json\n', encoding="utf-8")
    module = PromptDataModule(path=str(path))
    with pytest.raises(DataSourceError, match=":2"):
        module.setup("fit")


# --------------------------------------------------------------------------- batches


def test_batches_are_lists_of_records_of_batch_size():
    module = PromptDataModule(prompts=LETTERS, batch_size=3, shuffle=False)
    batches = take_batches(module, 5)
    assert len(batches) == 5
    for batch in batches:
        assert isinstance(batch, list)
        assert len(batch) == 3
        assert all(isinstance(r, PromptRecord) for r in batch)


def test_records_from_path_keep_answers(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ["x", "y"])
    module = PromptDataModule(path=str(path), batch_size=2, shuffle=False)
    (batch,) = take_batches(module, 1)
    assert batch == [PromptRecord(prompt="x", answer=0), PromptRecord(prompt="y", answer=1)]


def test_custom_fields_are_used(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"q": "x", "a": 5}) + "\n", encoding="utf-8")
    module = PromptDataModule(path=str(path), batch_size=1, prompt_field="q", answer_field="a")
    (batch,) = take_batches(module, 1)
    assert batch == [PromptRecord(prompt="x", answer=5)]


def test_stream_is_endless_and_passes_cover_every_record_once():
    # 10 records, batch 4: 15 batches = 60 records = 6 full passes (batches cross pass boundaries).
    module = PromptDataModule(prompts=LETTERS, batch_size=4, shuffle=True, seed=3)
    batches = take_batches(module, 15)
    assert len(batches) == 15 and all(len(b) == 4 for b in batches)
    prompts = flat_prompts(batches)
    passes = [prompts[i : i + 10] for i in range(0, 60, 10)]
    for one_pass in passes:
        assert sorted(one_pass) == LETTERS  # every record exactly once per pass
    # Reshuffled every pass: with 10! orders, six identical passes would mean no reshuffle.
    assert len({tuple(p) for p in passes}) > 1


def test_shuffle_same_seed_same_order():
    first = flat_prompts(take_batches(PromptDataModule(prompts=LETTERS, batch_size=5, seed=11), 6))
    second = flat_prompts(take_batches(PromptDataModule(prompts=LETTERS, batch_size=5, seed=11), 6))
    assert first == second


def test_shuffle_different_seed_different_order():
    first = flat_prompts(take_batches(PromptDataModule(prompts=LETTERS, batch_size=5, seed=0), 2))
    second = flat_prompts(take_batches(PromptDataModule(prompts=LETTERS, batch_size=5, seed=1), 2))
    assert sorted(first) == sorted(second) == LETTERS
    assert first != second  # one pass each; two seeds giving the same of 10! orders is vanishingly unlikely


def test_shuffle_actually_shuffles():
    prompts = flat_prompts(take_batches(PromptDataModule(prompts=LETTERS, batch_size=10, seed=0), 1))
    assert prompts != LETTERS


def test_shuffle_false_keeps_file_order_every_pass(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ["c", "a", "b"])
    module = PromptDataModule(path=str(path), batch_size=2, shuffle=False)
    # 4 batches x 2 = 8 records: c a | b c | a b | c a
    assert flat_prompts(take_batches(module, 4)) == ["c", "a", "b", "c", "a", "b", "c", "a"]


def test_train_dataloader_restarts_from_the_beginning():
    module = PromptDataModule(prompts=LETTERS, batch_size=3, seed=5)
    assert flat_prompts(take_batches(module, 2)) == flat_prompts(take_batches(module, 2))


def test_setup_without_trainer_keeps_all_records():
    module = PromptDataModule(prompts=LETTERS)
    module.setup("fit")
    assert [r.prompt for r in module.records] == LETTERS


def test_setup_shards_records_by_rank():
    module = PromptDataModule(prompts=LETTERS, batch_size=2, shuffle=False)
    module.trainer = SimpleNamespace(global_rank=1, world_size=3)
    module.setup("fit")
    # rank 1 of 3 takes records 1, 4, 7 -> b, e, h
    assert [r.prompt for r in module.records] == ["b", "e", "h"]


def test_setup_fails_when_a_rank_gets_no_records():
    module = PromptDataModule(prompts=["a", "b"])
    module.trainer = SimpleNamespace(global_rank=2, world_size=3)
    with pytest.raises(DataSourceError, match="3 ranks"):
        module.setup("fit")


# --------------------------------------------------------------------------- PromptStream


def test_prompt_stream_single_pass_when_not_repeating():
    records = [PromptRecord(prompt=p) for p in "xyz"]
    assert [r.prompt for r in PromptStream(records, shuffle=False, seed=0, repeat=False)] == ["x", "y", "z"]
    shuffled = [r.prompt for r in PromptStream(records, shuffle=True, seed=0, repeat=False)]
    assert sorted(shuffled) == ["x", "y", "z"]


def test_collate_records_keeps_the_list():
    batch = [PromptRecord(prompt="a"), PromptRecord(prompt="b")]
    assert collate_records(batch) is batch
