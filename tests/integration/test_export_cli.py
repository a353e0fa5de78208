"""End to end through the real console script: `retrain fit` with the ExportPolicy callback, then
`retrain export` from the checkpoint; both exports reload with `from_pretrained` and decode greedily
exactly like the policy in the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.cli import main
from retrain.models.loading import PolicyConfig, load_policy, load_tokenizer

PROMPTS = ["repeat a: ", "repeat bb: "]


def _config(tmp_path: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "out", "name": "csv"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "out/checkpoints", "save_last": True}},
                {"class_path": "retrain.callbacks.ExportPolicy", "init_args": {"directory": "out/hf"}},
            ],
        },
        "model": {
            "class_path": "retrain.GRPOTrainer",
            "init_args": {
                "policy": {"name_or_path": "model", "tiny": {"hidden_size": 32, "intermediate_size": 64}},
                "reward": {"rewards": [{"name": "regex_match", "kwargs": {"pattern": "a|b|c|d|e|f|g|h|i|j|k"}}]},  # random text: mixed rewards
                "num_generations": 4,
                "max_completion_length": 6,
                "learning_rate": 3e-2,
                "beta": 0.05,
            },
        },
        "data": {"class_path": "retrain.PromptDataModule", "init_args": {"path": "prompts.jsonl", "batch_size": 2}},
    }
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "repeat {c}: ", "answer": "{c}"}}\n' for c in "abcde"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _retrain(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "retrain.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _greedy(model: torch.nn.Module, tokenizer) -> list[list[int]]:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval().generate(**batch, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id).tolist()


def test_fit_exports_at_the_end_and_retrain_export_matches_the_checkpoint(tmp_path):
    result = _retrain(tmp_path, "fit", "--config", str(_config(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "checkpoints" / "last.ckpt"

    # The trained policy, straight from the checkpoint: the base model with the checkpoint's weights.
    settings = PolicyConfig(name_or_path=str(tmp_path / "model"))
    trained, tokenizer = load_policy(settings), load_tokenizer(settings)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    trained.load_state_dict({k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")})
    base = load_policy(settings)
    changed = [n for n, w in base.state_dict().items() if not torch.equal(w, trained.state_dict()[n])]
    assert len(changed) > len(base.state_dict()) // 2, changed  # it trained
    expected_tokens = _greedy(trained, tokenizer)

    # `retrain export` with the config Lightning saved in the log directory.
    saved_config = tmp_path / "out" / "csv" / "version_0" / "config.yaml"
    assert saved_config.is_file()
    result = _retrain(tmp_path, "export", "--config", str(saved_config), "--ckpt_path", str(checkpoint), "--output_dir", "exported")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported the policy" in result.stdout

    for directory in (tmp_path / "out" / "hf", tmp_path / "exported"):  # the callback's, the command's
        exported = AutoModelForCausalLM.from_pretrained(directory)
        assert exported.state_dict().keys() == trained.state_dict().keys()
        for name, weight in trained.state_dict().items():
            assert torch.equal(exported.state_dict()[name], weight), (directory, name)
        assert exported.config.use_cache
        assert _greedy(exported, AutoTokenizer.from_pretrained(directory)) == expected_tokens
    assert json.loads((tmp_path / "exported" / "retrain_export.json").read_text())["global_step"] == 2


def test_help_lists_the_export_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "retrain export --help" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main(["export", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--ckpt_path" in out and "--output_dir" in out and "--merge_lora" in out


def test_export_reports_a_missing_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["export", "--ckpt_path", "missing.ckpt", "--output_dir", "out"])
    assert exited.value.code == 2
    report = capsys.readouterr().err
    assert report.startswith("retrain export: configuration error") and "No checkpoint at missing.ckpt" in report
    assert "Traceback" not in report
