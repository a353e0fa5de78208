"""Scaling out, for real: `retrain fit` as two gloo processes on CPU, on one "node" and on two.

* DDP: `--trainer.strategy ddp --trainer.devices 2` (Lightning launches the second process).
* Two nodes x one process on localhost: two `retrain fit --trainer.num_nodes 2 --trainer.devices 1`
  processes started side by side, each in its own directory (its own disk, as on two machines),
  found by the environment variables torchrun sets, by Lightning's own (`NODE_RANK`,
  `LOCAL_RANK`), and by a real `torchrun` per node.

Two files in each run directory observe the run from inside:

* `rank_log.py:log_prompt`, a reward function, appends `LOCAL_RANK` and the prompt it scores to
  `rank<LOCAL_RANK>.log`, so the test sees which prompts each process rolled out;
* `probe.Probe`, a callback, records on every rank the gradient each optimizer step applies (after
  DDP's all-reduce), the rank's own loss, the final weights, and every checkpoint file the rank
  writes.

Everything runs on 127.0.0.1. Each process group is killed if it outlives its timeout.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

PROMPTS = [f"repeat {c}: " for c in "abcd"]
BATCH, GENERATIONS, STEPS = 2, 4, 4
TIMEOUT = 150  # seconds per run; a run takes about 15 s on 2 CPU cores
FINITE = ("train/loss", "train/reward", "train/rewards/log_prompt", "train/entropy", "train/kl", "train/learning_rate")
DISTRIBUTED_VARIABLES = (
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
    "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED",
)

REWARD = '''
import os
import threading

_lock = threading.Lock()


def log_prompt(prompt, completion):
    """Append this process's LOCAL_RANK and the prompt to rank<LOCAL_RANK>.log; reward distinct characters."""
    rank = os.environ.get("LOCAL_RANK", "0")
    with _lock, open(f"rank{rank}.log", "a", encoding="utf-8") as handle:
        handle.write(repr((rank, prompt)) + "\\n")
    return len(set(completion)) / 8
'''

PROBE = '''
import hashlib
import json
import os

import lightning.pytorch as pl


def _digest(tensors):
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class Probe(pl.Callback):
    """Per rank: the gradient of every update, the rank's loss, final weights, checkpoint writes."""

    def __init__(self):
        self.steps = []

    def setup(self, trainer, pl_module, stage):
        io, rank = trainer.strategy.checkpoint_io, trainer.global_rank
        save = io.save_checkpoint

        def logged(checkpoint, path, *args, **kwargs):
            with open("saves.log", "a", encoding="utf-8") as handle:
                handle.write(f"{rank} {os.path.basename(str(path))}\\n")
            return save(checkpoint, path, *args, **kwargs)

        io.save_checkpoint = logged

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
        self.steps.append({"step": trainer.global_step, "grad": _digest(grads)})

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps[-1]["loss"] = float(trainer.callback_metrics["train/loss"])

    def on_train_end(self, trainer, pl_module):
        weights = _digest(p for _, p in sorted(pl_module.policy.state_dict().items()))
        report = {
            "global_rank": trainer.global_rank, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "global_step": trainer.global_step, "weights": weights, "steps": self.steps,
        }
        with open(f"probe{trainer.global_rank}.json", "w", encoding="utf-8") as handle:
            json.dump(report, handle)
