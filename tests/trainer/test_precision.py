"""Mixed precision: `trainer.precision=bf16-mixed` trains on CPU (autocast around rollouts and loss);
fp16 AMP (`16-mixed`, with a loss scaler) must clip the unscaled gradients."""

import lightning.pytorch as pl
import pytest
import torch

from retrain.data.datamodule import PromptDataModule
from retrain.models.loading import PolicyConfig, load_policy
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.grpo import GRPOTrainer


def test_bf16_mixed_trains_with_a_reference_and_reused_generations(tiny_model_dir):
    torch.manual_seed(0)
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(tiny_model_dir)),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
        num_generations=4, max_completion_length=6, learning_rate=1e-3, beta=0.05, num_iterations=2,
    )
    data = PromptDataModule(prompts=[f"repeat {c}: " for c in "abcd"], batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(algo, datamodule=data)
    assert trainer.global_step == 2
    for key in ("train/loss", "train/kl", "train/entropy"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    # Mixed precision computes in bf16 but keeps (and updates) fp32 master weights.
    assert all(p.dtype == torch.float32 for p in algo.policy.parameters())
    initial = load_policy(PolicyConfig(name_or_path=str(tiny_model_dir)))
    assert any(not torch.equal(p, q) for p, q in zip(algo.policy.parameters(), initial.parameters()))


class _GradNorm(pl.Callback):
    """The gradient norm each optimizer step applies (after the AMP scaler unscales)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


def test_16_mixed_clips_the_unscaled_gradients(tiny_model_dir):
    """fp16 AMP with a loss scaler, on CPU through Lightning's plugin (the `16-mixed` flag needs a GPU)."""
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(tiny_model_dir)),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
        num_generations=4, max_completion_length=6, learning_rate=1e-3, max_grad_norm=1.0,
    )
    probe = _GradNorm()
    trainer = pl.Trainer(
        accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))], max_steps=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )
    trainer.fit(algo, datamodule=PromptDataModule(prompts=[f"repeat {c}: " for c in "abcd"], batch_size=2))
    # Unclipped, this model's gradient norm is about 1 (0.7-1.0); clipped after unscaling it stays there.
    assert len(probe.norms) == 2 and all(norm > 1e-3 for norm in probe.norms), probe.norms
