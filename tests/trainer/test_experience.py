import torch
from transformers import AutoModelForCausalLM

from retrain.core.records import PromptRecord
from retrain.environment.base import EnvironmentObservation, LLMAction, Trajectory, Turn
from retrain.trainer.experience import completion_logps, pack_trajectories


def _trajectory(prompt_ids, completion_ids, mask, truncated=False):
    action = LLMAction(text="", token_ids=completion_ids, truncated=truncated)
    return Trajectory(
        record=PromptRecord(prompt="p"),
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        completion_mask=mask,
        turns=[Turn(action=action, observation=EnvironmentObservation(done=True))],
    )


def test_pack_left_pads_prompts_and_right_pads_completions():
    trajectories = [
        _trajectory([5, 6, 7], [8, 9], [1, 1]),
        _trajectory([5], [8, 9, 10], [1, 0, 1]),  # a multi-turn episode: token 9 is environment text
    ]
    input_ids, attention_mask, completion_mask = pack_trajectories(trajectories, pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 8, 9, 0], [0, 0, 5, 8, 9, 10]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert completion_mask.tolist() == [[1, 1, 0], [1, 0, 1]]


def test_mask_truncated_zeroes_the_whole_rollout():
    trajectories = [_trajectory([5], [8, 9], [1, 1], truncated=True), _trajectory([5], [8], [1])]
    _, _, completion_mask = pack_trajectories(trajectories, 0, mask_truncated=True)
    assert completion_mask.tolist() == [[0, 0], [1, 0]]


def test_batched_logps_match_one_sequence_at_a_time(tiny_model_dir):
    """Padding and position ids must not change any log-prob: compare with unpadded forwards."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    trajectories = [
        _trajectory([10, 11, 12, 13], [20, 21], [1, 1]),
        _trajectory([14], [22, 23, 24], [1, 1, 1]),
    ]
    input_ids, attention_mask, completion_mask = pack_trajectories(trajectories, pad_token_id=0)
    temperature = 0.7
    with torch.no_grad():
        logps, entropy = completion_logps(model, input_ids, attention_mask, 3, temperature=temperature, with_entropy=True)
        for row, t in enumerate(trajectories):
            ids = torch.tensor([t.prompt_ids + t.completion_ids])
            logits = model(ids).logits[0] / temperature
            log_probs = logits.log_softmax(-1)
            p = len(t.prompt_ids)
            for j, token in enumerate(t.completion_ids):
                expected = log_probs[p - 1 + j, token]
                torch.testing.assert_close(logps[row, j], expected, atol=1e-5, rtol=1e-5)
                expected_entropy = -(log_probs[p - 1 + j].exp() * log_probs[p - 1 + j]).sum()
                torch.testing.assert_close(entropy[row, j], expected_entropy, atol=1e-5, rtol=1e-5)
    assert completion_mask[0, 2] == 0  # the padded slot exists and is masked
