"""Tests for retrain.data.sources.procedural: ProceduralSource and import_callable."""

from __future__ import annotations

import itertools
import textwrap
import uuid

import pytest

from retrain.data import DataSourceError, ProceduralSource, PromptDataModule
from retrain.data.sources.procedural import import_callable

GENERATOR = """
def make(rng, index):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"prompt": f"{a} + {b} =", "answer": a + b, "index": index}

def text_only(rng, index):
    return f"say {index}"

def broken(rng, index):
    return {"question": "no prompt key"}

def raises(rng, index):
    raise RuntimeError("boom")
"""


@pytest.fixture
def generator_file(tmp_path):
    path = tmp_path / f"gen_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(GENERATOR), encoding="utf-8")
    return path


def prompts(source, n):
    return [source.record(i).prompt for i in range(n)]


def test_records_come_from_the_function(generator_file):
    source = ProceduralSource(f"{generator_file}:make", seed=3)
    source.load()
    record = source.record(5)
    a, b = (int(x) for x in record.prompt.rstrip(" =").split(" + "))
    assert record.answer == a + b
    assert record.metadata == {"index": 5}
    assert source.num_records is None  # endless


def test_same_seed_same_records_in_any_order(generator_file):
    first = ProceduralSource(f"{generator_file}:make", seed=7)
    second = ProceduralSource(f"{generator_file}:make", seed=7)
    forward = prompts(first, 20)
    backward = [second.record(i).prompt for i in reversed(range(20))][::-1]
    assert forward == backward  # record i depends only on (seed, i)


def test_different_seed_different_records(generator_file):
    assert prompts(ProceduralSource(f"{generator_file}:make", seed=0), 20) != prompts(
        ProceduralSource(f"{generator_file}:make", seed=1), 20
    )


def test_import_path_form(tmp_path, monkeypatch):
    name = f"gen_mod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(GENERATOR), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = ProceduralSource(f"{name}:text_only", size=3)
    assert prompts(source, 3) == ["say 0", "say 1", "say 2"]


def test_sized_source_is_finite_and_shuffles_in_the_data_module(generator_file):
    source = ProceduralSource(f"{generator_file}:text_only", size=6)
    assert source.num_records == 6
    with pytest.raises(IndexError):
        source.record(6)
    module = PromptDataModule(source=source, batch_size=6, seed=0)
    (batch,) = itertools.islice(iter(module.train_dataloader()), 1)
    assert sorted(r.prompt for r in batch) == [f"say {i}" for i in range(6)]
    assert [r.prompt for r in batch] != [f"say {i}" for i in range(6)]


def test_endless_source_streams_in_index_order(generator_file):
    module = PromptDataModule(source=ProceduralSource(f"{generator_file}:text_only"), batch_size=4)
    batches = list(itertools.islice(iter(module.train_dataloader()), 3))
    assert [r.prompt for b in batches for r in b] == [f"say {i}" for i in range(12)]


def test_endless_source_cannot_be_an_eval_split(generator_file):
    module = PromptDataModule(prompts=["a"], val_source=ProceduralSource(f"{generator_file}:text_only"))
    with pytest.raises(DataSourceError, match="data.val_source: an endless source"):
        module.setup("fit")


def test_bad_record_names_generator_index_and_field(generator_file):
    source = ProceduralSource(f"{generator_file}:broken")
    with pytest.raises(DataSourceError) as err:
        source.load()
    message = str(err.value)
    assert f"{generator_file}:broken' at index 0" in message
    assert "missing the prompt field 'prompt'" in message and "question" in message


def test_generator_exception_is_located(generator_file):
    with pytest.raises(DataSourceError, match="at index 0 raised RuntimeError: boom"):
        ProceduralSource(f"{generator_file}:raises").load()


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_colon_here", "expected 'package.module:function'"),
        ("missing_file.py:make", "no file 'missing_file.py'"),
        ("retrain_no_such_module_xyz:make", "No module named"),
        ("retrain.core.records:no_such_function", "has no callable named 'no_such_function'"),
    ],
)
def test_import_errors_name_the_spec(spec, fragment):
    with pytest.raises(DataSourceError) as err:
        import_callable(spec, "generator")
    assert f"generator '{spec}'" in str(err.value)
    assert fragment in str(err.value)


def test_size_below_one_fails(generator_file):
    with pytest.raises(DataSourceError, match="size=0"):
        ProceduralSource(f"{generator_file}:make", size=0)
