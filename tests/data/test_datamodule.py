"""Tests for retrain.data.datamodule: PromptDataModule and the endless PromptStream."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

from retrain.data import DataSourceError, ListSource, ProceduralSource, PromptDataModule, PromptRecord
from retrain.data.datamodule import PromptStream, collate_records
from retrain.data.stream import StreamPosition


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


# --------------------------------------------------------------------------- sources and splits


def test_source_is_exclusive_with_prompts_and_path():
    source = ListSource(["a"])
    with pytest.raises(DataSourceError, match="exactly one"):
        PromptDataModule(prompts=["a"], source=source)
    module = PromptDataModule(source=source, batch_size=1)
    assert flat_prompts(take_batches(module, 2)) == ["a", "a"]
    assert source.where == "data.source"


def test_at_most_one_source_per_eval_split(tmp_path):
    path = write_jsonl(tmp_path / "v.jsonl", ["x"])
    with pytest.raises(DataSourceError, match="at most one of 'val_prompts', 'val_path' or 'val_source'"):
        PromptDataModule(prompts=["a"], val_prompts=["x"], val_path=str(path))


def test_missing_val_path_names_the_key(tmp_path):
    with pytest.raises(DataSourceError) as err:
        PromptDataModule(prompts=["a"], test_path=str(tmp_path / "missing.jsonl"))
    assert "data.test_path" in str(err.value) and "does not exist" in str(err.value)


def test_bad_val_prompt_names_the_key():
    module = PromptDataModule(prompts=["a"], val_prompts=["ok", {"question": "q"}])
    with pytest.raises(DataSourceError, match=r"data.val_prompts\[1\]: missing the prompt field"):
        module.prepare_data()


def test_val_and_test_dataloaders_give_one_pass_in_order(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", ["t1", "t2"])
    module = PromptDataModule(prompts=LETTERS, val_prompts=["v1", "v2", "v3", "v4", "v5"], test_path=str(path), batch_size=2)
    module.setup("fit")
    val = list(module.val_dataloader())
    assert [[r.prompt for r in b] for b in val] == [["v1", "v2"], ["v3", "v4"], ["v5"]]  # no shuffle, one pass
    assert all(isinstance(b, list) and all(isinstance(r, PromptRecord) for r in b) for b in val)
    assert list(module.val_dataloader()) == val  # every call is a fresh, identical pass
    module.setup("test")
    test = list(module.test_dataloader())
    assert [[r.prompt for r in b] for b in test] == [["t1", "t2"]]
    assert [r.answer for r in test[0]] == [0, 1]


def test_eval_dataloaders_exist_only_for_configured_splits():
    # Lightning runs a validation loop only when val_dataloader is overridden: unconfigured, it must not be.
    from lightning.pytorch.utilities.model_helpers import is_overridden

    bare = PromptDataModule(prompts=["a"])
    assert not is_overridden("val_dataloader", bare) and not is_overridden("test_dataloader", bare)
    with_val = PromptDataModule(prompts=["a"], val_prompts=["v"])
    assert is_overridden("val_dataloader", with_val) and not is_overridden("test_dataloader", with_val)


def test_eval_dataloaders_do_not_move_the_training_position():
    module = PromptDataModule(prompts=LETTERS, val_prompts=["v"], batch_size=2)
    module.trainer = SimpleNamespace(global_rank=0, world_size=1, training=False)
    for batch in module.val_dataloader():
        module.on_before_batch_transfer(batch, 0)
    assert module.state_dict()["records_consumed"] == 0


# --------------------------------------------------------------------------- chat formatting


def test_system_prompt_turns_text_prompts_into_chat():
    module = PromptDataModule(prompts=["2+2?", {"prompt": "3+3?", "answer": 6}], system_prompt="Be brief.", shuffle=False, batch_size=2)
    (batch,) = take_batches(module, 1)
    assert batch[0].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert batch[1].prompt[1] == {"role": "user", "content": "3+3?"} and batch[1].answer == 6


def test_system_prompt_on_chat_prompts_and_eval_splits():
    user_only = [{"role": "user", "content": "hi"}]
    own_system = [{"role": "system", "content": "mine"}, {"role": "user", "content": "yo"}]
    module = PromptDataModule(
        prompts=[{"prompt": user_only}, {"prompt": own_system}], val_prompts=["v"], system_prompt="S", shuffle=False, batch_size=2
    )
    (batch,) = take_batches(module, 1)
    assert batch[0].prompt == [{"role": "system", "content": "S"}, *user_only]
    assert batch[1].prompt == own_system  # a record's own system message is kept
    (val,) = list(module.val_dataloader())
    assert val[0].prompt == [{"role": "system", "content": "S"}, {"role": "user", "content": "v"}]


def test_no_system_prompt_leaves_prompts_alone():
    (batch,) = take_batches(PromptDataModule(prompts=["plain"], batch_size=1), 1)
    assert batch[0].prompt == "plain"


# --------------------------------------------------------------------------- DDP shards


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_get_disjoint_shards_covering_everything(world):
    shards = []
    for rank in range(world):
        module = PromptDataModule(prompts=LETTERS, val_prompts=LETTERS[:8], batch_size=1)
        module.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        module.setup("fit")
        assert [r.prompt for r in module.records] == LETTERS[rank::world]
        assert [r.prompt for b in module.val_dataloader() for r in b] == LETTERS[:8][rank::world]
        # a full pass of this rank's stream stays in its shard
        stream = take_batches(module, len(module.records))
        assert sorted(flat_prompts(stream)) == sorted(LETTERS[rank::world])
        shards.append(set(LETTERS[rank::world]))
    assert set().union(*shards) == set(LETTERS)
    assert sum(map(len, shards)) == len(LETTERS)


def test_endless_source_shards_by_index(tmp_path):
    generator = tmp_path / "gen.py"
    generator.write_text("def make(rng, index):\n    return f'p{index}'\n", encoding="utf-8")
    seen = []
    for rank in range(3):
        module = PromptDataModule(source=ProceduralSource(f"{generator}:make"), batch_size=2)
        module.trainer = SimpleNamespace(global_rank=rank, world_size=3)
        module.setup("fit")
        prompts = flat_prompts(take_batches(module, 2))
        assert prompts == [f"p{rank + 3 * i}" for i in range(4)]
        seen += prompts
    assert len(seen) == len(set(seen)) == 12


# --------------------------------------------------------------------------- position and state


def consume(module: PromptDataModule, batches: int) -> list[str]:
    """What a Lightning training loop does: iterate, and hand each batch through the transfer hook."""
    module.trainer = SimpleNamespace(global_rank=0, world_size=1, training=True)
    received = []
    for batch in itertools.islice(iter(module.train_dataloader()), batches):
        received += [r.prompt for r in module.on_before_batch_transfer(batch, 0)]
    return received


def test_state_dict_reports_records_pass_and_offset():
    module = PromptDataModule(prompts=LETTERS, batch_size=4, seed=2)
    consume(module, 3)
    assert module.state_dict() == {
        "records_consumed": 12, "seed": 2, "shuffle": True, "world_size": 1, "shard_size": 10,
        "pass_index": 1, "pass_offset": 2,
    }


@pytest.mark.parametrize("shuffle", [True, False])
def test_load_state_dict_continues_the_stream(shuffle):
    uninterrupted = consume(PromptDataModule(prompts=LETTERS, batch_size=3, seed=4, shuffle=shuffle), 9)
    first = PromptDataModule(prompts=LETTERS, batch_size=3, seed=4, shuffle=shuffle)
    head = consume(first, 4)
    second = PromptDataModule(prompts=LETTERS, batch_size=3, seed=4, shuffle=shuffle)
    second.setup("fit")
    second.load_state_dict(first.state_dict())
    tail = consume(second, 5)
    assert head + tail == uninterrupted


def test_a_new_dataloader_iterator_continues_from_the_position():
    # A second `iter()` (a new Lightning epoch with limit_train_batches) resumes where the trainer is, not at 0.
    module = PromptDataModule(prompts=LETTERS, batch_size=4, seed=0)
    everything = consume(PromptDataModule(prompts=LETTERS, batch_size=4, seed=0), 4)
    assert consume(module, 2) + consume(module, 2) == everything


def test_changed_data_since_the_checkpoint_warns():
    module = PromptDataModule(prompts=LETTERS, batch_size=2, seed=1)
    module.setup("fit")
    state = {**module.state_dict(), "records_consumed": 4, "seed": 0, "shard_size": 12}
    with pytest.warns(UserWarning, match=r"seed 0 -> 1; shard_size 12 -> 10"):
        module.load_state_dict(state)
    assert module.state_dict()["records_consumed"] == 4


@pytest.mark.parametrize("start", [0, 3, 10, 17, 25])
def test_stream_started_at_k_is_the_tail_of_the_stream_from_zero(start):
    records = [PromptRecord(prompt=p) for p in LETTERS]
    full = [r.prompt for r in itertools.islice(iter(PromptStream(records, shuffle=True, seed=9)), 40)]
    seek = PromptStream(records, shuffle=True, seed=9, position=StreamPosition(consumed=start))
    assert [r.prompt for r in itertools.islice(iter(seek), 40 - start)] == full[start:]
