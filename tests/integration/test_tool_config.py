"""configs/tool_calculator.yaml end to end: the real tiny model, a real MCP calculator server over
stdio, multi-turn rollouts, through the real `retrain fit` CLI."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tool_calculator_config_trains_with_the_mcp_server(tmp_path):
    os.symlink(REPO / "configs", tmp_path / "configs")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "retrain.cli", "fit", "--config", "configs/tool_calculator.yaml",
        "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [metrics_file] = (tmp_path / "outputs" / "tool_calculator" / "csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    assert len(rows) == 2
    for row in rows:
        for name in ("train/env/tool_calls", "train/env/tool_errors", "train/env/parse_errors", "train/turns",
                     "train/step_reward", "train/policy_token_fraction", "train/rewards/numeric_match", "train/rewards/tool_use"):
            assert math.isfinite(float(row[name])), name
        assert 1.0 <= float(row["train/turns"]) <= 3.0
        assert 0.0 < float(row["train/policy_token_fraction"]) <= 1.0
    assert (tmp_path / "outputs" / "tool_calculator" / "checkpoints" / "last.ckpt").is_file()
