"""Invariance: micro-batches of 1 accumulate exactly the gradient of the whole step."""

import pytest
import torch

from retrain.callbacks import EntropyBonus
from retrain.core.records import PromptRecord
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.grpo import GRPOTrainer
from retrain.trainer.rloo import RLOOTrainer

RECORDS = [PromptRecord(prompt="repeat a: "), PromptRecord(prompt="repeat b: ")]
REWARD = RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})


def _gradients(algo, experience, micro_batch_size):
    algo.hparams.micro_batch_size = micro_batch_size
    algo.policy.zero_grad()
    algo.manual_backward = lambda loss: loss.backward()  # outside a Lightning loop
    num_items = experience.completion_mask.sum()
    metrics = algo._accumulate_gradients(experience, num_items)
    grads = torch.cat([p.grad.flatten() for p in algo.policy.parameters() if p.grad is not None])
    return grads, metrics


@pytest.mark.parametrize(
    "cls, options",
    [
        (GRPOTrainer, {"loss_type": "grpo"}),
        (GRPOTrainer, {"loss_type": "bnpo"}),
        (GRPOTrainer, {"loss_type": "dr_grpo"}),
        (GRPOTrainer, {"loss_type": "dapo", "beta": 0.1}),
        (GRPOTrainer, {"loss_type": "cispo", "epsilon_high": 5.0}),
        (GRPOTrainer, {"loss_type": "sapo"}),
        (RLOOTrainer, {}),
    ],
)
def test_micro_batches_of_one_equal_the_whole_step(tiny_model_dir, cls, options):
    torch.manual_seed(0)
    algo = cls(policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([REWARD]),
               num_generations=4, max_completion_length=6, **options)
    algo.configure_model()
    experience = algo.gather_experience(RECORDS)
    whole, whole_metrics = _gradients(algo, experience, None)
    pieces, piece_metrics = _gradients(algo, experience, 1)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=1e-4)
    assert piece_metrics["loss"] == pytest.approx(whole_metrics["loss"], abs=1e-6)


def test_entropy_bonus_is_invariant_too(tiny_model_dir):
    torch.manual_seed(0)
    algo = GRPOTrainer(policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([REWARD]),
                       num_generations=4, max_completion_length=6)
    algo.configure_model()
    EntropyBonus(coef=0.5).setup(None, algo, "fit")
    experience = algo.gather_experience(RECORDS)
    whole, _ = _gradients(algo, experience, None)
    pieces, _ = _gradients(algo, experience, 3)
    torch.testing.assert_close(pieces, whole, atol=1e-6, rtol=1e-4)
