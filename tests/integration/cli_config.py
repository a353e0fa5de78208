"""The quickstart-like config the CLI tests run, and running the real console script on it.

Imported by the tests next to it (pytest puts this directory on sys.path).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml


def quick_config(tmp_path: Path, max_steps: int = 4) -> Path:
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


def run_retrain(tmp_path: Path, *args: str, timeout: int = 300, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [sys.executable, "-m", "retrain.cli", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(csv_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(csv_dir.glob("version_*/metrics.csv")):
        with path.open() as handle:
            rows += list(csv.DictReader(handle))
    return rows
