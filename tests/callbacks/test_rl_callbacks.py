import uuid

import lightning.pytorch as pl
import pytest
import torch

from retrain.callbacks import DynamicSampling, EntropyBonus, RefModelSync
from retrain.data.datamodule import PromptDataModule
from retrain.core.records import PromptRecord
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.reward.registry import reward
from retrain.trainer.grpo import GRPOTrainer

FLAT_NAME = f"flat_or_first_char_{uuid.uuid4().hex[:8]}"


@reward(name=FLAT_NAME)
def flat_or_first_char(completion: str, answer: str = "", **_):
    """0.5 for every rollout of a 'flat' prompt (zero variance); else the first character's code."""
    if answer == "flat":
        return 0.5
    return float(ord(completion[0])) if completion else 0.0


def _algo(model_dir, **options):
    defaults = {"num_generations": 4, "max_completion_length": 6, "learning_rate": 1e-3}
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(model_dir)),
        reward=RewardCalculator([RewardSpec(name=FLAT_NAME)]),
        **{**defaults, **options},
    )
    algo.configure_model()
    return algo


def _fit(algo, callbacks, max_steps=2):
    data = PromptDataModule(prompts=[{"prompt": "a: ", "answer": "flat"}, {"prompt": "b: ", "answer": "x"}], batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(algo, datamodule=data)
    return trainer


def test_entropy_bonus_subtracts_coef_times_entropy(tiny_model_dir):
    torch.manual_seed(0)
    algo = _algo(tiny_model_dir)
    experience = algo.gather_experience([PromptRecord(prompt="b: ", answer="x")])
    plain, metrics = algo.compute_loss(experience)
    EntropyBonus(coef=0.1).setup(None, algo, "fit")
    with_bonus, bonus_metrics = algo.compute_loss(experience)
    # loss' = loss - 0.1 * H, and H is the logged mean entropy
    torch.testing.assert_close(with_bonus, plain - 0.1 * metrics["entropy"], atol=1e-6, rtol=0)
    torch.testing.assert_close(bonus_metrics["entropy_bonus"], 0.1 * metrics["entropy"], atol=1e-6, rtol=0)
    with_bonus.backward()  # the bonus carries gradient through the entropy
    assert algo.policy.lm_head.weight.grad.abs().sum() > 0


def test_ref_model_sync_mixes_the_policy_into_the_reference(tiny_model_dir):
    torch.manual_seed(0)
    algo = _algo(tiny_model_dir, beta=0.1)
    initial_ref = [p.detach().clone() for p in algo.ref_policy.parameters()]
    sync = RefModelSync(alpha=0.25, every_n_steps=2)
    _fit(algo, [sync], max_steps=2)  # one sync, after update 2
    assert sync.syncs == 1
    for ref, start, current in zip(algo.ref_policy.parameters(), initial_ref, algo.policy.parameters()):
        torch.testing.assert_close(ref, 0.25 * current.detach() + 0.75 * start)


def test_ref_model_sync_without_a_reference_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="set model beta > 0"):
        _fit(_algo(tiny_model_dir), [RefModelSync(every_n_steps=1)], max_steps=1)


def test_dynamic_sampling_replaces_flat_groups(tiny_model_dir):
    torch.manual_seed(0)
    algo = _algo(tiny_model_dir)
    sampler = DynamicSampling(max_rounds=4)
    algo.group_filter = sampler
    records = [PromptRecord(prompt="a: ", answer="flat"), PromptRecord(prompt="b: ", answer="x")]
    experience = algo.gather_experience(records)
    assert len(experience) == 8  # the batch keeps its size
    groups = experience.rewards.view(2, 4)
    assert (groups.std(dim=1) > 0).all(), "a zero-variance group was kept although replacements had signal"
    assert all(t.record.answer == "x" for t in experience.trajectories)


def test_dynamic_sampling_keeps_the_batch_when_nothing_has_signal(tiny_model_dir):
    torch.manual_seed(0)
    algo = _algo(tiny_model_dir)
    algo.group_filter = DynamicSampling(max_rounds=2)
    experience = algo.gather_experience([PromptRecord(prompt="a: ", answer="flat")])
    assert len(experience) == 4 and torch.all(experience.advantages == 0)


def test_dynamic_sampling_logs_under_lightning(tiny_model_dir):
    torch.manual_seed(0)
    trainer = _fit(_algo(tiny_model_dir), [DynamicSampling(max_rounds=3)], max_steps=2)
    assert trainer.callback_metrics["train/dynamic_sampling/dropped_groups"] >= 1
    assert trainer.callback_metrics["train/frac_reward_zero_std"] == 0