'''


# ---------------------------------------------------------------------------------------- helpers
def _write_run_dir(run: Path, *, wandb: bool = False, model: str = "model") -> Path:
    """A run directory: prompts, the reward and probe files, and a config; returns the config's path."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": p[7]}) + "\n" for p in PROMPTS))
    (run / "rank_log.py").write_text(REWARD)
    (run / "probe.py").write_text(PROBE)
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "out", "name": "csv"}}]
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "out/checkpoints", "every_n_train_steps": 2, "save_last": True}},
        {"class_path": "retrain.callbacks.RewardCurve", "init_args": {"output_dir": "out"}},
        {"class_path": "probe.Probe"},
    ]
    if wandb:
        loggers.insert(0, {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "retrain-test", "save_dir": "out", "offline": True}})
        callbacks.append({"class_path": "retrain.callbacks.CompletionsTable", "init_args": {"every_n_steps": 2}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": STEPS,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": loggers,
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "retrain.GRPOTrainer",
            "init_args": {
                "policy": {"name_or_path": model, "tiny": {"hidden_size": 32, "intermediate_size": 64}},
                "reward": {"rewards": [{"name": "rank_log.py:log_prompt"}]},
                "num_generations": GENERATIONS,
                "max_completion_length": 6,
                "learning_rate": 1e-3,
                "beta": 0.05,
                "lr_scheduler_type": "linear",
            },
        },
        "data": {"class_path": "retrain.PromptDataModule", "init_args": {"path": "prompts.jsonl", "batch_size": BATCH}},
    }
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (a SLURM job or torchrun around pytest), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES and not k.startswith("SLURM_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _start(run: Path, command: list[str], env: dict[str, str]) -> subprocess.Popen:
    # Own session: on a timeout the whole group goes, Lightning's or torchrun's child processes too.
    return subprocess.Popen(
        command, cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(processes: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """Wait for every process (each within `timeout`); kill each one's process group whatever happens."""
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout)
            results.append((process.returncode, output))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a distributed run did not finish within {timeout} s (a hang?)")
    finally:
        for process in processes:
            _kill_group(process)
    return results


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group's leader is this process: only its group
    except (ProcessLookupError, PermissionError):
        pass
    if process.returncode is None:
        process.communicate(timeout=30)


def _retrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "retrain.cli", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(log: Path) -> Counter:
    """How often each prompt was scored, from a rank log."""
    if not log.is_file():
        return Counter()
    return Counter(eval(line)[1] for line in log.read_text().splitlines())  # noqa: S307 (our own repr lines)


def _probe(run: Path, rank: int) -> dict:
    return json.loads((run / f"probe{rank}.json").read_text())


def _metrics(run: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted((run / "out" / "csv").glob("version_*/metrics.csv")):
        with path.open() as handle:
            rows += list(csv.DictReader(handle))
    return rows


def _assert_synchronised(first: dict, second: dict, steps: int) -> None:
    """Two ranks applied the same gradient at every update (DDP's all-reduce) and ended with the same
    weights, although each computed its loss on different rollouts."""
    assert first["global_step"] == second["global_step"] == steps
    assert first["world_size"] == second["world_size"] == 2
    assert [s["step"] for s in first["steps"]] == [s["step"] for s in second["steps"]]
    assert [s["grad"] for s in first["steps"]] == [s["grad"] for s in second["steps"]], "gradients were not all-reduced"
    assert first["weights"] == second["weights"], "the ranks' weights diverged"
    assert any(a["loss"] != b["loss"] for a, b in zip(first["steps"], second["steps"])), (
        "both ranks computed identical losses at every step: they did not train on different rollouts"
    )


def _assert_own_prompts(per_rank: list[Counter], steps: int) -> None:
    """Rank r rolled out exactly its shard (records r::2), num_generations times per step, and the
    two shards together are the whole data set, each step's global batch."""
    first, second = set(per_rank[0]), set(per_rank[1])
    assert first and second
    assert not first & second, f"both ranks rolled out {sorted(first & second)}"
    assert first | second == set(PROMPTS)
    assert first == set(PROMPTS[0::2]) and second == set(PROMPTS[1::2])
    for counts in per_rank:
        assert sum(counts.values()) == steps * BATCH * GENERATIONS
        assert all(n % GENERATIONS == 0 for n in counts.values())


def _saves(run: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in (run / "saves.log").read_text().splitlines()]


# ---------------------------------------------------------------------------------------- DDP
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """One `retrain fit ... --trainer.strategy ddp --trainer.devices 2` run (with W&B offline), and
    what it left, read right away: the resume test below continues the run in place."""
    run = tmp_path_factory.mktemp("ddp")
    config = _write_run_dir(run, wandb=True)
    [(code, output)] = _finish([_start(run, _retrain("fit", "--config", str(config), *DDP), _env())])
    assert code == 0, output[-4000:]
    return {
        "run": run, "output": output,
        "prompts": [_prompts(run / "rank0.log"), _prompts(run / "rank1.log")],
        "probes": [_probe(run, 0), _probe(run, 1)],
        "saves": _saves(run),
        "checkpoints": sorted(p.name for p in (run / "out" / "checkpoints").iterdir()),
        "last_step": torch.load(run / "out" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"],
        "metrics": _metrics(run),
        "wandb_runs": len(list((run / "out" / "wandb").glob("offline-run-*"))),
        "reward_curve": (run / "out" / "reward_curve.png").is_file(),
    }


def test_ddp_on_cpu_each_rank_rolls_out_its_own_prompts_and_checkpoints_once(ddp_run):
    _assert_own_prompts(ddp_run["prompts"], STEPS)
    _assert_synchronised(*ddp_run["probes"], STEPS)

    # Checkpoints: every file written once, by rank 0 only (rank 1 joins the collectives, not the write).
    saves = ddp_run["saves"]
    assert {rank for rank, _ in saves} == {"0"}
    assert [name for _, name in saves] == ["epoch=0-step=2.ckpt", "last.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert ddp_run["checkpoints"] == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert ddp_run["last_step"] == STEPS

    # Metrics (rank 0's logger), the reward curve (rank 0), one W&B run with its completions table.
    rows = ddp_run["metrics"]
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for name in FINITE:
            assert math.isfinite(float(row[name])), f"{name} = {row[name]}"
    assert ddp_run["output"].count(f"retrain: {STEPS} steps") == 1
    assert ddp_run["reward_curve"]
    assert ddp_run["wandb_runs"] == 1, "W&B must be initialised once, by rank 0"


def test_ddp_resumes_from_last_checkpoint(ddp_run):
    """`--ckpt_path last` under DDP: the step counter, the weights and each rank's shard continue."""
    run = ddp_run["run"]
    for name in ("rank0.log", "rank1.log", "saves.log", "probe0.json", "probe1.json"):
        (run / name).unlink(missing_ok=True)
    resume = ["--trainer.max_steps", str(STEPS + 2), "--ckpt_path", "last"]
    [(code, output)] = _finish([_start(run, _retrain("fit", "--config", str(run / "config.yaml"), *DDP, *resume), _env())])
    assert code == 0, output[-4000:]

    assert torch.load(run / "out" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS + 2
    assert sorted(p.name for p in (run / "out" / "checkpoints").iterdir()) == ["epoch=0-step=6.ckpt", "last.ckpt"]
    _assert_own_prompts([_prompts(run / "rank0.log"), _prompts(run / "rank1.log")], 2)
    first, second = _probe(run, 0), _probe(run, 1)
    _assert_synchronised(first, second, STEPS + 2)
    assert [s["step"] for s in first["steps"]] == [STEPS, STEPS + 1]
    assert {rank for rank, _ in _saves(run)} == {"0"}
    assert [int(r["step"]) for r in _metrics(run)[STEPS:]] == [STEPS + 1, STEPS + 2]
    assert f"retrain: {STEPS + 2} steps" in output  # the reward curve spans the whole run


# ---------------------------------------------------------------------------------------- two nodes
def _node_env(launcher: str, node_rank: int, port: int) -> dict[str, str]:
    """What a launcher on node `node_rank` of 2 (one process each) puts in the process's environment."""
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if launcher == "lightning":  # LightningEnvironment: you start every process; it reads NODE_RANK, LOCAL_RANK
        return _env(**common, NODE_RANK=str(node_rank), LOCAL_RANK="0")
    # TorchElasticEnvironment (what torchrun sets): RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK, TORCHELASTIC_RUN_ID
    return _env(
        **common, RANK=str(node_rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
        GROUP_RANK=str(node_rank), TORCHELASTIC_RUN_ID="retrain-test",
    )


def _node_command(launcher: str, node_rank: int, port: int, config: Path) -> list[str]:
    args = ["fit", "--config", str(config), "--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1"]
    if launcher != "torchrun":
        return _retrain(*args)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun (installed with torch) not found"
    return [
        torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank),
        "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "retrain.cli", *args,
    ]


@pytest.mark.parametrize(
    "launcher, shared_model",
    [("lightning", False), ("torchelastic", False), ("torchrun", True)],
    ids=["lightning-env", "torchelastic-env", "torchrun-shared-model-dir"],
)
def test_two_nodes_one_process_each_on_localhost(tmp_path, launcher, shared_model):
    """Both processes finish, agree on global_step and weights, and each rolled out its own prompts.

    `shared_model`: the tiny model's directory is one path both nodes see (a shared file system),
    so both nodes' `prepare_data` build it at the same moment; otherwise each node builds its own.
    """
    port = _free_port()
    nodes = [tmp_path / f"node{rank}" for rank in range(2)]
    model = str(tmp_path / "shared-model") if shared_model else "model"
    processes = []
    for rank, node in enumerate(nodes):
        config = _write_run_dir(node, model=model)
        env = _env() if launcher == "torchrun" else _node_env(launcher, rank, port)
        processes.append(_start(node, _node_command(launcher, rank, port, config), env))
    results = _finish(processes)
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"node {rank}:\n{output[-4000:]}"

    # The tiny model was built completely: once per node, or once (by whichever node won) when shared.
    models = [tmp_path / "shared-model"] if shared_model else [node / "model" for node in nodes]
    assert all((m / "config.json").is_file() and (m / "model.safetensors").is_file() for m in models)
    assert not list(tmp_path.glob("**/.*.tmp")), "a staging directory was left behind"
    # Global ranks 0 and 1 (LOCAL_RANK 0 on both): each node rolled out its own half of the data.
    _assert_own_prompts([_prompts(node / "rank0.log") for node in nodes], STEPS)
    first, second = _probe(nodes[0], 0), _probe(nodes[1], 1)
    assert first["num_nodes"] == second["num_nodes"] == 2
    _assert_synchronised(first, second, STEPS)
    # Only global rank 0 writes checkpoints and logs.
    assert {rank for rank, _ in _saves(nodes[0])} == {"0"} and not (nodes[1] / "saves.log").exists()
    assert torch.load(nodes[0] / "out" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
    assert not list((nodes[1] / "out").glob("**/*.ckpt"))
    rows = _metrics(nodes[0])
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)


# ---------------------------------------------------------------------------------------- FSDP configs
def test_fsdp_multinode_config_builds_its_strategy():
    """configs/fsdp_multinode.yaml needs 16 GPUs; here its strategy is built from the YAML as
    LightningCLI builds it: FSDP2 over all 16 ranks, data-parallel only, sharded checkpoints."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "fsdp_multinode.yaml").read_text())
    trainer = config["trainer"]
    assert (trainer["num_nodes"], trainer["devices"], trainer["precision"]) == (2, 8, "bf16-mixed")

    parser = ArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    strategy = parser.instantiate(parser.parse_object({"strategy": trainer["strategy"]})).strategy
    assert type(strategy) is ModelParallelStrategy
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (trainer["num_nodes"] * trainer["devices"], 1)
    assert strategy._save_distributed_checkpoint
    policy = config["model"]["init_args"]["policy"]
    assert policy["dtype"] == "float32" and policy["gradient_checkpointing"] is True


def test_fsdp1_strategy_is_refused_before_loading_with_what_to_use_instead():
    """Lightning's FSDPStrategy cannot run the manual-optimization step (seen on an H100:
    benchmarks/NOTES.md). Its accelerator check refuses CPU, so no Trainer can hold it here: the
    module's `setup` gets a stand-in trainer carrying a real FSDPStrategy."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from retrain import GRPOTrainer, PolicyConfig, RewardCalculator, RewardSpec
    from retrain.trainer.module import ConfigError, check_strategy

    algo = GRPOTrainer(policy=PolicyConfig(name_or_path="/nonexistent/never-loaded"),
                       reward=RewardCalculator([RewardSpec(name="retrain.tasks.repeat_letter:letter_fraction")]))
    algo._trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=1, max_steps=10, datamodule=None)
    with pytest.raises(ConfigError, match=r"(?s)FSDPStrategy \(FSDP1\) cannot run.*ModelParallelStrategy"):
        algo.setup("fit")
    assert algo.policy is None  # refused before anything loaded
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))  # FSDP2 passes
    check_strategy(None)


def test_quickstart_fsdp_config_trains_saves_and_resumes_on_two_cpu_processes(tmp_path):
    """configs/quickstart_fsdp.yaml, as `retrain fit` runs it (FSDP2, bf16-mixed, clipping, a
    sharded checkpoint, resume), on 2 CPU processes (gloo) instead of GPUs."""
    repo = Path(__file__).resolve().parents[2]
    common = [sys.executable, "-m", "retrain.cli", "fit", "--config", str(repo / "configs" / "quickstart_fsdp.yaml"),
              "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy.init_args.data_parallel_size", "2",
              "--trainer.enable_progress_bar", "false", "--data.init_args.path", str(repo / "configs" / "data" / "repeat_letter.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*common, "--trainer.max_steps", "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "outputs" / "quickstart_fsdp" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank
    second = subprocess.run([*common, "--trainer.max_steps", "5", "--ckpt_path", str(checkpoint)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    rows = [r for f in sorted((tmp_path / "outputs" / "quickstart_fsdp" / "csv").glob("*/metrics.csv")) for r in csv.DictReader(f.open())]
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(1, 6))  # 1-3 from the first run, 4-5 resumed: no step lost or repeated
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))


_COMPILE_PROBE = '''
import json, os
import lightning.pytorch as pl


