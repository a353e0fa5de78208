"""Smoke tests of the benchmarks: both libraries run the smallest configuration end to end.

Checks the programs, not the numbers. throughput.py: each library's row exists and is finite and
positive, and every step did the same work (the benchmark itself fails if a completion stopped short
of its budget). learning.py: each library has a reward for every step, and the table and plot are
written. sampling.py: every draw is timed at each vocabulary and kind of row, and the whole
generation runs through each variant.
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


def test_throughput_with_a_padded_vocabulary_and_natural_lengths_smoke(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--steps", "2", "--repeats", "1", "--model-size", "tiny",
        "--generations", "4", "--prompts", "2", "--completion-length", "24", "--vocab-size", "2000", "--end-probability", "0.1",
        "--top-p", "0.9", "--out-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "throughput.json").read_text())
    assert record["config"]["vocab_size"] == record["model"]["vocab_size"] == 2000
    # the end token's edited logit gives lengths around 1 / 0.1 (capped at 24): far below the cap, and varied
    assert 3 < record["config"]["mean_completion_length"] < 18
    for library in ("retrain", "trl"):
        assert 0 < record["results"][library]["completion_tokens_per_step"] < 2 * 4 * 24
    assert "natural completion lengths" in (tmp_path / "throughput.md").read_text()
    assert record["config"]["top_p"] == 0.9 and "top_p 0.9" in (tmp_path / "throughput.md").read_text()


def test_throughput_smoke(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--steps", "2", "--repeats", "1", "--model-size", "tiny",
        "--generations", "2", "--prompts", "2", "--completion-length", "4", "--out-dir", str(tmp_path),
        "--micro-batch-size", "2",  # both libraries accumulate two micro-batches per step (the default path is micro = all)
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    record = json.loads((tmp_path / "throughput.json").read_text())
    assert record["config"]["micro_batch_size"] == 2 and record["config"]["generation_backend"] == "auto"
    assert json.loads(done.stdout.strip().splitlines()[-1])["results"] == record["results"]  # last line: the JSON summary
    assert "| retrain |" in (tmp_path / "throughput.md").read_text()
    assert record["config"]["completion_tokens_per_step"] == 2 * 2 * 4
    for library in ("retrain", "trl"):
        row = record["results"][library]
        for key in ("seconds_per_step", "completion_tokens_per_second", "peak_rss_mb", "fraction_of_flop_floor", "cpu_seconds_per_step"):
            assert math.isfinite(row[key]) and row[key] > 0, (library, key, row[key])
        runs = [r for r in record["runs"] if r["library"] == library]
        assert len(runs) == 1 and len(runs[0]["step_seconds"]) == 2
        assert runs[0]["completion_tokens_per_step"] == [16, 16]  # the 2 timed steps, all full length
    assert all(math.isfinite(v) and v > 0 for v in record["results"]["retrain"]["ratio_vs_trl"].values())
    assert record["flop_floor"]["flops_per_step"] > 0 and record["model"]["parameters"] > 0
    split = record["retrain_breakdown"]  # where retrain's step goes: every phase measured, none over the step
    assert set(split["seconds"]) == {"generation", "rollout_rest", "forward_and_loss", "backward", "optimizer_and_loop"}
    assert split["seconds"]["generation"] > 0 and split["seconds"]["backward"] > 0
    assert all(share >= 0 for share in split["share_of_step"].values()) and sum(split["share_of_step"].values()) >= 0.95


def test_learning_smoke(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "learning.py"), "--steps", "2", "--seeds", "0", "--prompts", "2",
        "--generations", "2", "--completion-length", "4", "--out-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    record = json.loads((tmp_path / "learning.json").read_text())
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # last line: the JSON summary
    assert summary["results"] == record["results"] and summary["verdict"] == record["verdict"]
    assert "| retrain |" in (tmp_path / "learning.md").read_text()
    assert (tmp_path / "learning.png").read_bytes().startswith(b"\x89PNG")
    assert record["config"]["steps"] == 2 and record["config"]["seeds"] == [0]
    for library in ("retrain", "trl"):
        runs = [r for r in record["runs"] if r["library"] == library]
        assert len(runs) == 1 and len(runs[0]["rewards"]) == 2
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in runs[0]["rewards"]), runs[0]["rewards"]
        row = record["results"][library]
        assert 0.0 <= row["last_10pct_reward"] <= 1.0 and row["train_seconds_per_run"] > 0
    assert isinstance(record["verdict"]["learns_at_least_as_well"], bool)


def test_learning_skill_smoke(tmp_path: Path) -> None:
    """`--task skill`: the recipe's warm start (a few SFT steps here), then both libraries from it, each
    scored by the one held-out evaluator before training and after every step."""
    warm = subprocess.run(
        [sys.executable, str(REPO / "examples" / "warm_start_sft.py"), "--steps", "2", "--train-size", "32", "--batch-size", "8",
         "--out", str(tmp_path / "warm")],
        capture_output=True, text=True, timeout=300,
    )
    assert warm.returncode == 0, warm.stderr[-4000:]
    command = [
        sys.executable, str(REPO / "benchmarks" / "learning.py"), "--task", "skill", "--warm-start", str(tmp_path / "warm"),
        "--steps", "2", "--seeds", "0", "--prompts", "2", "--generations", "2", "--eval-every", "1", "--heldout", "6",
        "--out-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    record = json.loads((tmp_path / "learning_skill.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1])["results"] == record["results"]
    assert record["config"]["task_name"] == "spell_backward" and record["config"]["heldout_problems"] == 6
    assert "| retrain |" in (tmp_path / "learning_skill.md").read_text()
    assert (tmp_path / "learning_skill.png").read_bytes().startswith(b"\x89PNG")
    for library in ("retrain", "trl"):
        row = record["results"][library]
        [seed] = row["seeds"]
        assert [e["step"] for e in seed["heldout"]] == [0, 1, 2]  # before training, then after each step
        assert all(0.0 <= e["pass@1"] <= e["pass@4"] <= 1.0 and 0.0 <= e["maj@4"] <= 1.0 for e in seed["heldout"])
        assert row["pass@1_start"] == seed["pass@1_start"] == seed["heldout"][0]["pass@1"]
        assert row["pass@1_end"] == seed["heldout"][-1]["pass@1"] and row["train_seconds_per_run"] > 0
    # both start from the same weights and draw the same held-out samples at step 0
    assert record["results"]["retrain"]["pass@1_start"] == record["results"]["trl"]["pass@1_start"]
    assert all(isinstance(record["verdict"][k], bool) for k in ("retrain_gain_reaches_target", "at_least_as_fast"))


def test_generation_smoke(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "generation.py"), "--rows", "3", "--tokens", "4", "--model-size", "tiny",
        "--repeats", "1", "--out-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    record = json.loads((tmp_path / "generation.json").read_text())
    assert "| lora |" in (tmp_path / "generation.md").read_text()
    for policy in ("plain", "lora"):
        row = record["results"][policy]
        assert row["own_decoder_used"]  # the LoRA policy too
        assert all(math.isfinite(s) and s > 0 for s in row["seconds_per_call"].values())
    assert record["results"]["plain"]["same_tokens"]  # same weights, same rules, same seed


def test_generation_at_a_padded_vocabulary_with_top_p_smoke(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "generation.py"), "--rows", "3", "--tokens", "4", "--model-size", "tiny",
        "--repeats", "1", "--vocab-size", "3000", "--top-p", "0.9", "--policies", "plain", "--out-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    record = json.loads((tmp_path / "generation.json").read_text())
    assert record["model"]["vocab_size"] == record["config"]["vocab_size"] == 3000 and record["config"]["top_p"] == 0.9
    assert set(record["results"]) == {"plain"} and "| lora |" not in (tmp_path / "generation.md").read_text()
    assert record["results"]["plain"]["same_tokens"]  # `generate`'s top-p warper on both sides


def test_sampling_smoke(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "sampling.py"), "--vocab", "50", "1200", "--rows", "4", "--steps", "2",
        "--tokens", "3", "--top-p", "0.9", "--out-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    record = json.loads((tmp_path / "sampling.json").read_text())
    assert [(r["vocab"], r["kind"]) for r in record["draw_step"]] == [(50, "peaked"), (50, "flat"), (1200, "peaked"), (1200, "flat")]
    for row in record["draw_step"]:
        assert all(math.isfinite(ms) and ms > 0 for ms in row["ms"].values())
        assert 1 <= row["nucleus_size_top_p_0.9"] <= row["vocab"]
    flat = record["draw_step"][-1]
    assert flat["nucleus_size_top_p_0.9"] > 0.8 * 1200  # a flat row's nucleus is most of the vocabulary
    [generation] = record["generation"]  # only vocabularies of at least --generation-min-vocab (1000)
    assert generation["vocab"] == 1200 and all(s > 0 for s in generation["seconds"].values())
    assert "| 1,200 |" in (tmp_path / "sampling.md").read_text()


def test_mismatch_smoke(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "mismatch.py"), "--rows", "3", "--tokens", "6", "--model-size", "tiny",
        "--out-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "mismatch.json").read_text())
    float32 = record["results"]["auto/float32"]
    assert float32["own_decoder_used"] and abs(float32["kl"]) < 1e-6  # the decoder samples the trainer's distribution
    assert all(math.isfinite(m["kl"]) for m in record["results"].values())
    assert "| retrain decoder | bfloat16 |" in (tmp_path / "mismatch.md").read_text()


def test_lm_head_smoke(tmp_path: Path) -> None:
    command = [sys.executable, str(REPO / "benchmarks" / "lm_head.py"), "--vocab", "100", "--rows", "2", "--tokens", "8", "--repeats", "1", "--out-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "lm_head.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1])["results"] == record["results"]
    row = record["results"]["100x8"]
    for mode in ("full", "chunked", "trl"):  # both libraries' loss paths ran
        assert row[mode]["peak_rss_mb"] > 0 and len(row[mode]["seconds"]) == 1 and math.isfinite(row[mode]["seconds"][0])
    assert row["chunked"]["loss"] == pytest.approx(row["trl"]["loss"], abs=1e-5)  # the same loss, computed two ways
    assert row["full"]["loss"] == pytest.approx(row["trl"]["loss"], abs=1e-5)
    assert "| 100 | 8 |" in (tmp_path / "lm_head.md").read_text()


def test_agent_endpoint_smoke(tmp_path: Path) -> None:
    command = [
        sys.executable, str(REPO / "benchmarks" / "agent_endpoint.py"), "--model-size", "tiny", "--prompts", "2", "--generations", "2",
        "--turns", "2", "--tokens", "4", "--repeats", "1", "--out-dir", str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "agent_endpoint.json").read_text())
    assert record["same_work"]  # both sides trained on the same token layout
    for side in ("built-in", "agent"):
        assert record["results"][side]["generate_calls_per_phase"] == 2  # one batched call per turn
    assert math.isfinite(record["agent_over_builtin"]) and record["agent_over_builtin"] > 0
