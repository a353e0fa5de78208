"""`retrain fit` with packed rows and a token budget per pass: the same run as the padded default
(same samples, same losses), and bad values refused before the model loads."""

from __future__ import annotations

import pytest

from cli_config import quick_config, read_metrics, run_retrain


def _losses(tmp_path, *options: str) -> list[float]:
    config = quick_config(tmp_path, max_steps=3)
    result = run_retrain(tmp_path, "fit", "--config", str(config), "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    return [float(row["train/loss"]) for row in read_metrics(tmp_path / "out" / "csv")]


def test_packed_rows_in_token_budgeted_passes_train_like_the_padded_default(tmp_path):
    (tmp_path / "padded").mkdir()
    (tmp_path / "packed").mkdir()
    padded = _losses(tmp_path / "padded")
    packed = _losses(
        tmp_path / "packed", "--model.init_args.pack_rows", "true", "--model.init_args.micro_batch_tokens", "24",
        "--model.init_args.policy.attn_implementation", "eager",
    )
    assert len(padded) == len(packed) == 3
    assert packed == pytest.approx(padded, abs=1e-5)  # three updates later, still the same run


def test_a_token_budget_below_one_is_refused_before_the_model_loads(tmp_path):
    config = quick_config(tmp_path, max_steps=1)
    result = run_retrain(tmp_path, "fit", "--config", str(config), "--model.init_args.micro_batch_tokens", "0")
    assert result.returncode != 0
    assert "micro_batch_tokens=0" in result.stderr and not (tmp_path / "model").exists()
