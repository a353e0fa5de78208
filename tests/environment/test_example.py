"""The custom-environment example in src/retrain/environment/README.md runs as shipped."""

import importlib.util
import math
import os
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "guess_number.py"


def test_guess_number_example_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example builds its tiny model under ./outputs
    spec = importlib.util.spec_from_file_location("guess_number_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.main(max_steps=2)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2
    assert 1.0 <= float(metrics["train/env/guesses"]) <= 3.0
    assert math.isfinite(float(metrics["train/loss"]))
    assert os.path.isdir(tmp_path / "outputs" / "tiny-char-llama")


def test_readme_shows_the_example_code():
    readme = (EXAMPLE.parents[1] / "src" / "retrain" / "environment" / "README.md").read_text()
    source = EXAMPLE.read_text()
    for line in ("        self.secret = int(record.answer)", "        hint = \"higher\" if guess < self.secret else \"lower\""):
        assert line.strip() in readme and line in source
