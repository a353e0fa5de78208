"""configs/reasoning_gym.yaml end to end: reasoning-gym prompts, its own scorer as the reward, and
in-training validation with pass@k / maj@k, through the real `retrain fit` CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_reasoning_gym_config_trains_and_validates(tmp_path):
    os.symlink(REPO / "configs", tmp_path / "configs")
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "retrain.cli", "fit", "--config", "configs/reasoning_gym.yaml",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
        "--model.init_args.num_generations", "2", "--model.init_args.eval_num_generations", "2",
        "--data.init_args.batch_size", "2",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "outputs/reasoning_gym/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    [metrics_file] = (tmp_path / "outputs/reasoning_gym/csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    validated = [r for r in rows if r.get("val/pass@2")]
    assert validated, "no validation ran"
    for name in ("val/pass@2", "val/maj@2", "val/reward"):
        assert 0.0 <= float(validated[0][name]) <= 1.0
    trained = [r for r in rows if r.get("train/rewards/reasoning_gym_score")]
    assert len(trained) == 3 and all(math.isfinite(float(r["train/loss"])) for r in trained)


def test_retrain_validate_runs_the_held_out_split(tmp_path):
    os.symlink(REPO / "configs", tmp_path / "configs")
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "retrain.cli", "validate", "--config", "configs/reasoning_gym.yaml",
        "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
        "--model.init_args.eval_num_generations", "2", "--data.init_args.batch_size", "2",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/pass@2" in result.stdout and "val/maj@2" in result.stdout


def test_the_reasoning_skill_recipe_warm_starts_then_trains_and_validates_held_out(tmp_path):
    """examples/warm_start_sft.py (TRL's SFTTrainer, a few steps here) writes a model that
    configs/reasoning_skill.yaml then trains with GRPO, validating on the held-out split."""
    os.symlink(REPO / "configs", tmp_path / "configs")
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    warm = subprocess.run(
        [sys.executable, str(REPO / "examples" / "warm_start_sft.py"), "--steps", "3", "--train-size", "64", "--batch-size", "8"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert (tmp_path / "outputs/spell_backward_warm_start/config.json").is_file()  # where the config loads it from
    command = [
        sys.executable, "-m", "retrain.cli", "fit", "--config", "configs/reasoning_skill.yaml",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--model.init_args.num_generations", "2", "--data.init_args.batch_size", "2",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [metrics_file] = (tmp_path / "outputs/reasoning_skill/csv").glob("version_*/metrics.csv")
    validated = [r for r in csv.DictReader(metrics_file.open()) if r.get("val/pass@1")]
    assert validated and 0.0 <= float(validated[0]["val/pass@1"]) <= float(validated[0]["val/pass@4"]) <= 1.0
    # The validation curve: the warm start (the config's full sanity check, step 0), then step 2.
    curves = json.loads((tmp_path / "outputs/reasoning_skill/reward_curve.json").read_text())
    assert curves["validation"]["metric"] == "val/pass@1" and curves["validation"]["curve"]["step"] == [0, 2]
    assert abs(curves["validation"]["curve"]["value"][1] - float(validated[-1]["val/pass@1"])) < 1e-6
    assert (tmp_path / "outputs/reasoning_skill/validation_curve.png").stat().st_size > 0
    assert "val/pass@1: " in result.stdout and "validation_curve.png" in result.stdout
