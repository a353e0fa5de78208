"""With LoRA, the reference policy is the base model with the adapter disabled: no second copy."""

import torch
from transformers import AutoModelForCausalLM

from retrain.core.records import PromptRecord
from retrain.models.loading import LoraSettings, PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.experience import completion_logps
from retrain.trainer.grpo import GRPOTrainer

RECORDS = [PromptRecord(prompt="repeat a: "), PromptRecord(prompt="repeat b: ")]


def test_lora_reference_is_the_disabled_adapter(tiny_model_dir):
    torch.manual_seed(0)
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(tiny_model_dir), lora=LoraSettings(r=4, alpha=8)),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
        num_generations=4, max_completion_length=6, learning_rate=1e-2, beta=0.1,
    )
    algo.configure_model()
    assert algo.ref_policy is None and algo.has_reference
    trainable = {n for n, p in algo.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for _ in range(3):
        experience = algo.gather_experience(RECORDS)
        with torch.no_grad():
            expected, _ = completion_logps(base, experience.input_ids, experience.attention_mask, experience.completion_width)
        torch.testing.assert_close(experience.ref_logps, expected, atol=1e-5, rtol=1e-5)
        metrics = algo.step(experience)
    assert metrics["kl"] > 0  # the adapter moved the policy away from its base
    for name, weight in base.state_dict().items():  # and the base weights never changed
        merged_name = f"base_model.model.{name}".replace(".weight", ".base_layer.weight")
        current = dict(algo.policy.state_dict()).get(merged_name, dict(algo.policy.state_dict()).get(f"base_model.model.{name}"))
        assert current is not None and torch.equal(current, weight), name
