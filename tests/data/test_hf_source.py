"""Tests for retrain.data.sources.hf: HFDatasetSource on real local files (no hub access)."""

from __future__ import annotations

import json

import pytest

from retrain.data import DataSourceError, HFDatasetSource, PromptDataModule, PromptRecord

datasets = pytest.importorskip("datasets")

ROWS = [{"question": f"q{i}", "solution": str(i), "level": i % 2} for i in range(5)]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache inside the test's directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # read at each load


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def all_records(source) -> list[PromptRecord]:
    source.load()
    return [source.record(i) for i in range(source.num_records)]


def source_for(tmp_path, fmt: str, **kwargs) -> HFDatasetSource:
    """A source over ROWS written as `fmt` (jsonl, json, csv, parquet)."""
    table = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "json":
        path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")  # one JSON array document
    elif fmt == "csv":
        table.to_csv(str(path), index=False)
    elif fmt == "parquet":
        table.to_parquet(str(path))
    return HFDatasetSource(data_files=str(path), prompt_field="question", answer_field="solution", **kwargs)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files_of_every_format(tmp_path, fmt):
    records = all_records(source_for(tmp_path, fmt))
    assert [r.prompt for r in records] == [f"q{i}" for i in range(5)]
    assert [str(r.answer) for r in records] == [str(i) for i in range(5)]  # csv reads "0" back as 0
    assert [r.metadata for r in records] == [{"level": i % 2} for i in range(5)]


def test_builder_is_inferred_and_can_be_given(tmp_path):
    assert source_for(tmp_path, "jsonl").builder == "json"
    assert source_for(tmp_path, "parquet").builder == "parquet"
    text = write_jsonl(tmp_path / "rows.data", ROWS)
    with pytest.raises(DataSourceError, match="set builder"):
        HFDatasetSource(data_files=str(text))
    assert len(all_records(HFDatasetSource(data_files=str(text), builder="json", prompt_field="question"))) == 5


def test_split_mapping_picks_the_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "t"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    files = {"train": str(train), "test": str(test)}
    assert [r.prompt for r in all_records(HFDatasetSource(data_files=files, split="test"))] == ["x", "y"]
    with pytest.raises(DataSourceError) as err:
        HFDatasetSource(data_files=files, split="validation").load()
    assert "no split 'validation'" in str(err.value)
    assert "train, test" in str(err.value)  # the splits there are


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    table = datasets.Dataset.from_list(ROWS)
    table.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": table, "eval": table.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    single = HFDatasetSource(path=str(tmp_path / "single"), prompt_field="question", answer_field="solution")
    assert [r.answer for r in all_records(single)] == ["0", "1", "2", "3", "4"]
    held_out = HFDatasetSource(path=str(tmp_path / "dict"), split="eval", prompt_field="question")
    assert [r.prompt for r in all_records(held_out)] == ["q0", "q1"]


def test_chat_message_column(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}], "answer": "hello"}]
    source = HFDatasetSource(data_files=str(write_jsonl(tmp_path / "chat.jsonl", rows)), prompt_field="messages")
    (record,) = all_records(source)
    assert record.is_chat and record.prompt[0]["content"] == "hi" and record.answer == "hello"


def test_default_answer_field_may_be_absent(tmp_path):
    source = HFDatasetSource(data_files=str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])))
    assert all_records(source) == [PromptRecord(prompt="a")]


@pytest.mark.parametrize("option, field", [("prompt_field", "text"), ("answer_field", "label")])
def test_missing_field_names_field_dataset_and_columns(tmp_path, option, field):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    fields = {"prompt_field": "question", option: field}
    with pytest.raises(DataSourceError) as err:
        HFDatasetSource(data_files=str(path), **fields).load()
    message = str(err.value)
    assert f"{option} '{field}'" in message
    assert "rows.jsonl" in message  # the dataset
    assert "question, solution, level" in message  # the columns present
    assert f"Set {option}" in message


def test_empty_split_names_the_split(tmp_path):
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("prompt,answer\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match="split 'train' .* empty"):
        HFDatasetSource(data_files=str(empty_csv)).load()
    table = datasets.Dataset.from_list([{"prompt": "a"}])
    datasets.DatasetDict({"train": table, "test": table.filter(lambda row: False)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataSourceError) as err:
        HFDatasetSource(path=str(tmp_path / "saved"), split="test").load()
    assert "split 'test'" in str(err.value) and "empty" in str(err.value)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",\n{"prompt": "c"}\n', encoding="utf-8")
    with pytest.raises(DataSourceError) as err:
        HFDatasetSource(data_files=str(path)).load()
    assert f"{path}:3: not valid JSON" in str(err.value)


def test_bad_json_document_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n', encoding="utf-8")
    with pytest.raises(DataSourceError) as err:
        HFDatasetSource(data_files=str(path)).load()
    assert f"{path}:3: not valid JSON" in str(err.value)


def test_bad_row_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": ""}])
    source = HFDatasetSource(data_files=str(path))
    source.load()
    with pytest.raises(DataSourceError, match="row 1: field 'prompt' must be non-empty"):
        source.record(1)


def test_missing_file_fails_at_construction(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataSourceError) as err:
        HFDatasetSource(data_files=str(missing))
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)


def test_needs_exactly_one_of_path_and_data_files(tmp_path):
    with pytest.raises(DataSourceError, match="exactly one"):
        HFDatasetSource()
    with pytest.raises(DataSourceError, match="exactly one"):
        HFDatasetSource(path="org/name", data_files=str(write_jsonl(tmp_path / "p.jsonl", ROWS)))


def test_glob_of_files(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", [{"prompt": "a"}])
    write_jsonl(tmp_path / "part-1.jsonl", [{"prompt": "b"}])
    source = HFDatasetSource(data_files=str(tmp_path / "part-*.jsonl"))
    assert sorted(r.prompt for r in all_records(source)) == ["a", "b"]


def test_as_the_data_module_source(tmp_path):
    source = source_for(tmp_path, "parquet")
    module = PromptDataModule(source=source, batch_size=5, shuffle=False, system_prompt="Answer with a number.")
    module.prepare_data()
    (batch,) = [next(iter(module.train_dataloader()))]
    assert [r.prompt[1]["content"] for r in batch] == [f"q{i}" for i in range(5)]
    assert batch[0].prompt[0] == {"role": "system", "content": "Answer with a number."}
    assert source.where == "data.source"
