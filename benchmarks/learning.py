"""GRPO learning curves, side by side with TRL: same model, task, hyperparameters, steps and seeds.

    python benchmarks/learning.py                          # 800 optimizer steps, seeds 0 and 1, both libraries
    python benchmarks/learning.py --steps 200 --seeds 0    # a quicker look
    python benchmarks/learning.py --steps 2 --seeds 0 --prompts 2 --generations 2 \
        --completion-length 4                              # smoke test (tests/test_benchmarks.py)
    python benchmarks/learning.py --task skill             # configs/reasoning_skill.yaml from its warm start, seeds 0 1 2

`--task skill` is the held-out-skill recipe (skill_task.py says what is mirrored from the config and
how the one held-out evaluator scores both libraries); it writes learning_skill.{md,json,png}: per
library the held-out pass@1 of the warm start and after RL (seed means and per seed), the held-out
curve, and the verdict against the recipe's bars (+0.20 over the warm start; at least TRL's pass@1
at every evaluated step, within 0.02; at least TRL's speed). The rest of this docstring is the
default task's.

The task is the quickstart's (`configs/quickstart.yaml`): "repeat the letter" on the tiny
character-level Llama (hidden 64, 2 layers, 89k parameters), built once into a temporary directory
that both libraries load, so both start from identical weights. Reward `letter_fraction`.

Equal in both libraries, set explicitly on both sides (the values are the quickstart's):
num_generations 8, max_completion_length 8, temperature 1.0, top_p 1, top_k 0, 16 prompts per step
(TRL: per_device_train_batch_size = 16 x 8 = 128 completions), one optimizer step per generation
(num_iterations = steps_per_generation = gradient_accumulation_steps = 1), loss_type "dapo",
scale_rewards "group", beta 0, epsilon 0.2, no truncation masking, learning rate 1e-3 constant
(TRL's default schedule is linear decay), fused AdamW with betas (0.9, 0.999) and weight decay 0
(TRL exempts biases and norms from decay, which at 0 makes no difference), max_grad_norm 1.0,
float32 (TRL's default is bf16; off here), one torch thread each (`--threads`). AdamW's epsilon is
1e-8 in both: TRL's `adam_epsilon` default and torch.optim.AdamW's default, which retrain uses (it
has no option for it).

The prompts are identical too: each seed's prompt stream is the one `retrain.PromptDataModule`
(seeded) hands retrain, and TRL receives the same records in the same order (its dataset in stream
order, `shuffle_dataset=False`), so step k of both libraries trains on the same 16 prompts.

What stays each library's own: the random stream of the sampled completions (both are seeded with
the seed, through `lightning.seed_everything` and transformers' `set_seed`, but draw differently),
the sampler (TRL: `generate`; retrain: its `BatchingSampler`) and the training loop itself, which
is what is being compared. On one machine a run is deterministic (the same seed gives the same
curve again), so the curves of the two libraries at one seed differ only because they sample
different completions; seeds, not repeats, measure that spread.

Why one thread: on a shared 2-core machine, two torch threads wait on each other whenever another
process holds a core, and wall times inflate many-fold; the 89k-parameter model gains nothing from a
second thread. Wall time is reported, but this benchmark is about learning (throughput.py is about
speed).

Each library runs in its own subprocess, alternating which goes first from seed to seed. The mean
reward of each step is recorded from the rollouts that step trained on (retrain: the logged
`train/reward`; TRL: the reward function's calls, one per generation).

Summary per library (averaged over seeds): the mean reward of the first and last 10% of steps, the
first step at which the seed-averaged reward's trailing 20-step moving mean reaches 0.9 (None if
never), and the seconds `fit` / `train` took. Verdict: retrain "learns at least as well" when its last-10%
mean is at least TRL's minus 0.02. This is a benchmark, not a test: the verdict is printed, and the
exit status is nonzero only when a run fails.

Prints a Markdown table and the verdict, then one line of JSON; writes
benchmarks/results/learning.{md,json,png} (config, commit, machine, every seed's curve).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import skill_task
from common import add_common_arguments, commit, machine, run_script_child, trl_no_checkpointing, write_results

LIBRARIES = ("retrain", "trl")
COLORS = {"retrain": "#08519c", "trl": "#d94801"}
THRESHOLD = 0.9  # the reward a run has "learned" the task at
SMOOTHING = 20  # steps in the trailing moving mean for steps-to-threshold and the plot
TOLERANCE = 0.02  # retrain's last-10% mean (skill: held-out pass@1) may be this much below TRL's and still count as "as well"
TARGET_GAIN = 0.20  # skill: the held-out pass@1 RL should add to the warm start's (seed mean)


@dataclass
class Spec:
    """What both libraries run for one seed (one optimizer step = prompts x generations rollouts)."""

    model_dir: str
    steps: int
    seed: int
    prompts: int = 16
    generations: int = 8
    completion_length: int = 8
    learning_rate: float = 1e-3
    temperature: float = 1.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    beta: float = 0.0
    epsilon: float = 0.2
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8  # torch.optim.AdamW's default, which retrain uses; TRL's default too
    threads: int = 1  # torch threads in each run; 0 = torch's default
    task: str = "letter"  # or "skill" (skill_task.py: configs/reasoning_skill.yaml from its warm start)
    eval_every: int = 0  # skill: held-out evaluation every this many steps (and before the first)
    eval_samples: int = 4  # skill: held-out samples per problem
    heldout_size: int = 0  # skill: held-out problems evaluated (0: the config's split, all of it)


def make_data(spec: Spec) -> Any:
    """The seeded `retrain.PromptDataModule` of the task's prompts; both libraries' prompts come from it."""
    from retrain import PromptDataModule
    from retrain.tasks.repeat_letter import make_prompts

    if spec.task == "skill":
        return skill_task.train_data(spec.prompts, spec.seed)
    return PromptDataModule(prompts=make_prompts(), batch_size=spec.prompts, seed=spec.seed)


def make_heldout(spec: Spec) -> "skill_task.HeldOut | None":
    if spec.task != "skill":
        return None
    return skill_task.HeldOut(spec.model_dir, spec.eval_samples, spec.completion_length, spec.seed, spec.heldout_size)


def prompt_stream(spec: Spec) -> list[list[Any]]:
    """The `PromptRecord` batches of the first `spec.steps` steps, as retrain's data module yields them."""
    data = make_data(spec)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    return [next(batches) for _ in range(spec.steps)]


