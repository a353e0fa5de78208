import uuid

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from retrain.data.datamodule import collate_records
from retrain.core.records import PromptRecord
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.reward.registry import reward
from retrain.trainer.grpo import GRPOTrainer
from retrain.trainer.metrics import MajAtK, PassAtK

ONLY_EASY = f"only_easy_{uuid.uuid4().hex[:6]}"


@reward(name=ONLY_EASY)
def only_easy(answer: str = "", **_) -> float:
    """Every sample of an 'easy' prompt is correct, none of a 'hard' one."""
    return 1.0 if answer == "easy" else 0.0


def test_pass_and_majority_at_k_hand_checked():
    correct = torch.tensor([[False, True, False], [False, False, False], [True, True, False]])
    answers = [["4", "5", "4"], ["1", "2", "3"], ["7", "7", "8"]]
    passed, majority = PassAtK(), MajAtK()
    passed.update(correct)
    majority.update(answers, correct)
    # pass@3: prompts 0 and 2 have a correct sample -> 2/3
    assert passed.compute().item() == pytest.approx(2 / 3)
    # maj@3: prompt 0's majority "4" is wrong; prompt 1 has no majority (first, "1", wrong); prompt 2's "7" right -> 1/3
    assert majority.compute().item() == pytest.approx(1 / 3)


def test_validate_and_test_log_reward_pass_and_majority(tiny_model_dir):
    torch.manual_seed(0)
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(tiny_model_dir)),
        reward=RewardCalculator([RewardSpec(name=ONLY_EASY, verifiers=["non_empty"])]),
        num_generations=2, eval_num_generations=3, max_completion_length=4,
    )
    records = [PromptRecord("q1", answer="easy"), PromptRecord("q2", answer="hard"), PromptRecord("q3", answer="easy"), PromptRecord("q4", answer="hard")]
    loader = DataLoader(records, batch_size=2, collate_fn=collate_records)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    [val] = trainer.validate(algo, dataloaders=loader, verbose=False)
    assert val["val/pass@3"] == pytest.approx(0.5) and val["val/maj@3"] == pytest.approx(0.5)
    assert val["val/reward"] == pytest.approx(0.5) and val["val/pass@1"] == pytest.approx(0.5)  # every sample of q1, q3 right, none of q2, q4
    assert val["val/rewards/" + ONLY_EASY] == pytest.approx(0.5)
    assert 0.0 <= val["val/verifiers/non_empty"] <= 1.0
    [test] = trainer.test(algo, dataloaders=loader, verbose=False)
    assert test["test/pass@3"] == pytest.approx(0.5)
