"""Checkpoints come as often as asked when a generation makes several optimizer updates."""

from __future__ import annotations

import doctest

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from retrain.data.datamodule import PromptDataModule
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer import cadence
from retrain.trainer.grpo import GRPOTrainer


def test_doctests():
    assert doctest.testmod(cadence).failed == 0


def test_every_n_train_steps_is_aligned_to_the_updates_per_generation(tiny_model_dir, tmp_path, caplog):
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "a"})]),
        num_generations=2, max_completion_length=4, learning_rate=1e-3, num_iterations=3,
    )
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", max_steps=9, logger=False, callbacks=[checkpoints], enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level("INFO"):
        trainer.fit(algo, datamodule=PromptDataModule(prompts=["repeat a: ", "repeat b: "], batch_size=1))
    # 3 updates a generation: the step goes 3, 6, 9. Unaligned, every 4 would save only at... 12 (never here).
    assert sorted(p.name for p in tmp_path.glob("step=*.ckpt")) == ["step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]
    assert "ModelCheckpoint(every_n_train_steps=4) saves every 3 optimizer updates instead" in caplog.text
