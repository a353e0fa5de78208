"""`retrain fit` with `generation_backend: vllm` on the real engine (vLLM's CPU build, installed by the
test setup): the shipped config, a multi-turn tool episode, an architecture retrain's decoder does
not support, exact resume, and the errors that come before any loading."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_config import quick_config, read_metrics, run_retrain

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VLLM = {"kv_cache_memory_bytes": 64 * 2**20, "enforce_eager": True}
H64 = {"hidden_size": 128, "num_heads": 2, "intermediate_size": 256}  # vLLM's CPU attention needs head size 64+


def _vllm_config(tmp_path: Path, max_steps: int = 4, **init_args) -> Path:
    path = quick_config(tmp_path, max_steps=max_steps)
    config = yaml.safe_load(path.read_text())
    args = config["model"]["init_args"]
    args["policy"]["tiny"] = dict(H64)
    args.update({"generation_backend": "vllm", "vllm": dict(VLLM), **init_args})
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_sampler_matches(rows: list[dict[str, str]]) -> None:
    """Float32 vLLM against the trainer on the sampled tokens: the mismatch metrics read ~0."""
    kls = [float(r["train/sampler/kl"]) for r in rows if r.get("train/sampler/kl")]
    assert kls and all(abs(kl) < 1e-5 for kl in kls), kls
    for row in rows:
        if row.get("train/sampler/ratio_max"):
            assert abs(float(row["train/sampler/ratio_max"]) - 1) < 1e-3 and abs(float(row["train/sampler/ratio_min"]) - 1) < 1e-3


def test_the_vllm_quickstart_config_trains_with_a_clean_console(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    config = (tmp_path / "configs" / "quickstart_vllm.yaml").read_text()
    config = config.replace("max_steps: 300", "max_steps: 4").replace("every_n_train_steps: 100", "every_n_train_steps: 2")
    (tmp_path / "configs" / "quickstart_vllm.yaml").write_text(config)
    # The user's environment: no W&B or vLLM settings (the config says offline), no warning filters.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PYTHONWARNINGS", "VLLM_"))}
    result = subprocess.run(
        [sys.executable, "-m", "retrain.cli", "fit", "--config", "configs/quickstart_vllm.yaml"],
        cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    allowed = [
        r"GPU available: (True|False), used: (True|False)",
        r"retrain: built a new tiny model \(random weights; 2 layers, width 128\) at outputs/tiny-char-llama-h64, because .*",
        r"retrain: GRPOTrainer training LlamaForCausalLM \(.*\) on cpu x 1; loss log-probs: the LM head in chunks; sampling with vLLM [\d.]+\S* \(colocated, float32; the policy's weights pushed before each rollout phase\)",
        r"retrain: 4 steps in [\d.]+ s\. train/reward: .*",
        r"train\s.*4/4.*", r"reward: [\d.]+", r"retrain: outputs", r"  checkpoints: outputs/quickstart_vllm/checkpoints",
        r"  W&B run: outputs/quickstart_vllm/wandb/offline-run-\S+ \(offline; upload with `wandb sync \S+`\)",
        r"  metrics CSV: outputs/quickstart_vllm/csv/version_0/metrics\.csv",
    ]
    lines = [line.rstrip() for line in (result.stdout + "\n" + result.stderr).splitlines() if line.strip()]
    unexpected = [line for line in lines if not any(re.fullmatch(p, line) or re.fullmatch(p, line.strip()) for p in allowed)]
    assert not unexpected, "lines not on the console allow-list:\n" + "\n".join(unexpected)
    rows = read_metrics(tmp_path / "outputs" / "quickstart_vllm" / "csv")
    assert sorted(int(float(r["step"])) for r in rows if r.get("train/reward")) == [1, 2, 3, 4]
    _assert_sampler_matches(rows)


def _eos_likely_model(directory: Path, max_position_embeddings: int) -> None:
    """The tiny model, with <eos>'s (tied) embedding along its mean final hidden state: random weights
    that end most turns after a few tokens, so that an episode has room for a second turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrain.models.tiny import TinyModelConfig, build_tiny_model

    build_tiny_model(directory, TinyModelConfig(**H64, max_position_embeddings=max_position_embeddings))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        hidden = model(torch.tensor([tokenizer("user: 2 + 3?\nassistant: ")["input_ids"]]), output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.get_input_embeddings().weight[tokenizer.eos_token_id] = 4.0 * hidden / hidden.norm() ** 2
    model.save_pretrained(directory)


def test_a_multi_turn_tool_episode_trains_through_vllm(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "tool_calculator.yaml").read_text())
    config["trainer"].update({"max_steps": 2, "enable_progress_bar": False, "default_root_dir": "out"})
    config["trainer"]["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "out", "name": "csv"}}]
    config["trainer"]["callbacks"] = []
    args = config["model"]["init_args"]
    _eos_likely_model(tmp_path / "model", 2048)
    args["policy"] = {"name_or_path": str(tmp_path / "model")}
    args["environment"]["class_path"] = "calling_env.FirstTurnCallsCalculator"
    args.update({"generation_backend": "vllm", "vllm": dict(VLLM)})
    config["data"]["init_args"]["path"] = str(REPO / "configs" / "data" / "arithmetic.jsonl")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_retrain(tmp_path, "fit", "--config", "config.yaml", env={"PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [r for r in read_metrics(tmp_path / "out" / "csv") if r.get("train/reward")]
    assert len(rows) == 2
    for row in rows:
        # Every first turn calls the tool; most episodes then take a second turn (not where the first
        # one used up the token budget).
        assert float(row["train/env/tool_calls"]) == 1.0
        assert 1.5 <= float(row["train/turns"]) <= 2.0
        assert float(row["train/env/tool_errors"]) == 0.0
        assert 0.0 < float(row["train/policy_token_fraction"]) < 1.0  # the tool's tokens are context
    _assert_sampler_matches(rows)  # the second turn's log-probs too (its context holds the tool result)


def test_an_openai_sdk_agent_trains_through_vllm_on_its_exact_tokens(tmp_path):
    """Three continued calls per episode over HTTP, sampled by the real engine: the trainer's
    log-probs of the recorded tokens match the engine's (a re-tokenized or shifted token would not)."""
    config = _vllm_config(
        tmp_path, max_steps=2, environment={"class_path": "retrain.environment.AgentEnvironment", "init_args": {"agent": "chatty_agent.agent"}},
        reward={"rewards": [{"name": "agent_reward"}]}, max_completion_length=64,
    )
    # 512 tokens, ~400 of them fillers that decode to "<|extra_N|>": text that re-tokenizes into
    # other tokens (characters), so only the exact sampled ids give matching log-probs.
    text = yaml.safe_load(config.read_text())
    text["model"]["init_args"]["policy"]["tiny"]["vocab_size"] = 512
    config.write_text(yaml.safe_dump(text))
    result = run_retrain(tmp_path, "fit", "--config", str(config), env={"PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [r for r in read_metrics(tmp_path / "out" / "csv") if r.get("train/reward")]
    assert len(rows) == 2
    for row in rows:
        assert float(row["train/env/calls"]) == 3.0 and float(row["train/env/samples"]) == 1.0
        assert 0.0 < float(row["train/policy_token_fraction"]) < 1.0  # the template's tokens between calls are context
    _assert_sampler_matches(rows)


def _tiny_gpt2(directory: Path) -> None:
    """A GPT-2 (which retrain's decoder does not support) with the character tokenizer, on disk."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from retrain.models.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=128, n_head=2, n_layer=2, n_positions=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_an_architecture_retrains_decoder_does_not_support_trains_through_vllm(tmp_path):
    from transformers import AutoModelForCausalLM

    from retrain.rollout.decoding import unsupported_reason

    _tiny_gpt2(tmp_path / "gpt2")
    assert unsupported_reason(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")) is not None
    path = _vllm_config(tmp_path, max_steps=3, policy={"name_or_path": str(tmp_path / "gpt2")})
    result = run_retrain(tmp_path, "fit", "--config", str(path))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "training GPT2LMHeadModel" in result.stderr + result.stdout and "sampling with vLLM" in result.stderr + result.stdout
    rows = read_metrics(tmp_path / "out" / "csv")
    assert sum(1 for r in rows if r.get("train/reward")) == 3
    _assert_sampler_matches(rows)


def test_a_resumed_vllm_run_continues_exactly(tmp_path):
    """Each request's seed comes from torch's generator, which the checkpoint stores: 2 steps, resume,
    2 more give the uninterrupted run's rewards and losses (a constant learning rate: the first leg's
    max_steps would otherwise change the schedule)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    for run in (whole, split):
        run.mkdir()
        _vllm_config(run, max_steps=4, lr_scheduler_type="constant")
    assert run_retrain(whole, "fit", "--config", "config.yaml").returncode == 0
    first = run_retrain(split, "fit", "--config", "config.yaml", "--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_retrain(split, "fit", "--config", "config.yaml", "--ckpt_path", "out/checkpoints/last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def by_step(run: Path) -> dict[int, dict[str, str]]:
        return {int(float(r["step"])): r for r in read_metrics(run / "out" / "csv") if r.get("train/reward")}

    expected, got = by_step(whole), by_step(split)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):
        for name in ("train/reward", "train/loss", "train/completion_length"):
            assert math.isclose(float(got[step][name]), float(expected[step][name]), rel_tol=1e-5, abs_tol=1e-7), (step, name)


DDP = {"devices": 2, "strategy": "ddp"}
FSDP2 = {
    "devices": 2,
    "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}},
}


@pytest.mark.parametrize("strategy", [DDP, FSDP2], ids=["ddp", "fsdp2"])
def test_each_rank_drives_its_own_engine_with_the_policys_current_weights(tmp_path, strategy):
    """Two gloo processes, each with its own engine (vLLM's external launcher inside the process
    group); under FSDP2 each engine gets the full weights gathered from the shards. After real
    updates the engines still sample the trainer's distribution (ratios ~1 at every step)."""
    path = _vllm_config(tmp_path, max_steps=4, lr_scheduler_type="constant", learning_rate=0.01)
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(strategy)
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "ModelCheckpoint" not in c["class_path"]]
    config["trainer"]["enable_checkpointing"] = False
    path.write_text(yaml.safe_dump(config))
    result = run_retrain(tmp_path, "fit", "--config", str(path), timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on cpu x 2; loss log-probs: the LM head in chunks; sampling with vLLM" in result.stderr + result.stdout
    rows = [r for r in read_metrics(tmp_path / "out" / "csv") if r.get("train/reward")]
    assert sorted(int(float(r["step"])) for r in rows) == [1, 2, 3, 4]
    assert any(abs(float(r["train/loss"])) > 1e-6 for r in rows[:-1])  # the weights moved before the last rollout
    _assert_sampler_matches(rows)


def test_vllm_options_without_the_vllm_backend_are_refused(tmp_path):
    path = _vllm_config(tmp_path, generation_backend="auto")
    result = run_retrain(tmp_path, "fit", "--config", str(path))
    assert result.returncode == 2
    assert "vllm options are set but generation_backend='auto'" in result.stderr
    assert "Traceback" not in result.stderr


def test_impossible_vllm_options_are_refused_before_the_policy_loads(tmp_path):
    path = _vllm_config(tmp_path, vllm={**VLLM, "enable_sleep_mode": True, "tensor_parallel_size": 2})
    result = run_retrain(tmp_path, "fit", "--config", str(path))
    assert result.returncode == 2
    assert "enable_sleep_mode=true needs a CUDA device" in result.stderr and "tensor_parallel_size=2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()  # refused before the tiny model was even built
