import pytest
import torch

from retrain.core.records import PromptRecord
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.base import BaseTrainer
from retrain.trainer.experience import completion_logps
from retrain.trainer.grpo import ConfigError, GRPOTrainer

RECORDS = [PromptRecord(prompt="repeat a: ", answer="a"), PromptRecord(prompt="repeat b: ", answer="b")]


LETTER_FRACTION = RewardSpec(name="retrain.tasks.repeat_letter:letter_fraction")
# About a third of a random model's 6-character completions contain one of a-f: groups have reward variance.
HAS_A_TO_F = RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})


def _trainer(model_dir, reward_spec=HAS_A_TO_F, **options):
    reward = RewardCalculator([reward_spec])
    defaults = {"num_generations": 4, "max_completion_length": 6, "learning_rate": 1e-3}
    trainer = GRPOTrainer(policy=PolicyConfig(name_or_path=str(model_dir)), reward=reward, **{**defaults, **options})
    trainer.configure_model()
    return trainer


def test_the_mixin_does_not_shadow_module_train():
    assert GRPOTrainer.train is torch.nn.Module.train
    assert "train" not in vars(BaseTrainer)


def test_every_bad_option_is_reported_at_once(tiny_model_dir):
    reward = RewardCalculator([RewardSpec(name="length_penalty")])
    with pytest.raises(ConfigError) as err:
        GRPOTrainer(
            policy=PolicyConfig(name_or_path=str(tiny_model_dir)),
            reward=reward,
            num_generations=1,
            epsilon=0.2,
            epsilon_high=0.1,
            temperature=0.0,
        )
    message = str(err.value)
    for option in ("num_generations=1", "epsilon_high=0.1", "temperature=0.0"):
        assert option in message


def test_gather_experience_shapes_and_rewards(tiny_model_dir):
    torch.manual_seed(0)
    trainer = _trainer(tiny_model_dir, LETTER_FRACTION)
    experience = trainer.gather_experience(RECORDS)
    n = len(RECORDS) * 4
    assert experience.rewards.shape == (n,) and experience.advantages.shape == (n,)
    assert experience.input_ids.size(0) == n and experience.completion_mask.size(1) <= 6
    # rewards are the calculator's, and advantages are centred per group of 4
    expected = [t.completion_text.count(t.record.answer) / max(1, len(t.completion_text)) for t in experience.trajectories]
    torch.testing.assert_close(experience.rewards, torch.tensor(expected))
    torch.testing.assert_close(experience.advantages.view(2, 4).sum(1), torch.zeros(2), atol=1e-5, rtol=0)
    assert experience.ref_logps is None


def test_one_step_moves_log_probs_in_the_direction_of_the_advantages(tiny_model_dir):
    torch.manual_seed(1)
    trainer = _trainer(tiny_model_dir, learning_rate=1e-4, scale_rewards="none")
    experience = trainer.gather_experience(RECORDS)
    assert experience.advantages.abs().sum() > 0, "the test needs some reward variance"

    def sequence_logps():
        with torch.no_grad():
            logps, _ = completion_logps(trainer.policy, experience.input_ids, experience.attention_mask, experience.completion_width)
        return (logps * experience.completion_mask).sum(-1)

    before = sequence_logps()
    metrics = trainer.step(experience)
    after = sequence_logps()
    # The objective is sum_i A_i * logp_i (up to normalisation); a small step must increase it.
    assert torch.dot(experience.advantages, after - before) > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert {"loss", "entropy", "clip_ratio"} <= set(metrics)


def test_beta_adds_a_frozen_reference_and_reports_kl(tiny_model_dir):
    torch.manual_seed(0)
    trainer = _trainer(tiny_model_dir, beta=0.1)
    reference = {k: v.clone() for k, v in trainer.ref_policy.state_dict().items()}
    for _ in range(2):
        metrics = trainer.step(trainer.gather_experience(RECORDS))
    assert metrics["kl"] > 0  # the policy moved away from the reference
    for key, value in trainer.ref_policy.state_dict().items():
        assert torch.equal(value, reference[key]), f"reference weight {key} changed"


def test_checkpoint_round_trip_without_lightning(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    trainer = _trainer(tiny_model_dir)
    trainer.step(trainer.gather_experience(RECORDS))
    path = trainer.save_checkpoint(tmp_path / "ckpt" / "step1.ckpt")
    fresh = _trainer(tiny_model_dir)
    assert not torch.equal(fresh.policy.lm_head.weight, trainer.policy.lm_head.weight)
    fresh.load_checkpoint(path)
    for (name, a), (_, b) in zip(trainer.policy.state_dict().items(), fresh.policy.state_dict().items()):
        assert torch.equal(a, b), name
