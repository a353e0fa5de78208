"""A resumed run sees exactly the prompts an uninterrupted run would: real `lightning.Trainer` fits.

Run A trains N steps with a checkpoint every k steps. Run B resumes from A's step-k checkpoint and
trains to N. B's batches must be A's batches k..N-1, prompt for prompt. Lightning fetches one batch
ahead of the one it trains on, so the tests also check that the DataLoader had read further than
the checkpoint records: counting records where the DataLoader reads them would resume too late.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from retrain.data import ProceduralSource, PromptDataModule, PromptRecord

LETTERS = [chr(ord("a") + i) for i in range(10)]
STEPS, EVERY = 7, 3
BATCH = 4


class PromptRecorder(pl.LightningModule):
    """The smallest trainable module: records the prompts of each training and validation batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_batches: list[tuple[int, list]] = []
        self.val_batches: list[list] = []

    def training_step(self, batch: list[PromptRecord], batch_idx: int) -> torch.Tensor:
        self.train_batches.append((self.global_step, [record.prompt for record in batch]))
        return (self.weight - 1.0).pow(2).sum()

    def validation_step(self, batch: list[PromptRecord], batch_idx: int) -> None:
        self.val_batches.append([record.prompt for record in batch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FetchedAtSave(Callback):
    """Notes, at each checkpoint, how far the DataLoader had read and what the data module saved."""

    def __init__(self) -> None:
        self.saves: list[tuple[int, int, dict]] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        fetched = trainer.datamodule.train_stream.fetched
        self.saves.append((trainer.global_step, fetched, dict(checkpoint["PromptDataModule"])))


def make_data(kind: str, tmp_path: Path) -> PromptDataModule:
    if kind == "list":
        return PromptDataModule(prompts=LETTERS, val_prompts=["v1", "v2", "v3"], batch_size=BATCH, seed=1)
    generator = tmp_path / "gen.py"
    generator.write_text("def make(rng, index):\n    return f'{index}:{rng.randint(0, 999)}'\n", encoding="utf-8")
    return PromptDataModule(source=ProceduralSource(f"{generator}:make", seed=3), val_prompts=["v1", "v2", "v3"], batch_size=BATCH)


def fit(kind: str, tmp_path: Path, ckpt_path=None) -> tuple[PromptRecorder, FetchedAtSave]:
    module, probe = PromptRecorder(), FetchedAtSave()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        val_check_interval=2,  # validation mid-run must not move the training stream
        check_val_every_n_epoch=None,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=EVERY, save_last=True, save_top_k=-1), probe],
    )
    trainer.fit(module, datamodule=make_data(kind, tmp_path), ckpt_path=ckpt_path)
    return module, probe


@pytest.mark.parametrize("kind", ["list", "procedural"])
def test_resumed_run_sees_the_prompts_of_the_uninterrupted_run(tmp_path, kind):
    uninterrupted, probe = fit(kind, tmp_path)
    assert [step for step, _ in uninterrupted.train_batches] == list(range(STEPS))

    step, fetched, saved = probe.saves[0]
    assert step == EVERY and saved["records_consumed"] == EVERY * BATCH
    assert fetched == (EVERY + 1) * BATCH  # Lightning had prefetched one batch more than it trained on

    resumed, _ = fit(kind, tmp_path, ckpt_path=str(tmp_path / "ckpt" / f"epoch=0-step={EVERY}.ckpt"))
    assert resumed.train_batches == uninterrupted.train_batches[EVERY:]

    assert resumed.val_batches and all(batch == ["v1", "v2", "v3"] for batch in resumed.val_batches)
    if kind == "list":  # every pass still covers the records once, across the resume
        prompts = [p for _, batch in uninterrupted.train_batches for p in batch]
        assert sorted(prompts[:10]) == sorted(prompts[10:20]) == LETTERS


def test_resume_from_last_checkpoint_continues_past_the_first_run(tmp_path):
    uninterrupted = PromptRecorder()
    pl.Trainer(max_steps=2 * STEPS, logger=False, enable_progress_bar=False, enable_checkpointing=False).fit(
        uninterrupted, datamodule=make_data("list", tmp_path)
    )
    fit("list", tmp_path)
    last = tmp_path / "ckpt" / "last.ckpt"
    step = torch.load(last, weights_only=False)["global_step"]
    assert step == EVERY * (STEPS // EVERY)  # last.ckpt is the latest every-k save
    resumed = PromptRecorder()
    trainer = pl.Trainer(max_steps=2 * STEPS, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(resumed, datamodule=make_data("list", tmp_path), ckpt_path=str(last))
    assert resumed.train_batches == uninterrupted.train_batches[step:]


# --------------------------------------------------------------------------- the real CLI

PROMPT_LOG = '''
import threading
_lock = threading.Lock()

def log_prompt(prompt, **_):
    with _lock, open("prompts.log", "a", encoding="utf-8") as handle:
        handle.write(prompt + "\\n")
    return 0.0
'''


def _cli_config(tmp_path: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 4, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [{
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": "ckpt", "every_n_train_steps": 2, "save_last": True, "save_top_k": -1},
            }],
        },
        "model": {
            "class_path": "retrain.GRPOTrainer",
            "init_args": {
                "policy": {"name_or_path": "model", "tiny": {"hidden_size": 16, "intermediate_size": 32}},
                "reward": {"rewards": [{"name": "rewards.py:log_prompt"}]},
                "num_generations": 2,
                "max_completion_length": 2,
            },
        },
        "data": {
            "class_path": "retrain.PromptDataModule",
            "init_args": {"prompts": [f"p{i}" for i in range(7)], "batch_size": 3, "seed": 5},
        },
    }
    (tmp_path / "rewards.py").write_text(PROMPT_LOG, encoding="utf-8")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _retrain_fit(tmp_path: Path, *args: str) -> list[Counter]:
    """Run `retrain fit`; return the prompts each generation scored (a multiset: rewards run concurrently)."""
    log = tmp_path / "prompts.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "retrain.cli", "fit", "--config", "config.yaml", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = log.read_text(encoding="utf-8").splitlines()
    per_step = 3 * 2  # batch_size x num_generations
    return [Counter(lines[i : i + per_step]) for i in range(0, len(lines), per_step)]


def test_retrain_fit_resume_sees_the_same_prompts(tmp_path):
    _cli_config(tmp_path)
    uninterrupted = _retrain_fit(tmp_path)
    assert len(uninterrupted) == 4
    resumed = _retrain_fit(tmp_path, "--ckpt_path", "ckpt/epoch=0-step=2.ckpt")
    assert resumed == uninterrupted[2:]
