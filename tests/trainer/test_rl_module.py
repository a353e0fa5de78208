"""The shared RL machinery: generation reuse, split updates, RLOO, option checks."""

import lightning.pytorch as pl
import pytest
import torch

from retrain.data.datamodule import PromptDataModule
from retrain.core.records import PromptRecord
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.advantages import kl_penalized_rewards, rloo_advantages
from retrain.trainer.experience import completion_logps
from retrain.trainer.grpo import GRPOTrainer
from retrain.trainer.module import ConfigError
from retrain.trainer.rloo import RLOOTrainer

RECORDS = [PromptRecord(prompt="repeat a: ", answer="a"), PromptRecord(prompt="repeat b: ", answer="b")]
# About a third of a random model's 6-character completions contain one of a-f: groups have reward variance.
HAS_A_TO_F = RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})


def _algo(model_dir, cls=GRPOTrainer, **options):
    defaults = {"num_generations": 4, "max_completion_length": 6, "learning_rate": 1e-3}
    algo = cls(policy=PolicyConfig(name_or_path=str(model_dir)), reward=RewardCalculator([HAS_A_TO_F]), **{**defaults, **options})
    algo.configure_model()
    return algo


def _fit(algo, max_steps, batch_size=2):
    data = PromptDataModule(prompts=[{"prompt": f"repeat {c}: ", "answer": c} for c in "abcd"], batch_size=batch_size)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(algo, datamodule=data)
    return trainer


@pytest.mark.parametrize("num_iterations, steps_per_generation, generations", [(2, 1, 2), (1, 2, 2), (2, 2, 1)])
def test_global_step_counts_optimizer_updates(tiny_model_dir, num_iterations, steps_per_generation, generations):
    torch.manual_seed(0)
    algo = _algo(tiny_model_dir, num_iterations=num_iterations, steps_per_generation=steps_per_generation)
    trainer = _fit(algo, max_steps=4)
    assert trainer.global_step == 4
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == generations
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_reused_generation_is_off_policy_after_the_first_update(tiny_model_dir):
    torch.manual_seed(0)
    algo = _algo(tiny_model_dir, num_iterations=2)
    experience = algo.gather_experience(RECORDS)
    assert experience.old_logps is not None
    current, _ = completion_logps(algo.policy, experience.input_ids, experience.attention_mask, experience.completion_width)
    torch.testing.assert_close(experience.old_logps, current)  # stored at generation time
    algo.step(experience)
    moved, _ = completion_logps(algo.policy, experience.input_ids, experience.attention_mask, experience.completion_width)
    mask = experience.completion_mask.bool()
    assert not torch.allclose(moved[mask], experience.old_logps[mask])  # the second pass sees ratio != 1


def test_on_policy_runs_store_no_generation_logps(tiny_model_dir):
    algo = _algo(tiny_model_dir)
    assert algo.gather_experience(RECORDS).old_logps is None


def test_generation_must_split_evenly_into_steps(tiny_model_dir):
    algo = _algo(tiny_model_dir, num_generations=3, steps_per_generation=2)
    with pytest.raises(ConfigError, match=r"data.batch_size=1 x num_generations=3"):
        _fit(algo, max_steps=2, batch_size=1)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss_type": "cispo"}, "set epsilon_high"),
        ({"top_entropy_quantile": 0.0}, "top_entropy_quantile=0.0"),
        ({"num_iterations": 0, "steps_per_generation": 0}, "steps_per_generation=0"),
        ({"loss_type": "ppo"}, "loss_type='ppo'"),
        ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
        ({"importance_sampling_level": "word"}, "importance_sampling_level='word'"),
    ],
)
def test_impossible_options_fail_at_construction(tiny_model_dir, options, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        GRPOTrainer(policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([HAS_A_TO_F]), **options)


def test_rloo_puts_the_kl_into_the_reward_before_leave_one_out(tiny_model_dir):
    torch.manual_seed(0)
    algo = _algo(tiny_model_dir, cls=RLOOTrainer, beta=0.5)
    algo.step(algo.gather_experience(RECORDS))  # move the policy away from the reference
    experience = algo.gather_experience(RECORDS)
    assert experience.old_logps is not None and experience.ref_logps is not None
    penalized = kl_penalized_rewards(experience.rewards, experience.old_logps, experience.ref_logps, experience.completion_mask, 0.5)
    assert not torch.allclose(penalized, experience.rewards)
    torch.testing.assert_close(experience.advantages, rloo_advantages(penalized, 4).advantages)
    metrics = algo.step(experience)
    assert set(metrics) >= {"loss", "kl", "clip_ratio"} and all(map(lambda v: v == v, metrics.values()))


def test_rloo_trains_under_lightning(tiny_model_dir):
    torch.manual_seed(0)
    algo = _algo(tiny_model_dir, cls=RLOOTrainer, normalize_advantages=True)
    trainer = _fit(algo, max_steps=2)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
