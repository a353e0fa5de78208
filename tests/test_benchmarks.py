"""Smoke test of benchmarks/throughput.py: both libraries run the smallest configuration end to end.

Checks the program, not the numbers: each library's row exists and is finite and positive, and every
step did the same work (the benchmark itself fails if a completion stopped short of its budget).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("trl")
pytest.importorskip("datasets")


def test_throughput_smoke(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--steps", "2", "--repeats", "1", "--model-size", "tiny",
        "--generations", "2", "--prompts", "2", "--completion-length", "4", "--out-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    record = json.loads((tmp_path / "throughput.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1])["results"] == record["results"]  # last line: the JSON summary
    assert "| retrain |" in (tmp_path / "throughput.md").read_text()
    assert record["config"]["completion_tokens_per_step"] == 2 * 2 * 4
    for library in ("retrain", "trl"):
        row = record["results"][library]
        for key in ("seconds_per_step", "completion_tokens_per_second", "peak_rss_mb", "fraction_of_flop_floor", "cpu_seconds_per_step"):
            assert math.isfinite(row[key]) and row[key] > 0, (library, key, row[key])
        runs = [r for r in record["runs"] if r["library"] == library]
        assert len(runs) == 1 and len(runs[0]["step_seconds"]) == 2
        assert runs[0]["completion_tokens_per_step"] == [16, 16, 16]  # warm-up + 2 timed steps, all full length
    assert all(math.isfinite(v) and v > 0 for v in record["results"]["retrain"]["ratio_vs_trl"].values())
    assert record["flop_floor"]["flops_per_step"] > 0 and record["model"]["parameters"] > 0
