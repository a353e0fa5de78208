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

import pytest

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


SPLITTING_AGENT = '''
import os


async def agent(client, record):
    """Rank 0's episodes are two samples each (the second call does not continue the first), rank
    1's one: the ranks have different numbers of rows to train."""
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": record.prompt}], max_tokens=4)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": record.prompt + "?"}], max_tokens=4)
    return 1.0 if len(record.prompt) % 2 else 0.0
'''


STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    # FSDP2 with the parameters sharded while decoding: ranks with fewer generate calls join the
    # others' rounds (`LockstepGeneration.drain`).
    "fsdp2": [
        "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.init_args.data_parallel_size", "2", "--trainer.strategy.init_args.tensor_parallel_size", "1",
        "--model.init_args.policy.sharded_generation", "sharded",
    ],
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_agents_on_two_processes_each_rank_serves_its_own_endpoint_and_unequal_rows_train(tmp_path, strategy):
    for name in ("configs", "examples"):
        os.symlink(REPO / name, tmp_path / name)
    (tmp_path / "splitting_agent.py").write_text(SPLITTING_AGENT)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "retrain.cli", "fit", "--config", "configs/agent_calculator.yaml",
        "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", *STRATEGIES[strategy],
        "--trainer.devices", "2", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", "outputs/agent_ddp", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
        "--model.init_args.environment.init_args.agent", "splitting_agent.py:agent", "--model.init_args.micro_batch_size", "2",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [metrics_file] = (tmp_path / "outputs" / "agent_ddp").glob("lightning_logs/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_file.open()))
    assert len(rows) == 2
    for row in rows:
        assert float(row["train/env/samples"]) == 2.0  # rank 0's (train metrics are logged from rank 0; rank 1 has 1)
        assert math.isfinite(float(row["train/loss"]))
