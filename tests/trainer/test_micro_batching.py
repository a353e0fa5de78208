"""Invariance: however a step's rollouts are cut into passes (rows per pass, a token budget per
pass, packed rows), the accumulated gradient is the whole step's."""

import pytest
import torch

from retrain.callbacks import EntropyBonus
from retrain.core.records import PromptRecord
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.grpo import GRPOTrainer
from retrain.trainer.rloo import RLOOTrainer

RECORDS = [PromptRecord(prompt="repeat a: "), PromptRecord(prompt="please repeat the letter b: ")]  # unequal prompts
REWARD = RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})


SPLITS = {
    "rows of 1": {"micro_batch_size": 1},
    "token budget": {"micro_batch_tokens": 40},
    "token budget and rows": {"micro_batch_tokens": 60, "micro_batch_size": 2},
    "packed": {"pack_rows": True},
    "packed, token budget": {"pack_rows": True, "micro_batch_tokens": 40},
}


def _gradients(algo, experience, micro_batch_size=None, **split):
    split = {"micro_batch_size": micro_batch_size, "micro_batch_tokens": None, "pack_rows": False, **split}
    for name, value in split.items():
        algo.hparams[name] = value
    algo.policy.zero_grad()
    algo.manual_backward = lambda loss: loss.backward()  # outside a Lightning loop
    num_items = experience.completion_mask.sum()
    metrics = algo._accumulate_gradients(experience, num_items)
    grads = torch.cat([p.grad.flatten() for p in algo.policy.parameters() if p.grad is not None])
    return grads, metrics


LOSSES = [
    (GRPOTrainer, {"loss_type": "grpo"}),
    (GRPOTrainer, {"loss_type": "bnpo"}),
    (GRPOTrainer, {"loss_type": "dr_grpo"}),
    (GRPOTrainer, {"loss_type": "dapo", "beta": 0.1}),
    (GRPOTrainer, {"loss_type": "cispo", "epsilon_high": 5.0}),
    (GRPOTrainer, {"loss_type": "sapo"}),
    (RLOOTrainer, {}),
]


@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
@pytest.mark.parametrize("cls, options", LOSSES, ids=[f"{c.__name__}-{o.get('loss_type', '')}" for c, o in LOSSES])
def test_any_split_of_the_step_gives_the_whole_steps_gradient(tiny_model_dir, cls, options, split):
    torch.manual_seed(0)
    algo = cls(policy=PolicyConfig(name_or_path=str(tiny_model_dir)), reward=RewardCalculator([REWARD]),
               num_generations=4, max_completion_length=6, **options)
    algo.configure_model()
    experience = algo.gather_experience(RECORDS)
    whole, whole_metrics = _gradients(algo, experience)
    pieces, piece_metrics = _gradients(algo, experience, **SPLITS[split])
    if not SPLITS[split].get("pack_rows") or "micro_batch_tokens" in SPLITS[split]:
        assert len(algo.micro_batches(experience)) > 1  # the split really splits
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
