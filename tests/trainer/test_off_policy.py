"""The sampler/trainer mismatch is logged every step, on-policy and with reused generations; with
retrain's decoder in float32 it reads ~0."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from retrain.data.datamodule import PromptDataModule
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.grpo import GRPOTrainer


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["on-policy", "reused"])
@pytest.mark.parametrize("backend", ["auto", "transformers"])
def test_mismatch_metrics_are_logged_and_near_zero_in_float32(tiny_model_dir, num_iterations, backend):
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(tiny_model_dir)),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "a"})]),
        num_generations=4, max_completion_length=6, learning_rate=1e-3, num_iterations=num_iterations, generation_backend=backend,
    )
    trainer = pl.Trainer(accelerator="cpu", max_steps=2 * num_iterations, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(algo, datamodule=PromptDataModule(prompts=["repeat a: ", "repeat b: "], batch_size=2))
    metrics = trainer.callback_metrics
    assert {"train/sampler/kl", "train/sampler/ratio_mean", "train/sampler/ratio_max", "train/sampler/ratio_min"} <= set(metrics)
    assert abs(float(metrics["train/sampler/kl"])) < 1e-6
    assert abs(float(metrics["train/sampler/ratio_max"]) - 1) < 1e-3 and abs(float(metrics["train/sampler/ratio_min"]) - 1) < 1e-3


def test_correction_weights_by_hand():
    import math

    import torch

    from retrain.trainer.off_policy import sampler_correction_weights

    # log pi - log mu per token: row 0: log 4, log 0.5, (env token); row 1: log 1.2, log 0.1.
    trainer = torch.log(torch.tensor([[0.8, 0.1, 0.5], [0.6, 0.01, 0.5]]))
    sampler = torch.log(torch.tensor([[0.2, 0.2, 0.9], [0.5, 0.1, 0.9]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    token = lambda mode, lo, hi: sampler_correction_weights(trainer, sampler, mask, mode, lo, hi)  # noqa: E731
    # token ratios: [4, 0.5, 1 (off the mask)], [1.2, 0.1, 1]
    assert torch.allclose(token("token_truncate", None, 3.0), torch.tensor([[3.0, 0.5, 1.0], [1.2, 0.1, 1.0]]))
    assert torch.allclose(token("token_truncate", 0.2, 3.0), torch.tensor([[3.0, 0.5, 1.0], [1.2, 0.2, 1.0]]))
    assert torch.allclose(token("token_mask", 0.2, 3.0), torch.tensor([[0.0, 0.5, 1.0], [1.2, 0.0, 1.0]]))
    # sequence ratios: 4 x 0.5 = 2; 1.2 x 0.1 = 0.12
    assert torch.allclose(token("sequence_truncate", 0.5, 1.5), torch.tensor([[1.5], [0.5]]))
    assert torch.allclose(token("sequence_mask", 0.1, 3.0), torch.tensor([[2.0], [0.12]]))
    assert torch.allclose(token("sequence_mask", 0.5, 3.0), torch.tensor([[2.0], [0.0]]))
    # an unknown sampler log-prob (NaN) counts as ratio 1
    unknown = sampler.clone()
    unknown[0, 0] = math.nan
    assert torch.allclose(sampler_correction_weights(trainer, unknown, mask, "token_mask", None, None)[0, :2], torch.tensor([1.0, 0.5]))


def test_off_policy_mask_by_hand():
    import torch

    from retrain.trainer.off_policy import off_policy_sequence_mask

    logps = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    sampled = torch.tensor([[-0.5, -0.5], [-0.5, -1.5], [-0.5, -0.5]])  # mean KL: 0.5, 0.0, 0.5
    mask = torch.ones(2).expand(3, 2)
    keep = off_policy_sequence_mask(torch.tensor([-1.0, -1.0, 1.0]), logps, sampled, mask, threshold=0.25)
    # row 0: negative advantage, KL 0.5 > 0.25 -> dropped; row 1: KL 0 -> kept; row 2: positive -> kept
    assert keep.tolist() == [[0.0], [1.0], [1.0]]


def test_the_correction_trains_and_reads_its_options(tiny_model_dir):
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(tiny_model_dir)),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "a"})]),
        num_generations=4, max_completion_length=6, learning_rate=1e-3,
        sampler_correction="sequence_mask", sampler_correction_clip_min=0.5, off_policy_mask_threshold=0.1,
    )
    assert algo.needs_generation_logps  # the correction needs pi at sampling time
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(algo, datamodule=PromptDataModule(prompts=["repeat a: ", "repeat b: "], batch_size=2))
    assert algo.global_step == 2 and abs(float(trainer.callback_metrics["train/sampler/kl"])) < 1e-6


@pytest.mark.parametrize("options, message", [
    ({"sampler_correction": "token_clip"}, "sampler_correction='token_clip': use one of token_truncate"),
    ({"sampler_correction": "token_mask", "sampler_correction_clip_min": 2.0, "sampler_correction_clip_max": 1.0}, "the range is empty"),
    ({"sampler_correction": "token_truncate", "sampler_correction_clip_max": None}, "both are null"),
    ({"off_policy_mask_threshold": -1.0}, "off_policy_mask_threshold=-1.0"),
])
def test_bad_correction_options_are_refused(tiny_model_dir, options, message):
    from retrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        GRPOTrainer(policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([RewardSpec(name="length_penalty")]), **options)


def test_old_logps_from_the_sampler_save_the_forward_and_train_the_same(tiny_model_dir, monkeypatch):
    import torch

    import retrain.trainer.module as module

    calls = []
    real = module.completion_logps

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "completion_logps", counted)
    losses = {}
    for from_sampler in (False, True):
        calls.clear()
        torch.manual_seed(0)
        algo = GRPOTrainer(
            policy=PolicyConfig(name_or_path=str(tiny_model_dir)),
            reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "a"})]),
            num_generations=4, max_completion_length=6, learning_rate=1e-3, num_iterations=2, old_logps_from_sampler=from_sampler,
        )
        trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(algo, datamodule=PromptDataModule(prompts=["repeat a: ", "repeat b: "], batch_size=2, shuffle=False))
        losses[from_sampler] = float(trainer.callback_metrics["train/loss"])
        no_grad_forwards = calls.count(False)  # the old log-probs' forward (the loss's forward has grad)
        assert no_grad_forwards == (0 if from_sampler else 2), calls  # 2 generations
    # The sampler's log-probs equal the trainer's in float32, so training is the same to rounding.
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


@pytest.mark.parametrize("truncated", [False, True])
def test_with_top_p_and_top_k_the_mismatch_reads_zero_only_when_the_trainer_truncates_too(tiny_model_dir, truncated):
    """The sampler's log-probs are of the distribution it draws from (top-k, top-p); with
    `truncated_logps` the trainer's are of the same one, so the float32 mismatch is ~0 again (and
    the sampler's log-probs may serve as the old ones)."""
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(tiny_model_dir)),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "a"})]),
        num_generations=4, max_completion_length=6, learning_rate=1e-3, top_p=0.8, top_k=20, truncated_logps=truncated,
    )
    if truncated:  # accepted now: the two sides describe the same distribution
        GRPOTrainer(policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([RewardSpec(name="length_penalty")]),
                    top_p=0.8, truncated_logps=True, num_iterations=2, old_logps_from_sampler=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(algo, datamodule=PromptDataModule(prompts=["repeat a: ", "repeat b: "], batch_size=2))
    kl = abs(float(trainer.callback_metrics["train/sampler/kl"]))
    if truncated:
        assert kl < 1e-6
        assert abs(float(trainer.callback_metrics["train/sampler/ratio_min"]) - 1) < 1e-3
    else:  # the sampler's log-probs are renormalized over fewer tokens than the trainer's
        assert kl > 1e-3


def test_truncated_log_probs_refuse_trls_kernel(tiny_model_dir):
    from retrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match="truncated_logps=true with lm_head_kernel='trl'"):
        GRPOTrainer(policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([RewardSpec(name="length_penalty")]),
                    truncated_logps=True, top_p=0.9, lm_head_kernel="trl")


def test_old_logps_from_a_truncated_sampler_are_refused(tiny_model_dir):
    from retrain.core.errors import ConfigError

    with pytest.raises(ConfigError, match="old_logps_from_sampler=true with top_k=0, top_p=0.9.*truncated_logps: true"):
        GRPOTrainer(policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([RewardSpec(name="length_penalty")]),
                    old_logps_from_sampler=True, top_p=0.9)
