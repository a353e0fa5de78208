"""The held-out skill task of `learning.py --task skill`: what both libraries train on and the one
evaluator that scores both.

Everything comes from `configs/reasoning_skill.yaml`, so the benchmark runs the recipe a user runs:
the reasoning-gym task and its options, the system prompt, the held-out split (200 problems of
another seed, excluded from the training stream), num_generations, max_completion_length, the
learning rate, loss_type, scale_rewards, prompts per step and the number of steps.

The evaluator (`HeldOut`) is shared: each library's child process calls it on its own model every
`eval_every` optimizer steps (and before the first), with the same sampling for both: transformers'
`generate` at temperature 1 (top_k 0, top_p 1, the training distribution), `samples` completions
per problem, seeded from the step so both libraries draw their held-out samples alike, each scored
by retrain's `reasoning_gym_score` (the task's own checker). pass@1 is the mean over problems of the
fraction of correct samples, pass@k whether any was correct, maj@k whether the most common answer
was. Its seconds are reported and not counted as training time.
"""

from __future__ import annotations

import collections
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "reasoning_skill.yaml"


@functools.lru_cache(maxsize=None)
def recipe(path: Path = CONFIG) -> dict[str, Any]:
    """The config's task, data and GRPO settings the benchmark mirrors (read once; callers do not mutate it)."""
    config = yaml.safe_load(path.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    return {
        "source": data["source"]["init_args"], "val_source": data["val_source"]["init_args"],
        "system_prompt": data["system_prompt"], "prompts": data["batch_size"],
        "generations": model["num_generations"], "completion_length": model["max_completion_length"],
        "learning_rate": model["learning_rate"], "temperature": model.get("temperature", 1.0),
        "loss_type": model["loss_type"], "scale_rewards": model["scale_rewards"],
        "eval_samples": model.get("eval_num_generations", 4), "steps": config["trainer"]["max_steps"],
        "eval_every": config["trainer"]["val_check_interval"], "warm_start": model["policy"]["name_or_path"],
        "reward_kwargs": _only_reward(model["reward"]["rewards"]).get("kwargs", {}),
    }


def train_data(prompts: int, seed: int) -> Any:
    """The config's training stream as retrain's `PromptDataModule` (seeded) yields it."""
    from retrain import PromptDataModule
    from retrain.data import ReasoningGymSource

    r = recipe()
    return PromptDataModule(source=ReasoningGymSource(**r["source"]), system_prompt=r["system_prompt"], batch_size=prompts, seed=seed)


def heldout_records(size: int = 0) -> list[Any]:
    """The first `size` held-out problems (0: all of them), with the system prompt, in order."""
    from retrain.core.records import with_system_prompt
    from retrain.data import ReasoningGymSource

    r = recipe()
    source = ReasoningGymSource(**r["val_source"])
    return [with_system_prompt(source.record(i), r["system_prompt"]) for i in range(size or r["val_source"]["size"])]


def score(completion: str, metadata: dict[str, Any], **options: Any) -> float:
    """`reasoning_gym_score` of a completion, with the config's options (`options`) or the task's own
    partial credit (none)."""
    from retrain.reward.reasoning_gym import reasoning_gym_score

    return reasoning_gym_score(completion, **metadata, **options)


def _only_reward(rewards: list[dict[str, Any]]) -> dict[str, Any]:
    if len(rewards) != 1 or rewards[0]["name"] != "reasoning_gym_score":
        raise ValueError(f"{CONFIG}: the benchmark mirrors one reward, reasoning_gym_score; the config has {rewards}")
    return rewards[0]


class HeldOut:
    """Scores a model on the held-out problems; `history` keeps one entry per call."""

    def __init__(self, model_dir: str, samples: int, max_new_tokens: int, seed: int, size: int = 0) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"  # generation continues every prompt from its last token
        self.records = heldout_records(size)
        texts = [self.tokenizer.apply_chat_template(r.prompt, tokenize=False, add_generation_prompt=True) for r in self.records]
        self.inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        self.samples, self.max_new_tokens, self.seed = samples, max_new_tokens, seed
        self.history: list[dict[str, Any]] = []

    def __call__(self, model: Any, step: int) -> dict[str, Any]:
        import torch

        started, was_training = time.perf_counter(), model.training
        model.eval()
        with torch.random.fork_rng(), torch.no_grad():  # the training run's random stream is left as it was
            torch.manual_seed(self.seed * 100_003 + step)
            out = model.generate(
                **{k: v.to(model.device) for k, v in self.inputs.items()}, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                num_return_sequences=self.samples, max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )
        model.train(was_training)
        texts = self.tokenizer.batch_decode(out[:, self.inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        pass1 = passk = majk = 0.0
        for i, record in enumerate(self.records):
            mine = texts[i * self.samples:(i + 1) * self.samples]
            correct = [score(t, record.metadata, partial_credit=False) == 1.0 for t in mine]
            pass1 += sum(correct) / len(correct)
            passk += any(correct)
            top = collections.Counter(t.strip() for t in mine).most_common(1)[0][0]
            majk += correct[[t.strip() for t in mine].index(top)]
        n, k = len(self.records), self.samples
        entry = {"step": step, "pass@1": pass1 / n, f"pass@{k}": passk / n, f"maj@{k}": majk / n, "seconds": time.perf_counter() - started}
        self.history.append(entry)
        return entry

    @property
    def seconds(self) -> float:
        return sum(e["seconds"] for e in self.history)


def trl_rows(batches: list[list[Any]]) -> list[dict[str, Any]]:
    """TRL's dataset rows for retrain's prompt batches (in stream order): the conversational prompt and
    the record's metadata as JSON (Arrow would merge the entries' nested dicts into one schema)."""
    return [{"prompt": r.prompt, "metadata": json.dumps(r.metadata)} for batch in batches for r in batch]


def trl_text(completion: Any) -> str:
    """TRL's completion (a message list for conversational prompts) as text."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


# ------------------------------------------------------------------------------------------ report
def seed_numbers(run: dict[str, Any]) -> dict[str, Any]:
    """One run's held-out numbers: pass@1 before RL and after it, and every evaluation."""
    history = run["heldout"]
    return {
        "seed": run["seed"], "pass@1_start": history[0]["pass@1"], "pass@1_end": history[-1]["pass@1"],
        "heldout": [{k: v for k, v in e.items() if k != "seconds"} for e in history],
        "train_seconds": run["train_seconds"], "reward_first_10pct": _mean(run["rewards"][: max(1, len(run["rewards"]) // 10)]),
        "reward_last_10pct": _mean(run["rewards"][-max(1, len(run["rewards"]) // 10):]),
    }


def summarize(runs: list[dict[str, Any]], libraries: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per library: pass@1 at the start and the end averaged over seeds, the seed-averaged held-out
    curve, the mean training seconds per run, and each seed's numbers."""
    results = {}
    for library in libraries:
        seeds = [seed_numbers(r) for r in sorted((r for r in runs if r["library"] == library), key=lambda r: r["seed"])]
        steps = [e["step"] for e in seeds[0]["heldout"]]
        results[library] = {
            "pass@1_start": _mean([s["pass@1_start"] for s in seeds]),
            "pass@1_end": _mean([s["pass@1_end"] for s in seeds]),
            "pass@1_by_step": {step: _mean([s["heldout"][i]["pass@1"] for s in seeds]) for i, step in enumerate(steps)},
            "train_seconds_per_run": _mean([s["train_seconds"] for s in seeds]),
            "seeds": seeds,
        }
        results[library]["pass@1_gain"] = results[library]["pass@1_end"] - results[library]["pass@1_start"]
    return results


def verdict(results: dict[str, dict[str, Any]], target_gain: float, tolerance: float) -> dict[str, Any]:
    """The issue's bars: RL lifts held-out pass@1 by `target_gain` (seed mean); retrain is at least as
    accurate as TRL at every evaluated step (within `tolerance`, seed means) and at least as fast."""
    ours, theirs = results["retrain"], results["trl"]
    gaps = {step: ours["pass@1_by_step"][step] - theirs["pass@1_by_step"][step] for step in ours["pass@1_by_step"] if step > 0}
    # Seed-paired: each seed's two runs start from the same weights and see the same prompts, so the
    # spread of their difference across seeds is the noise a difference must stand out from.
    paired = [
        [a["pass@1"] - b["pass@1"] for a, b in zip(mine["heldout"], other["heldout"]) if a["step"] > 0]
        for mine, other in zip(ours["seeds"], theirs["seeds"])
    ]
    per_seed = [_mean(d) for d in paired]  # each seed's mean difference over the evaluated steps
    spread = statistics.stdev(per_seed) / len(per_seed) ** 0.5 if len(per_seed) > 1 else float("nan")
    return {
        "mean_difference_over_steps": _mean(per_seed), "mean_difference_standard_error": spread,
        "mean_difference_by_seed": per_seed,
        "retrain_gain_reaches_target": ours["pass@1_gain"] >= target_gain, "target_gain": target_gain,
        "at_least_as_accurate_at_every_step": all(g >= -tolerance for g in gaps.values()), "tolerance": tolerance,
        "worst_step_difference": min(gaps.values()), "end_difference": ours["pass@1_end"] - theirs["pass@1_end"],
        "at_least_as_fast": ours["train_seconds_per_run"] <= theirs["train_seconds_per_run"],
        "speed_ratio_trl_over_retrain": theirs["train_seconds_per_run"] / ours["train_seconds_per_run"],
    }


def markdown(record: dict[str, Any]) -> str:
    c, rows, v = record["config"], record["results"], record["verdict"]
    lines = [
        f"# GRPO teaching a held-out skill: retrain vs TRL ({record['commit']}, {record['machine']['summary']})",
        "",
        f"reasoning-gym `{c['task_name']}` ({c['task_kwargs']}) from the warm start of `examples/warm_start_sft.py` "
        f"({record['model_parameters'] / 1e6:.1f}M parameters), `configs/reasoning_skill.yaml`: {c['prompts']} prompts x "
        f"{c['generations']} generations per step, {c['steps']} steps, lr {c['learning_rate']:g}, loss_type {c['loss_type']}, "
        f"scale_rewards {c['scale_rewards']}; held-out: {c['heldout_problems']} problems x {c['eval_samples']} samples at "
        f"temperature 1, every {c['eval_every']} steps, one evaluator for both; seeds {', '.join(map(str, c['seeds']))}.",
        "",
        "| library | held-out pass@1, warm start | after RL | gain | per seed (start -> end) | train s/run |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for library, r in rows.items():
        per_seed = ", ".join(f"{s['pass@1_start']:.3f} -> {s['pass@1_end']:.3f}" for s in r["seeds"])
        lines.append(f"| {library} | {r['pass@1_start']:.3f} | {r['pass@1_end']:.3f} | {r['pass@1_gain']:+.3f} | {per_seed} | {r['train_seconds_per_run']:.0f} |")
    steps = list(rows["retrain"]["pass@1_by_step"])
    lines += [
        "",
        "| held-out pass@1 at step | " + " | ".join(map(str, steps)) + " |",
        "| --- |" + " ---: |" * len(steps),
    ]
    for library, r in rows.items():
        lines.append(f"| {library} | " + " | ".join(f"{r['pass@1_by_step'][s]:.3f}" for s in steps) + " |")
    yes = {True: "yes", False: "**no**"}
    lines += [
        "",
        f"retrain's gain reaches {v['target_gain']:+.2f}: {yes[v['retrain_gain_reaches_target']]}; at least TRL's held-out "
        f"pass@1 at every evaluated step (within {v['tolerance']}): {yes[v['at_least_as_accurate_at_every_step']]} (worst "
        f"{v['worst_step_difference']:+.3f}, end {v['end_difference']:+.3f}); at least as fast: {yes[v['at_least_as_fast']]} "
        f"(TRL/retrain train time {v['speed_ratio_trl_over_retrain']:.2f}x).",
        "",
        f"retrain - TRL held-out pass@1, averaged over the evaluated steps after 0, per seed: "
        f"{', '.join(f'{d:+.3f}' for d in v['mean_difference_by_seed'])}; mean {v['mean_difference_over_steps']:+.3f} "
        f"(standard error over seeds {v['mean_difference_standard_error']:.3f}).",
        "",
        "![held-out pass@1 and train reward vs step](learning_skill.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path, colors: dict[str, str], smoothing: int) -> None:
    """Two panels: the train reward (faint per seed, bold smoothed seed mean) and held-out pass@1 (per
    seed and seed mean) against the optimizer step, both libraries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for library, color in colors.items():
        runs = [r for r in record["runs"] if r["library"] == library]
        curves = [r["rewards"] for r in runs]
        steps = list(range(1, len(curves[0]) + 1))
        for curve in curves:
            left.plot(steps, curve, color=color, alpha=0.15, linewidth=0.6)
        mean = [_mean(list(step)) for step in zip(*curves)]
        left.plot(steps, _trailing(mean, smoothing), color=color, linewidth=2.0, label=f"{library} ({len(runs)} seeds, {smoothing}-step mean)")
        for run in runs:
            right.plot([e["step"] for e in run["heldout"]], [e["pass@1"] for e in run["heldout"]], color=color, alpha=0.3, linewidth=0.8, marker=".")
        by_step = record["results"][library]["pass@1_by_step"]
        right.plot(list(by_step), list(by_step.values()), color=color, linewidth=2.0, marker="o", label=f"{library} (seed mean)")
    left.set_title("train reward (task score of the step's rollouts)", fontsize=10)
    right.set_title(f"held-out pass@1 ({record['config']['heldout_problems']} problems x {record['config']['eval_samples']} samples)", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _trailing(values: list[float], window: int) -> list[float]:
    return [_mean(values[max(0, i + 1 - window): i + 1]) for i in range(len(values))]
