"""The console of a normal quickstart run fits on one screen: every line it prints is on a short
allow-list (what informs: the device, the policy, the progress bar with the reward, the summary,
where the outputs went). A new warning or banner fails this test until it is silenced or explained."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ALLOWED = [
    r"GPU available: (True|False), used: (True|False)",
    r"retrain: built a new tiny model \(random weights; 2 layers, width 64\) at outputs/tiny-char-llama, because .*",
    r"retrain: GRPOTrainer training LlamaForCausalLM \(.* parameters, .* trainable, float32\) on cpu x 1; loss log-probs: the LM head in chunks; sampling with retrain's KV-cached decoder",
    r"retrain: 4 steps in [\d.]+ s\. train/reward: first 1 steps [\d.]+ -> last 1 steps [\d.]+( \([\d.]+x\))?\. Curve: outputs/quickstart/reward_curve\.png",
    r"train\s.*4/4.*",  # the progress bar (its last frame, when stdout is not a terminal)
    r"reward: [\d.]+",  # the bar's second line
    r"retrain: outputs",
    r"  checkpoints: outputs/quickstart/checkpoints",
    r"  W&B run: outputs/quickstart/wandb/offline-run-\S+ \(offline; upload with `wandb sync outputs/quickstart/wandb/offline-run-\S+`\)",
    r"  metrics CSV: outputs/quickstart/csv/version_0/metrics\.csv",
]


def test_quickstart_console_is_on_the_allow_list(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    config = (tmp_path / "configs" / "quickstart.yaml").read_text()
    # 4 steps, with a periodic checkpoint (whose Lightning warning must stay silent) at step 2.
    config = config.replace("max_steps: 800", "max_steps: 4").replace("every_n_train_steps: 200", "every_n_train_steps: 2")
    (tmp_path / "configs" / "quickstart.yaml").write_text(config)
    # The user's environment: no W&B settings (the config says offline), no warning filters.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PYTHONWARNINGS"))}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "retrain.cli", "fit", "--config", "configs/quickstart.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "outputs" / "quickstart" / "checkpoints").glob("*step=*.ckpt")), "no periodic checkpoint was written"
    lines = [line.rstrip() for line in (result.stdout + "\n" + result.stderr).splitlines() if line.strip()]
    unexpected = [line for line in lines if not any(re.fullmatch(p, line) or re.fullmatch(p, line.strip()) for p in ALLOWED)]
    assert not unexpected, "lines not on the console allow-list:\n" + "\n".join(unexpected)
    assert "\x1b[" not in result.stdout + result.stderr, "ANSI escapes in a non-terminal console"
    assert len(lines) <= 15