class CompileProbe(pl.Callback):
    """Writes, per rank, how many graphs torch.compile produced during the run."""

    def on_train_end(self, trainer, pl_module):
        from torch._dynamo.utils import counters

        path = f"compile_rank{trainer.global_rank}.json"
        with open(path, "w") as f:
            json.dump({"unique_graphs": counters["stats"]["unique_graphs"]}, f)
'''


def test_policy_compile_under_fsdp2_trains_like_eager_on_two_cpu_processes(tmp_path):
    """`policy.compile` with configs/quickstart_fsdp.yaml (FSDP2, bf16-mixed) on 2 CPU processes:
    every rank compiles its forward, and the losses are the eager run's."""
    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "compile_probe.py").write_text(_COMPILE_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    losses = {}
    for mode in ("eager", "compiled"):
        run_dir = tmp_path / mode
        run_dir.mkdir()
        command = [
            sys.executable, "-m", "retrain.cli", "fit", "--config", str(repo / "configs" / "quickstart_fsdp.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy.init_args.data_parallel_size", "2",
            "--trainer.enable_progress_bar", "false", "--data.init_args.path", str(repo / "configs" / "data" / "repeat_letter.jsonl"),
            "--trainer.max_steps", "3", "--trainer.callbacks+=compile_probe.CompileProbe",
            "--model.init_args.policy.compile", str(mode == "compiled").lower(),
        ]
        done = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [r for f in sorted((run_dir / "outputs" / "quickstart_fsdp" / "csv").glob("*/metrics.csv")) for r in csv.DictReader(f.open())]
        losses[mode] = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        graphs = [json.loads((run_dir / f"compile_rank{rank}.json").read_text())["unique_graphs"] for rank in (0, 1)]
        assert all(g > 0 for g in graphs) if mode == "compiled" else graphs == [0, 0], graphs
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3, abs=1e-6)