# ---------------------------------------------------------------------------------------- children
def run_retrain(spec: Spec, heldout: "skill_task.HeldOut | None") -> tuple[list[float], float]:
    """`retrain fit`'s path: a GRPOTrainer under lightning.Trainer; the mean reward of every step, and the
    seconds `fit` took (less the held-out evaluations')."""
    import lightning.pytorch as pl

    from retrain import GRPOTrainer, PolicyConfig, RewardCalculator, RewardSpec

    class RewardRecorder(pl.Callback):
        def __init__(self) -> None:
            self.rewards: list[float] = []

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if heldout is not None:
                heldout(pl_module.policy, 0)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self.rewards.append(float(trainer.callback_metrics["train/reward"]))  # this generation's rollouts
            if heldout is not None and (trainer.global_step % spec.eval_every == 0 or trainer.global_step == spec.steps):
                heldout(pl_module.policy, trainer.global_step)

    if spec.task == "skill":
        reward = RewardSpec(name="reasoning_gym_score", kwargs=skill_task.recipe()["reward_kwargs"])
    else:
        reward = RewardSpec(name="retrain.tasks.repeat_letter:letter_fraction")
    pl.seed_everything(spec.seed, verbose=False)
    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=spec.model_dir),
        reward=RewardCalculator([reward]),
        num_generations=spec.generations, max_completion_length=spec.completion_length, temperature=spec.temperature,
        learning_rate=spec.learning_rate, lr_scheduler_type="constant", loss_type=spec.loss_type,
        scale_rewards=spec.scale_rewards, beta=spec.beta, epsilon=spec.epsilon, max_grad_norm=spec.max_grad_norm,
        weight_decay=spec.weight_decay, adam_betas=(spec.adam_beta1, spec.adam_beta2),
        num_iterations=1, steps_per_generation=1,
    )
    recorder = RewardRecorder()
    started = time.perf_counter()
    algo.fit(
        make_data(spec), max_steps=spec.steps, accelerator="cpu", devices=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder],
    )
    return recorder.rewards, time.perf_counter() - started - (heldout.seconds if heldout else 0.0)


