"""Resume reproduces the run: a training process killed mid-run (a real SIGKILL) and resumed from
its checkpoint logs the same losses, rewards, learning rates and completions as the run that was
never interrupted.

On CPU with a fixed seed, everything that decides a step is in the checkpoint: the weights, the
optimizer and the learning-rate schedule, the data position, and the random state the sampler
draws from (torch's global generator, Python's `random`), provided nothing draws from that
generator between the restore and the first step (the DataLoader iterator Lightning starts after
the restore used to: see `retrain.data.datamodule._loader`). The `retrain fit` processes:

* the reference run: steps 1..N uninterrupted;
* the interrupted run: the same config in another directory, SIGKILLed as soon as its step-K
  checkpoint (and `last.ckpt`, written right after it) is on disk;
* the resumed run: `--ckpt_path <step-K checkpoint>` continues it to N; and so does `--ckpt_path
  last` (which then is the step-K checkpoint) in a copy of the killed run's directory.

Steps K+1..N of the resumed run must match the reference run's to 1e-6. A file-path reward
writes every completion it scores to a file, so the sampled text is compared too; in the run to be
killed it blocks from step K+1 on, so the kill lands between checkpoints however slow the machine.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

STEPS, KILL_AT = 6, 3
BATCH, GENERATIONS = 2, 4
ROLLOUTS = BATCH * GENERATIONS
COMPARED = ("train/loss", "train/reward", "train/learning_rate", "train/kl", "train/entropy", "train/reward_std")
TOLERANCE = 1e-6

LOGGED_REWARD = '''
import os
import threading
import time

_lock = threading.Lock()
_calls = 0


def logged(completion, prompt, **_):
    """0 reward; appends the completion to $COMPLETIONS_LOG. With $PAUSE_AFTER_CALLS=n, every call
    after the n-th blocks instead: the process waits, between two checkpoints, to be killed."""
    global _calls
    with _lock:
        _calls += 1
        paused = 0 <= int(os.environ.get("PAUSE_AFTER_CALLS", "-1")) < _calls
        if not paused:
            with open(os.environ["COMPLETIONS_LOG"], "a", encoding="utf-8") as handle:
                handle.write(repr((prompt, completion)) + "\\n")
    if paused:
        time.sleep(3600)
    return 0.0
'''


def _write_run_dir(run: Path, model_dir: Path) -> None:
    run.mkdir(parents=True)
    config = {
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": STEPS,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "out", "name": "csv"}},
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": "ckpt", "filename": "{step}", "every_n_train_steps": 1,
                        "save_last": True, "save_top_k": -1,
                    },
                },
                {"class_path": "retrain.callbacks.RewardCurve", "init_args": {"output_dir": "out"}},
            ],
        },
        "model": {
            "class_path": "retrain.GRPOTrainer",
            "init_args": {
                "policy": {"name_or_path": str(model_dir), "tiny": {"hidden_size": 32, "intermediate_size": 64}},
                "reward": {
                    "rewards": [
                        {"name": "retrain.tasks.repeat_letter:letter_fraction"},
                        {"name": "logged_reward.py:logged"},
                    ]
                },
                "num_generations": GENERATIONS,
                "max_completion_length": 6,
                "temperature": 1.0,
                "learning_rate": 1e-2,  # large enough that every step moves the policy visibly
                "beta": 0.05,
                "lr_scheduler_type": "linear",
                "warmup_steps": 1,
            },
        },
        "data": {
            "class_path": "retrain.PromptDataModule",
            # 5 records, 2 per step: the step-3 checkpoint falls inside the second shuffled pass.
            "init_args": {"prompts": [{"prompt": f"repeat {c}: ", "answer": c} for c in "abcde"], "batch_size": BATCH, "seed": 7},
        },
    }
    (run / "logged_reward.py").write_text(LOGGED_REWARD, encoding="utf-8")
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "retrain.cli", "fit", "--config", "config.yaml", *args]


def _env(log: Path, pause_after: int | None) -> dict[str, str]:
    env = {
        **os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "COMPLETIONS_LOG": str(log),
    }
    env.pop("PAUSE_AFTER_CALLS", None)
    if pause_after is not None:
        env["PAUSE_AFTER_CALLS"] = str(pause_after)
    return env


@pytest.fixture
def start():
    """Start `retrain fit` in a run directory (output to a file there); kills what is left at the end."""
    started: list[subprocess.Popen] = []

    def _start(run: Path, log: Path, *args: str, pause_after: int | None = None) -> subprocess.Popen:
        output = run / f"output{len(started)}.txt"
        with output.open("w") as handle:
            process = subprocess.Popen(_command(*args), cwd=run, env=_env(log, pause_after), stdout=handle, stderr=subprocess.STDOUT)
        process.output = output  # type: ignore[attr-defined]
        started.append(process)
        return process

    yield _start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def _finish(process: subprocess.Popen, timeout: float = 120) -> None:
    process.wait(timeout=timeout)
    assert process.returncode == 0, process.output.read_text()[-4000:]  # type: ignore[attr-defined]


def _kill_after_checkpoint(process: subprocess.Popen, ckpt_dir: Path, step: int, timeout: float = 120) -> None:
    """SIGKILL `process` as soon as its step-`step` checkpoint and the `last.ckpt` after it are complete.

    Lightning writes the step file, then `last.ckpt` (each through a temporary file); to be safe
    against a partial write all the same, both sizes must stay put over a few polls, and `last.ckpt`
    must be newer than the step file. The run's reward blocks from step K+1 on, so it cannot get further.
    """
    target, last = ckpt_dir / f"step={step}.ckpt", ckpt_dir / "last.ckpt"
    deadline = time.monotonic() + timeout
    previous, stable = None, 0
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before its step-{step} checkpoint was seen"
        assert not (ckpt_dir / f"step={step + 1}.ckpt").exists(), "the run got past the checkpoint before it was seen"
        if target.is_file() and last.is_file() and last.stat().st_mtime_ns >= target.stat().st_mtime_ns:
            sizes = (target.stat().st_size, last.stat().st_size)
            stable = stable + 1 if sizes == previous else 0
            previous = sizes
            if stable >= 2:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
                assert process.returncode == -signal.SIGKILL
                return
        time.sleep(0.02)
    pytest.fail(f"no complete step-{step} checkpoint within {timeout} s")


def _metrics(run: Path) -> dict[int, dict[str, str]]:
    """The logged training rows by step (the newest version wins: the resumed run's, after a resume)."""
    rows: dict[int, dict[str, str]] = {}
    for path in sorted((run / "out" / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    rows[int(row["step"])] = row
    return rows


def _completions(log: Path, steps: int) -> list[Counter]:
    """The (prompt, completion) pairs the first `steps` generations scored, one multiset per step
    (rewards run concurrently, so the order within a step is not fixed)."""
    lines = log.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= steps * ROLLOUTS
    lines = lines[: steps * ROLLOUTS]
    return [Counter(lines[i : i + ROLLOUTS]) for i in range(0, len(lines), ROLLOUTS)]


def test_killed_run_resumed_from_its_checkpoint_matches_the_uninterrupted_run(tmp_path, tiny_model_dir, start):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)  # built once, so neither run builds (or times) it
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    _write_run_dir(reference, model)
    _write_run_dir(interrupted, model)

    # The reference run and the run to be killed go side by side (the comparison is exact either way).
    uninterrupted_process = start(reference, reference / "completions.log")
    # Its reward blocks from step K+1's first call on, after the step-K checkpoints are written:
    # the kill lands between checkpoints however slow the machine is.
    killed = start(interrupted, interrupted / "completions.log", pause_after=KILL_AT * ROLLOUTS)
    _kill_after_checkpoint(killed, interrupted / "ckpt", KILL_AT)
    ckpt = interrupted / "ckpt"
    saved = torch.load(ckpt / f"step={KILL_AT}.ckpt", weights_only=False, map_location="cpu")
    last = torch.load(ckpt / "last.ckpt", weights_only=False, map_location="cpu")
    assert saved["global_step"] == last["global_step"] == KILL_AT
    assert not (ckpt / f"step={KILL_AT + 1}.ckpt").exists()
    assert saved["PromptDataModule"]["records_consumed"] == KILL_AT * BATCH
    assert all(torch.equal(a, b) for a, b in zip(saved["retrain_rng"], last["retrain_rng"]))

    # Resume the killed run from its step-K checkpoint by path; and, in a copy of it, by `last`, which
    # resolves to the newest last*.ckpt of the checkpoint directory: here the same step-K checkpoint.
    by_last = tmp_path / "interrupted_last"
    shutil.copytree(interrupted, by_last)
    resumed_processes = {
        interrupted: start(interrupted, interrupted / "resumed_completions.log", "--ckpt_path", f"ckpt/step={KILL_AT}.ckpt"),
        by_last: start(by_last, by_last / "resumed_completions.log", "--ckpt_path", "last"),
    }
    _finish(uninterrupted_process)
    for process in resumed_processes.values():
        _finish(process)

    expected = _metrics(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))  # rows are labelled by the updates done
    reference_text = _completions(reference / "completions.log", STEPS)
    assert (reference / "completions.log").read_text(encoding="utf-8").count("\n") == STEPS * ROLLOUTS
    # The killed run, as far as it got, is the reference run's beginning.
    assert _completions(interrupted / "completions.log", KILL_AT) == reference_text[:KILL_AT]
    final = torch.load(reference / "ckpt" / f"step={STEPS}.ckpt", weights_only=False, map_location="cpu")
    reference_curve = json.loads((reference / "out" / "reward_curve.json").read_text())["curve"]

    worst = 0.0
    for run in resumed_processes:
        resumed = _metrics(run)
        # CSV `step` s is the row after optimizer update s: the resumed run logs updates K+1..N.
        assert [s for s in sorted(resumed) if s > KILL_AT] == list(range(KILL_AT + 1, STEPS + 1))
        for step in range(KILL_AT + 1, STEPS + 1):
            for name in COMPARED:
                a, b = float(expected[step][name]), float(resumed[step][name])
                worst = max(worst, abs(a - b))
                assert abs(a - b) <= TOLERANCE, f"{run.name}, step {step}, {name}: uninterrupted {a!r}, resumed {b!r}"

        # The sampled text itself: the resumed run's generations are the reference run's K+1..N.
        assert _completions(run / "resumed_completions.log", STEPS - KILL_AT) == reference_text[KILL_AT:], run.name

        # The reward curve (callback state) spans the whole run, and the final weights agree.
        curve = json.loads((run / "out" / "reward_curve.json").read_text())["curve"]
        assert curve["step"] == reference_curve["step"]
        assert max(abs(a - b) for a, b in zip(curve["value"], reference_curve["value"])) <= TOLERANCE
        # (by step: in the copied directory, Lightning writes last-v1.ckpt, the saved last path being the original's)
        resumed_final = torch.load(run / "ckpt" / f"step={STEPS}.ckpt", weights_only=False, map_location="cpu")
        assert resumed_final["global_step"] == final["global_step"] == STEPS
        for key, value in final["state_dict"].items():
            assert torch.allclose(value, resumed_final["state_dict"][key], atol=TOLERANCE, rtol=0), (run.name, key)
    print(f"max |diff| over steps {KILL_AT + 1}..{STEPS}: {worst:.3g}")
