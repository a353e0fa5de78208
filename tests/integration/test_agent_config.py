"""configs/agent_calculator.yaml end to end: an agent written only against the official `openai`
SDK (examples/calculator_agent.py) trains through the real `retrain fit` CLI, its calls going over
real HTTP to the policy endpoint, sampled from the real tiny model."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_agent_calculator_config_trains_an_openai_sdk_agent(tmp_path):
    for name in ("configs", "examples"):
        os.symlink(REPO / name, tmp_path / name)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "retrain.cli", "fit", "--config", "configs/agent_calculator.yaml",
        "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # a clean console
    [metrics_file] = (tmp_path / "outputs" / "agent_calculator" / "csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    assert len(rows) == 2
    for row in rows:
        assert float(row["train/env/calls"]) >= 1.0
        assert float(row["train/env/samples"]) >= 1.0
        assert float(row["train/env/agent_errors"]) == 0.0
        for name in ("train/loss", "train/rewards/agent_reward", "train/completion_length"):
            assert math.isfinite(float(row[name])), name
    assert (tmp_path / "outputs" / "agent_calculator" / "checkpoints" / "last.ckpt").is_file()
