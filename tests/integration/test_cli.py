"""End to end through the real console script: `retrain fit` on the tiny model, W&B offline."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

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


def _config(tmp_path: Path, max_steps: int = 4) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": [
                {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "retrain-test", "save_dir": "out", "offline": True}},
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "out", "name": "csv"}},
            ],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "out/checkpoints", "every_n_train_steps": 2, "save_last": True}},
                {"class_path": "retrain.callbacks.RewardCurve", "init_args": {"output_dir": "out"}},
                {"class_path": "retrain.callbacks.CompletionsTable", "init_args": {"every_n_steps": 2}},
            ],
        },
        "model": {
            "class_path": "retrain.GRPOTrainer",
            "init_args": {
                "policy": {"name_or_path": "model", "tiny": {"hidden_size": 32, "intermediate_size": 64}},
                "reward": {
                    "rewards": [
                        {"name": "retrain.tasks.repeat_letter:letter_fraction", "verifiers": ["non_empty"]},
                    ]
                },
                "num_generations": 4,
                "max_completion_length": 6,
                "learning_rate": 1e-3,
                "beta": 0.05,
                "lr_scheduler_type": "linear",
            },
        },
        "data": {
            "class_path": "retrain.PromptDataModule",
            "init_args": {"path": "prompts.jsonl", "batch_size": 2},
        },
    }
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "repeat {c}: ", "answer": "{c}"}}\n' for c in "abcde"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _retrain(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "retrain.cli", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(csv_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(csv_dir.glob("version_*/metrics.csv")):
        with path.open() as handle:
            rows += list(csv.DictReader(handle))
    return rows


def test_fit_writes_checkpoints_wandb_run_and_finite_metrics_then_resumes(tmp_path):
    config = _config(tmp_path, max_steps=4)
    result = _retrain(tmp_path, "fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]

    out = tmp_path / "out"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "no offline W&B run was written"
    assert (out / "reward_curve.png").stat().st_size > 0 and (out / "reward_curve.json").is_file()
    assert "retrain: 4 steps" in result.stdout

    rows = _metrics(out / "csv")
    assert len(rows) == 4
    assert EXPECTED_METRICS <= set(rows[0])
    for row in rows:
        for name in EXPECTED_METRICS:
            assert math.isfinite(float(row[name])), f"{name} = {row[name]}"
    assert float(rows[-1]["train/learning_rate"]) < float(rows[0]["train/learning_rate"])  # linear decay

    # Resume from the last checkpoint: the step counter continues from 4, not from 0.
    result = _retrain(tmp_path, "fit", "--config", str(config), "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    resumed = _metrics(out / "csv")[4:]
    assert [int(r["step"]) for r in resumed] == [4, 5]
    assert "retrain: 6 steps" in result.stdout  # the reward curve spans the whole run


def test_help_explains_the_options(tmp_path):
    result = _retrain(tmp_path, "fit", "--model.help", "retrain.GRPOTrainer")
    assert result.returncode == 0, result.stderr
    assert "--model.num_generations" in result.stdout
    assert "rollouts per prompt" in result.stdout
    assert "a Hugging Face hub id" in result.stdout  # a dataclass field's documentation


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--model.init_args.num_generation", "4"], "num_generation"),
        (["--model.init_args.num_generations", "four"], "num_generations"),
        (["--model.init_args.loss_type", "ppo"], "loss_type"),
        (["--data.init_args.path", "missing.jsonl"], "missing.jsonl"),
    ],
)
def test_bad_config_fails_before_the_model_is_loaded(tmp_path, override, expected):
    config = _config(tmp_path)
    result = _retrain(tmp_path, "fit", "--config", str(config), *override)
    assert result.returncode != 0
    assert expected in result.stderr
    assert not (tmp_path / "model").exists(), "the model was built before the config error was reported"


def test_malformed_prompt_line_names_file_and_line_before_model_load(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a", "answer": "a"}\n{"prompt": "b", \n')
    result = _retrain(tmp_path, "fit", "--config", str(config))
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
