"""`PolicyConfig.compile`: the loss's forward runs through `torch.compile` and trains exactly as the
eager forward does (same rollouts, same losses up to float rounding, same weights after the steps),
and the compiled wrapper never reaches a checkpoint."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from retrain.data.datamodule import PromptDataModule
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.grpo import GRPOTrainer


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:  # type: ignore[no-untyped-def]
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _train(model_dir, compile: bool, tmp_path):  # type: ignore[no-untyped-def]
    pl.seed_everything(0, verbose=False)
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(model_dir), compile=compile),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
        num_generations=4, max_completion_length=6, learning_rate=1e-2,
    )
    # prompts of different lengths: the compiled forward sees more than one sequence length
    data = PromptDataModule(prompts=["repeat a: ", "b", "a longer prompt c: ", "dd"], batch_size=2, shuffle=False)
    losses = _Losses()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[losses], default_root_dir=tmp_path, enable_checkpointing=False,
    )
    trainer.fit(algo, datamodule=data)
    return algo, trainer, losses.losses


def test_compiled_policy_trains_like_the_eager_one_and_stays_out_of_checkpoints(tiny_model_dir, tmp_path):
    from torch._dynamo.utils import counters

    eager, _, eager_losses = _train(tiny_model_dir, False, tmp_path / "eager")
    counters.clear()
    compiled, trainer, compiled_losses = _train(tiny_model_dir, True, tmp_path / "compiled")
    assert compiled._compiled_policy is not None and eager._compiled_policy is None
    assert counters["stats"]["unique_graphs"] >= 1  # the loss really ran through a compiled graph
    assert len(compiled_losses) == 3 and any(abs(loss) > 1e-6 for loss in eager_losses)
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), atol=1e-5, rtol=1e-4)
    for (name, a), (_, b) in zip(eager.policy.named_parameters(), compiled.policy.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)

    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    state = torch.load(tmp_path / "compiled.ckpt", weights_only=False)["state_dict"]
    assert state.keys() == eager.state_dict().keys() and not any("_orig_mod" in key for key in state)
