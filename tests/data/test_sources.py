"""Tests for retrain.data.sources (and the record validation in retrain.core.records)."""

from __future__ import annotations

import json

import pytest

from retrain.core.records import PromptRecord, record_from_mapping
from retrain.data.sources import DataSourceError, records_from_jsonl, records_from_list


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- records_from_list


def test_list_of_strings():
    records = records_from_list(["first", "second"])
    assert records == [PromptRecord(prompt="first"), PromptRecord(prompt="second")]
    assert records[0].answer is None and records[0].metadata == {}
    assert not records[0].is_chat


def test_list_of_dicts_with_answer_and_metadata():
    (record,) = records_from_list([{"prompt": "2+2?", "answer": 4, "difficulty": "easy", "id": 7}])
    assert record.prompt == "2+2?"
    assert record.answer == 4
    assert record.metadata == {"difficulty": "easy", "id": 7}  # everything but prompt and answer
    assert record.reward_kwargs() == {"difficulty": "easy", "id": 7, "prompt": "2+2?", "answer": 4}


def test_list_of_chat_messages():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    (record,) = records_from_list([{"prompt": messages, "answer": "hello"}])
    assert record.is_chat
    assert record.prompt == messages
    assert record.answer == "hello"


def test_custom_prompt_and_answer_fields():
    (record,) = records_from_list(
        [{"question": "q", "solution": "s", "answer": "not the answer"}], prompt_field="question", answer_field="solution"
    )
    assert record.prompt == "q"
    assert record.answer == "s"
    assert record.metadata == {"answer": "not the answer"}  # with answer_field renamed, 'answer' is metadata


def test_mixed_strings_and_dicts():
    records = records_from_list(["plain", {"prompt": "rich", "answer": 1}])
    assert [r.prompt for r in records] == ["plain", "rich"]
    assert [r.answer for r in records] == [None, 1]


def test_empty_list_fails():
    with pytest.raises(DataSourceError, match="empty"):
        records_from_list([])


def test_list_error_names_the_index_and_field():
    with pytest.raises(DataSourceError) as err:
        records_from_list(["ok", {"question": "q"}])
    message = str(err.value)
    assert "data.prompts[1]" in message
    assert "'prompt'" in message
    assert "question" in message  # the fields present are listed


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("", "empty string"),
        (42, "got int"),
        ({"prompt": ""}, "non-empty text"),
        ({"prompt": None}, "non-empty text"),
        ({"prompt": [{"role": "user"}]}, "message 0"),
        ({"prompt": [{"role": "user", "content": "a"}, "text"]}, "message 1"),
    ],
)
def test_invalid_items(item, fragment):
    with pytest.raises(DataSourceError) as err:
        records_from_list([item])
    assert "data.prompts[0]" in str(err.value)
    assert fragment in str(err.value)


def test_data_source_error_is_a_value_error():
    assert issubclass(DataSourceError, ValueError)


def test_record_from_mapping_where_in_message():
    with pytest.raises(ValueError, match="^somewhere: "):
        record_from_mapping({}, where="somewhere")


# --------------------------------------------------------------------------- records_from_jsonl


def test_jsonl_records_in_file_order(tmp_path):
    path = write_lines(
        tmp_path / "prompts.jsonl",
        [
            json.dumps({"prompt": "a", "answer": "1"}),
            json.dumps("just a string"),
            json.dumps({"prompt": [{"role": "user", "content": "c"}], "tag": "x"}),
        ],
    )
    records = records_from_jsonl(path)
    assert [r.prompt for r in records] == ["a", "just a string", [{"role": "user", "content": "c"}]]
    assert [r.answer for r in records] == ["1", None, None]
    assert records[2].metadata == {"tag": "x"}


def test_jsonl_accepts_str_path(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "a"})])
    assert records_from_jsonl(str(path)) == [PromptRecord(prompt="a")]


def test_jsonl_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"prompt": "a"}\n\n   \n{"prompt": "b"}\n\n', encoding="utf-8")
    assert [r.prompt for r in records_from_jsonl(path)] == ["a", "b"]


def test_jsonl_without_trailing_newline(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}', encoding="utf-8")
    assert [r.prompt for r in records_from_jsonl(path)] == ["a", "b"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    # line 1 valid, line 2 blank (still counted), line 3 malformed
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b",\n{"prompt": "c"}\n', encoding="utf-8")
    with pytest.raises(DataSourceError) as err:
        records_from_jsonl(path)
    message = str(err.value)
    assert f"{path}:3" in message
    assert "not valid JSON" in message


def test_jsonl_missing_prompt_field_names_field_and_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "a"}), json.dumps({"question": "b", "answer": 1})])
    with pytest.raises(DataSourceError) as err:
        records_from_jsonl(path)
    message = str(err.value)
    assert f"{path}:2" in message
    assert "missing the prompt field 'prompt'" in message
    assert "answer, question" in message  # sorted list of the fields present


def test_jsonl_custom_prompt_field(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"question": "b", "solution": 1})])
    (record,) = records_from_jsonl(path, prompt_field="question", answer_field="solution")
    assert record == PromptRecord(prompt="b", answer=1)
    with pytest.raises(DataSourceError, match="'prompt'"):
        records_from_jsonl(path)


def test_jsonl_non_object_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "a"}), "[1, 2]"])
    with pytest.raises(DataSourceError) as err:
        records_from_jsonl(path)
    assert f"{path}:2" in str(err.value)
    assert "got list" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_jsonl_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataSourceError) as err:
        records_from_jsonl(path)
    assert str(path) in str(err.value)
    assert "no records" in str(err.value)


def test_jsonl_missing_file(tmp_path):
    path = tmp_path / "nope" / "missing.jsonl"
    with pytest.raises(DataSourceError) as err:
        records_from_jsonl(path)
    message = str(err.value)
    assert str(path) in message
    assert "does not exist" in message


def test_jsonl_directory_is_not_a_file(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        records_from_jsonl(tmp_path)