def run_trl(spec: Spec, scratch: str, heldout: "skill_task.HeldOut | None") -> tuple[list[float], float]:
    """trl.GRPOTrainer with the same options and prompts; the mean reward of every step, and the seconds
    `train` took (less the held-out evaluations')."""
    import datasets
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from retrain.tasks.repeat_letter import letter_fraction

    datasets.disable_progress_bars()
    rewards: list[float] = []

    def letter_fraction_batch(prompts: list, completions: list, answer: list, **_: Any) -> list[float]:
        """TRL's batch form of `letter_fraction`; called once per generation (= one step here)."""
        scores = [letter_fraction(c, answer=a) for c, a in zip(completions, answer)]
        rewards.append(sum(scores) / len(scores))
        return scores

    options = skill_task.recipe()["reward_kwargs"] if spec.task == "skill" else {}

    def reasoning_gym_batch(prompts: list, completions: list, metadata: list, **_: Any) -> list[float]:
        """TRL's batch form of `reasoning_gym_score` (the record's metadata travels as JSON)."""
        scores = [skill_task.score(skill_task.trl_text(c), json.loads(m), **options) for c, m in zip(completions, metadata)]
        rewards.append(sum(scores) / len(scores))
        return scores

    class HeldOutCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
            heldout(model, 0)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> None:
            if state.global_step % spec.eval_every == 0 or state.global_step == spec.steps:
                heldout(model, state.global_step)

    if spec.task == "skill":
        rows, reward_func = skill_task.trl_rows(prompt_stream(spec)), reasoning_gym_batch
    else:
        rows = [{"prompt": r.prompt, "answer": r.answer} for batch in prompt_stream(spec) for r in batch]
        reward_func = letter_fraction_batch
    config = GRPOConfig(
        output_dir=scratch, report_to="none", use_cpu=True, bf16=False, **trl_no_checkpointing(),
        logging_steps=1, save_strategy="no", disable_tqdm=True, seed=spec.seed,
        shuffle_dataset=False,  # the rows are already in retrain's (seeded) stream order
        per_device_train_batch_size=spec.prompts * spec.generations, num_generations=spec.generations,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=spec.completion_length, temperature=spec.temperature, top_p=1.0, top_k=0,
        learning_rate=spec.learning_rate, lr_scheduler_type="constant", max_steps=spec.steps,
        loss_type=spec.loss_type, scale_rewards=spec.scale_rewards, beta=spec.beta, epsilon=spec.epsilon,
        max_grad_norm=spec.max_grad_norm, weight_decay=spec.weight_decay,
        adam_beta1=spec.adam_beta1, adam_beta2=spec.adam_beta2, adam_epsilon=spec.adam_epsilon,
    )
    trainer = GRPOTrainer(
        model=spec.model_dir, reward_funcs=reward_func, args=config, train_dataset=Dataset.from_list(rows),
        callbacks=[HeldOutCallback()] if heldout is not None else None,
    )
    started = time.perf_counter()
    trainer.train()
    return rewards, time.perf_counter() - started - (heldout.seconds if heldout else 0.0)


