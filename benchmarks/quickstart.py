"""Does the quickstart learn, and how fast? Runs `retrain fit --config configs/quickstart.yaml`
(or `--config rloo_quickstart.yaml`) for several seeds, each in its own scratch directory, and
checks the quickstart's promise: finishes in under 5 minutes, last-10% mean reward >= 0.8 and >= 2x the first-10% mean.

    python benchmarks/quickstart.py --seeds 0 1 2

Prints a table, then one line of JSON; writes benchmarks/results/quickstart.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seed(config: str, seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        os.symlink(REPO / "configs", Path(scratch) / "configs")
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        command = [sys.executable, "-m", "retrain.cli", "fit", "--config", f"configs/{config}",
                   "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false", *extra]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"seed {seed} failed:\n{result.stderr[-3000:]}")
        summary = json.loads((Path(scratch) / "outputs" / Path(config).stem / "reward_curve.json").read_text())
    first, last = summary["first_mean"], summary["last_mean"]
    return {
        "seed": seed,
        "wall_seconds": round(wall, 1),
        "train_seconds": summary["train_seconds"],
        "steps": summary["steps"],
        "first_10pct_reward": round(first, 4),
        "last_10pct_reward": round(last, 4),
        "passes": wall < 300 and last >= 0.8 and last >= 2 * first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart.yaml", help="a config under configs/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="default: benchmarks/results/<config stem>.json")
    parser.add_argument("extra", nargs="*", help="extra retrain fit arguments (after --)")
    args = parser.parse_args()
    rows = [run_seed(args.config, seed, args.extra) for seed in args.seeds]
    out = Path(args.out or REPO / "benchmarks/results" / f"{Path(args.config).stem}.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {
        "benchmark": "quickstart",
        "config": f"configs/{args.config}",
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
        "runs": rows,
        "all_pass": all(r["passes"] for r in rows),
    }
    print(f"{'seed':>4} {'wall s':>7} {'steps':>5} {'first 10%':>9} {'last 10%':>8} pass")
    for r in rows:
        print(f"{r['seed']:>4} {r['wall_seconds']:>7} {r['steps']:>5} {r['first_10pct_reward']:>9.3f} {r['last_10pct_reward']:>8.3f} {r['passes']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
