"""End to end through the real console script: `retrain fit` on the tiny model, W&B offline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_config import quick_config, read_metrics, run_retrain

REPO = Path(__file__).resolve().parents[2]
EXPECTED_METRICS = {
    "train/loss",
    "train/reward",
    "train/reward_std",
    "train/rewards/letter_fraction",
    "train/verifiers/non_empty",
    "train/completion_length",
    "train/entropy",
    "train/clip_ratio",
    "train/kl",
    "train/learning_rate",
    "train/tokens_per_second",
}


def test_fit_writes_checkpoints_wandb_run_and_finite_metrics_then_resumes(tmp_path):
    config = quick_config(tmp_path, max_steps=4)
    result = run_retrain(tmp_path, "fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "out"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "no offline W&B run was written"
    assert (out / "reward_curve.png").stat().st_size > 0 and (out / "reward_curve.json").is_file()
    assert "retrain: 4 steps" in result.stdout

    rows = read_metrics(out / "csv")
    assert len(rows) == 4
    assert EXPECTED_METRICS <= set(rows[0])
    for row in rows:
        for name in EXPECTED_METRICS:
            assert math.isfinite(float(row[name])), f"{name} = {row[name]}"
    assert float(rows[-1]["train/learning_rate"]) < float(rows[0]["train/learning_rate"])  # linear decay

    # Resume from the last checkpoint: the step counter continues from 4, not from 0.
    result = run_retrain(tmp_path, "fit", "--config", str(config), "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    resumed = read_metrics(out / "csv")[4:]
    assert [int(r["step"]) for r in resumed] == [5, 6]  # rows are labelled by updates done
    assert "retrain: 6 steps" in result.stdout  # the reward curve spans the whole run


def test_help_explains_the_options(tmp_path):
    result = run_retrain(tmp_path, "fit", "--model.help", "retrain.GRPOTrainer")
    assert result.returncode == 0, result.stderr
    assert "--model.num_generations" in result.stdout
    assert "rollouts per prompt" in result.stdout
    assert "a Hugging Face hub id" in result.stdout  # a dataclass field's documentation


def test_malformed_prompt_line_names_file_and_line_before_model_load(tmp_path):
    config = quick_config(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a", "answer": "a"}\n{"prompt": "b", \n')
    result = run_retrain(tmp_path, "fit", "--config", str(config))
    assert result.returncode != 0
    assert "prompts.jsonl:2" in result.stderr
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    result = subprocess.run(
        [sys.executable, "-m", "retrain.cli", "fit", "--config", str(path), "--print_config"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: retrain." in result.stdout


def test_ctrl_c_keeps_the_checkpoint_writes_the_curve_and_the_resume_logs_the_same_steps(tmp_path):
    # The reward sends this process a real SIGINT (what Ctrl-C does) in the middle of step 3.
    (tmp_path / "interrupting.py").write_text(
        "import os, signal\n"
        "from retrain.tasks.repeat_letter import letter_fraction\n"
        "calls = 0\n\n"
        "def reward(completion, answer, **kwargs):\n"
        "    global calls\n    calls += 1\n"
        "    if calls == int(os.environ.get('INTERRUPT_AT_CALL', 0)):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return letter_fraction(completion=completion, answer=answer)\n"
    )
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    for run in (reference, interrupted):
        run.mkdir()
        (run / "interrupting.py").write_text((tmp_path / "interrupting.py").read_text())
        config = quick_config(run, max_steps=4)
        config.write_text(config.read_text().replace("retrain.tasks.repeat_letter:letter_fraction", "interrupting.py:reward"))
    assert run_retrain(reference, "fit", "--config", "config.yaml").returncode == 0

    stopped = run_retrain(interrupted, "fit", "--config", "config.yaml", env={"INTERRUPT_AT_CALL": "17"})  # 8 rollouts a step
    assert stopped.returncode == 1, stopped.stderr[-2000:]
    assert "stopped by KeyboardInterrupt after step 2" in stopped.stdout
    curve = json.loads((interrupted / "out" / "reward_curve.json").read_text())
    assert curve["curve"]["step"] == [1, 2] and curve["stopped_by"] == "KeyboardInterrupt"
    assert torch.load(interrupted / "out" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    resumed = run_retrain(interrupted, "fit", "--config", "config.yaml", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = {r["step"]: r["train/reward"] for r in read_metrics(reference / "out" / "csv")}
    got = {r["step"]: r["train/reward"] for r in read_metrics(interrupted / "out" / "csv")}
    assert list(expected) == ["1", "2", "3", "4"]
    assert got == expected, "the resumed run's rows are not the uninterrupted run's, step for step"