def child_main(library: str, spec: Spec, result_file: str) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    started = time.perf_counter()
    heldout = make_heldout(spec)
    with tempfile.TemporaryDirectory() as scratch:
        rewards, train_seconds = run_retrain(spec, heldout) if library == "retrain" else run_trl(spec, scratch, heldout)
    result = {
        "library": library, "seed": spec.seed, "rewards": rewards, "train_seconds": train_seconds,
        "process_seconds": time.perf_counter() - started,  # with imports, model loading and held-out evaluations
    }
    if heldout is not None:
        result["heldout"] = heldout.history
    Path(result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------- parent
def run_child(library: str, spec: Spec) -> dict[str, Any]:
    result = run_script_child(__file__, library, spec)
    rewards = result["rewards"]
    if len(rewards) != spec.steps or not all(math.isfinite(r) and 0.0 <= r <= 1.0 for r in rewards):
        raise RuntimeError(f"{library}, seed {spec.seed}: expected {spec.steps} mean rewards in [0, 1], got {rewards}")
    return result


def moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def mean_curve(curves: list[list[float]]) -> list[float]:
    return [sum(step) / len(step) for step in zip(*curves)]


def window_means(values: list[float], fraction: float = 0.1) -> tuple[float, float]:
    """Mean of the first and of the last `fraction` of the values (at least one value each)."""
    n = max(1, int(len(values) * fraction))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def steps_to(values: list[float], threshold: float, window: int) -> int | None:
    """The first step (1-based) whose trailing `window`-step mean reaches `threshold`, or None.

    Only steps with a full window count, so one lucky early step cannot qualify."""
    window = min(window, len(values))
    for step, value in enumerate(moving_mean(values, window), start=1):
        if step >= window and value >= threshold:
            return step
    return None


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rows = {}
    for library in LIBRARIES:
        mine = sorted((r for r in runs if r["library"] == library), key=lambda r: r["seed"])
        curves = [r["rewards"] for r in mine]
        per_seed = [window_means(c) for c in curves]
        rows[library] = {
            "first_10pct_reward": sum(f for f, _ in per_seed) / len(per_seed),
            "last_10pct_reward": sum(last for _, last in per_seed) / len(per_seed),
            "last_10pct_reward_per_seed": {r["seed"]: last for r, (_, last) in zip(mine, per_seed)},
            "steps_to_threshold": steps_to(mean_curve(curves), THRESHOLD, SMOOTHING),
            "steps_to_threshold_per_seed": {r["seed"]: steps_to(r["rewards"], THRESHOLD, SMOOTHING) for r in mine},
            "train_seconds_per_run": sum(r["train_seconds"] for r in mine) / len(mine),
        }
    return rows


def verdict(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ours, theirs = results["retrain"]["last_10pct_reward"], results["trl"]["last_10pct_reward"]
    return {"learns_at_least_as_well": ours >= theirs - TOLERANCE, "last_10pct_difference": ours - theirs, "tolerance": TOLERANCE}


def markdown(record: dict[str, Any]) -> str:
    c, rows, v = record["config"], record["results"], record["verdict"]
    lines = [
        f"# GRPO learning: retrain vs TRL ({record['commit']}, {record['machine']['summary']})",
        "",
        f"Quickstart task (repeat the letter), tiny char-level Llama ({record['model_parameters'] / 1e3:.0f}k parameters), "
        f"{c['prompts']} prompts x {c['generations']} generations x {c['completion_length']} tokens per step, "
        f"{c['steps']} optimizer steps, seeds {', '.join(map(str, c['seeds']))}; lr {c['learning_rate']:g} constant, "
        f"loss_type {c['loss_type']}, scale_rewards {c['scale_rewards']}, beta {c['beta']:g}, max_grad_norm {c['max_grad_norm']:g}.",
        "",
        f"| library | first 10% reward | last 10% reward | last 10% per seed | steps to {THRESHOLD} ({SMOOTHING}-step mean) | train s/run |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for library in LIBRARIES:
        r = rows[library]
        per_seed = ", ".join(f"{v:.3f}" for v in r["last_10pct_reward_per_seed"].values())
        lines.append(
            f"| {library} | {r['first_10pct_reward']:.3f} | {r['last_10pct_reward']:.3f} | {per_seed} "
            f"| {r['steps_to_threshold'] or 'never'} | {r['train_seconds_per_run']:.0f} |"
        )
    answer = "yes" if v["learns_at_least_as_well"] else "no"
    lines += [
        "",
        f"Rewards are averaged over seeds; steps to {THRESHOLD} is the first step at which the seed-averaged reward's "
        f"trailing {SMOOTHING}-step mean reaches it. retrain learns at least as well as TRL (last-10% mean no more than "
        f"{TOLERANCE} below): **{answer}** (difference {v['last_10pct_difference']:+.3f}).",
        "",
        "![reward vs step](learning.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    """Mean reward vs optimizer step: faint per-seed lines, a bold smoothed mean over seeds per library."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for library in LIBRARIES:
        curves = [r["rewards"] for r in record["runs"] if r["library"] == library]
        steps = list(range(1, len(curves[0]) + 1))
        for curve in curves:
            ax.plot(steps, curve, color=COLORS[library], alpha=0.2, linewidth=0.6)
        smooth = moving_mean(mean_curve(curves), min(SMOOTHING, len(steps)))
        ax.plot(steps, smooth, color=COLORS[library], linewidth=2.0, label=f"{library} ({len(curves)} seeds, {SMOOTHING}-step mean)")
    ax.axhline(THRESHOLD, color="grey", linestyle=":", linewidth=1.0)
    c = record["config"]
    ax.set_title(f"GRPO on repeat-the-letter: {c['prompts']} prompts x {c['generations']} rollouts per step", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("letter", "skill"), default="letter",
                        help="letter: the quickstart's task from scratch; skill: configs/reasoning_skill.yaml from its warm start")
    parser.add_argument("--steps", type=int, help="optimizer steps per run, one generation each (letter: 800; skill: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="letter: 0 1; skill: 0 1 2")
    parser.add_argument("--prompts", type=int, help="prompts per step (letter: 16; skill: the config's)")
    parser.add_argument("--generations", type=int, help="num_generations, rollouts per prompt (letter: 8; skill: the config's)")
    parser.add_argument("--completion-length", type=int, help="max_completion_length (letter: 8; skill: the config's)")
    parser.add_argument("--learning-rate", type=float, help="letter: 1e-3; skill: the config's")
    parser.add_argument("--eval-every", type=int, help="skill: held-out evaluation every this many steps (the config's val_check_interval)")
    parser.add_argument("--heldout", type=int, default=0, help="skill: evaluate the first N held-out problems (0: all)")
    parser.add_argument("--warm-start", default=str(skill_task.REPO / skill_task.recipe()["warm_start"]),
                        help="skill: the starting model; built with examples/warm_start_sft.py when missing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both libraries (0 = torch's default)")
    add_common_arguments(parser, LIBRARIES)
    args = parser.parse_args(argv)
    if args.task == "skill":
        r = skill_task.recipe()
        defaults = {"steps": r["steps"], "seeds": [0, 1, 2], "prompts": r["prompts"], "generations": r["generations"],
                    "completion_length": r["completion_length"], "learning_rate": r["learning_rate"], "eval_every": r["eval_every"]}
    else:
        defaults = {"steps": 800, "seeds": [0, 1], "prompts": 16, "generations": 8, "completion_length": 8, "learning_rate": 1e-3, "eval_every": 0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def warm_start(path: Path) -> Path:
    """The skill task's starting model: `path`, built by examples/warm_start_sft.py first when it is missing."""
    if not (path / "config.json").is_file():
        print(f"building the warm start into {path} (examples/warm_start_sft.py, about 8 minutes)", file=sys.stderr)
        script = skill_task.REPO / "examples" / "warm_start_sft.py"
        done = subprocess.run([sys.executable, str(script), "--out", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the warm start failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return path


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build (or find) the model, run both libraries for every seed, and return the full record."""
    from transformers.utils import logging as hf_logging

    from retrain.models.tiny import TinyModelConfig, build_tiny_model

    hf_logging.disable_progress_bar()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        if args.task == "skill":
            model_dir = warm_start(Path(args.warm_start))
        else:
            model_dir = build_tiny_model(Path(scratch) / "model", TinyModelConfig(hidden_size=64, num_layers=2))
        parameters = _parameters(model_dir)
        for i, seed in enumerate(args.seeds):  # alternate who goes first, so drift in machine load hits both alike
            spec = Spec(str(model_dir), args.steps, seed, args.prompts, args.generations, args.completion_length,
                        args.learning_rate, threads=args.threads, task=args.task, eval_every=args.eval_every,
                        heldout_size=args.heldout)
            if args.task == "skill":
                r = skill_task.recipe()
                spec.temperature, spec.loss_type, spec.scale_rewards, spec.eval_samples = (
                    r["temperature"], r["loss_type"], r["scale_rewards"], r["eval_samples"])
            for library in LIBRARIES if i % 2 == 0 else LIBRARIES[::-1]:
                runs.append(run_child(library, spec))
                last = runs[-1]
                progress = (f"held-out pass@1 {last['heldout'][0]['pass@1']:.3f} -> {last['heldout'][-1]['pass@1']:.3f}"
                            if "heldout" in last else f"last-10% reward {window_means(last['rewards'])[1]:.3f}")
                print(f"{library:>7} seed {seed}: {progress} in {last['train_seconds']:.0f} s", file=sys.stderr)
    config = {k: v for k, v in asdict(spec).items() if k not in ("model_dir", "seed")}
    record: dict[str, Any] = {
        "benchmark": "learning_skill" if args.task == "skill" else "learning",
        "commit": commit(),
        "machine": machine(load_before, args.threads or _torch_threads()),
        "model_parameters": parameters,
        "runs": runs,
    }
    if args.task == "skill":
        r = skill_task.recipe()
        record["config"] = {**config, "seeds": args.seeds, "task_name": r["source"]["task"], "task_kwargs": r["source"]["task_kwargs"],
                            "heldout_problems": args.heldout or r["val_source"]["size"], "warm_start": str(model_dir)}
        record["results"] = skill_task.summarize(runs, LIBRARIES)
        record["verdict"] = skill_task.verdict(record["results"], TARGET_GAIN, TOLERANCE)
    else:
        record["config"] = {**config, "seeds": args.seeds, "threshold": THRESHOLD, "smoothing_steps": SMOOTHING}
        record["results"] = summarize(runs)
        record["verdict"] = verdict(record["results"])
    record["wall_seconds"] = time.perf_counter() - started
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, Spec(**json.loads(args.spec)), args.result_file)
    record = run_benchmark(args)
    name = record["benchmark"]
    if args.task == "skill":
        table = skill_task.markdown(record)
        out = write_results(args.out_dir, name, record, table)
        skill_task.plot(record, out / f"{name}.png", COLORS, SMOOTHING)
        print(table)
    else:
        table = markdown(record)
        out = write_results(args.out_dir, name, record, table)
        plot(record, out / f"{name}.png")
        print(table)
        v = record["verdict"]
        print(f"verdict: retrain {'learns' if v['learns_at_least_as_well'] else 'does NOT learn'} at least as well as TRL "
              f"(last-10% reward {record['results']['retrain']['last_10pct_reward']:.3f} vs {record['results']['trl']['last_10pct_reward']:.3f}, "
              f"tolerance {TOLERANCE}).")
    print(json.dumps({k: record[k] for k in ("benchmark", "commit", "config", "results", "verdict", "wall_seconds")}))


def _torch_threads() -> int:
    """The threads a child with `--threads 0` runs with (torch's default)."""
    import torch

    return torch.get_num_threads()


def _parameters(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


if __name__ == "__main__":
    main()
