"""The loss pass at real vocabulary sizes: retrain's chunked LM head, its full-logits path, and TRL's.

    python benchmarks/lm_head.py                          # vocab 32,000 and 151,936, 16 rows x 512 tokens
    python benchmarks/lm_head.py --vocab 151936 --rows 4 --tokens 512 1024 2048 --repeats 0 \
        --out-dir benchmarks/results/lm_head_lengths       # peak memory as completions grow
    python benchmarks/lm_head.py --vocab 100 --rows 2 --tokens 8 --repeats 1   # smoke test
    python benchmarks/lm_head.py --vocab 151936 --rows 4 --tokens 512 --top-p 0.9 \
        --out-dir benchmarks/results/lm_head_top_p       # also truncated_logps: true at top_p 0.9

One forward and backward of one pass of the GRPO loss (`loss_type="dapo"`, temperature 0.9,
advantages +-1, beta 0) on the `small` model body (hidden 256, 4 layers, tied embeddings) with a
character vocabulary padded to `--vocab` tokens, random weights, `--rows` rows of a 16-token
prompt and `--tokens` completion tokens, through each library's own code: retrain's
`GRPOTrainer.compute_loss` (default: the chunked LM head; `full`: `full_logits: true`; with
`--top-p` below 1 also `truncated`: the chunked head with `truncated_logps: true` at that top_p, the
log-probs of the nucleus the sampler draws from, which TRL has no counterpart of) and TRL 1.16's
`GRPOTrainer._compute_loss` (what its `training_step` runs per micro-batch). The random weights
make every row flat (a nucleus of most of the vocabulary), the nucleus search's hardest case. Each
configuration runs in its own process, so its peak resident memory (`ru_maxrss`) is its own;
"pass MB" is the peak after the pass less the peak before it (the library, the model and the
batch loaded), what the pass itself added. Seconds: the median of `--repeats` passes after one warm-up (0: one pass, memory only).

Prints a Markdown table, then one line of JSON; writes benchmarks/results/lm_head.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import CHILD_ENV, REPO, commit, machine, write_results

MODES = ("chunked", "full", "trl", "truncated")
LABELS = {"chunked": "retrain (chunked head, default)", "full": "retrain full_logits", "trl": "TRL", "truncated": "retrain truncated_logps"}
PROMPT, TEMPERATURE = 16, 0.9


def _batch(vocab: int, rows: int, tokens: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        "prompt_ids": torch.randint(4, vocab, (rows, PROMPT), generator=generator),
        "completion_ids": torch.randint(4, vocab, (rows, tokens), generator=generator),
        "advantages": torch.tensor([1.0, -1.0] * (rows // 2) + [1.0] * (rows % 2)),
    }


def _loss_pass(model_dir: str, vocab: int, rows: int, tokens: int, mode: str, top_p: float) -> Any:
    """A callable running one forward + backward of `mode`'s loss on the fixed batch."""
    import torch

    b = _batch(vocab, rows, tokens)
    if mode == "trl":
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        scratch = tempfile.mkdtemp()
        config = GRPOConfig(
            output_dir=scratch, report_to="none", use_cpu=True, loss_type="dapo", beta=0.0, temperature=TEMPERATURE,
            per_device_train_batch_size=rows, num_generations=rows, max_completion_length=tokens, disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=model_dir, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
            train_dataset=Dataset.from_list([{"prompt": "a"}]),
        )
        inputs = {
            "prompt_ids": b["prompt_ids"], "prompt_mask": torch.ones_like(b["prompt_ids"]),
            "completion_ids": b["completion_ids"], "completion_mask": torch.ones_like(b["completion_ids"]),
            "advantages": b["advantages"], "num_items_in_batch": torch.tensor(float(rows * tokens)),
        }
        model = trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by its training loop; one micro-batch per step here

        def step() -> float:
            model.zero_grad(set_to_none=True)
            loss = trainer._compute_loss(model, inputs)
            loss.backward()
            return float(loss)

        return step

    from retrain import GRPOTrainer, PolicyConfig, RewardCalculator, RewardSpec
    from retrain.trainer.experience import Experience

    algo = GRPOTrainer(
        policy=PolicyConfig(name_or_path=model_dir), reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "a"})]),
        num_generations=rows, max_completion_length=tokens, temperature=TEMPERATURE, loss_type="dapo", full_logits=mode == "full",
        **({"truncated_logps": True, "top_p": top_p} if mode == "truncated" else {}),
    )
    algo.configure_model()
    input_ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    experience = Experience(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), completion_mask=torch.ones(rows, tokens),
        rewards=torch.zeros(rows), advantages=b["advantages"], group_std=torch.ones(rows),
    )

    def step() -> float:
        algo.policy.zero_grad(set_to_none=True)
        loss = algo.compute_loss(experience)[0]
        loss.backward()
        return float(loss)

    return step


def child(model_dir: str, vocab: int, rows: int, tokens: int, repeats: int, mode: str, top_p: float) -> dict[str, Any]:
    step = _loss_pass(model_dir, vocab, rows, tokens, mode, top_p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux
    seconds = []
    for _ in range(repeats + 1 if repeats else 1):
        started = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"setup_rss_mb": before, "peak_rss_mb": peak, "pass_mb": peak - before, "seconds": seconds[1:] if repeats else [], "loss": loss}


def _chunk(vocab: int) -> int:
    from retrain.trainer.lm_head import default_chunk_size

    return default_chunk_size(vocab)


def run(model_dir: str, vocab: int, rows: int, tokens: int, repeats: int, mode: str, top_p: float) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--model-dir", model_dir, "--vocab", str(vocab), "--rows", str(rows),
               "--tokens", str(tokens), "--repeats", str(repeats), "--top-p", str(top_p)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **CHILD_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"{mode} at vocab {vocab}, {tokens} tokens failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(record: dict[str, Any]) -> str:
    c = record["config"]
    modes = [m for m in MODES if m != "truncated" or c.get("top_p", 1.0) < 1.0]
    lines = [
        f"# The loss pass at real vocabulary sizes: retrain vs TRL ({record['commit']}, {record['machine']['summary']})",
        "",
        f"`small` body (hidden 256, 4 layers), {c['rows']} rows x (16 prompt + N completion) tokens, one forward and backward "
        f"of each library's GRPO loss (dapo, temperature {TEMPERATURE}); "
        + (f"seconds: median of {c['repeats']} after a warm-up" if c["repeats"] else "not timed (one pass, memory only)")
        + ". Pass MB: the peak RSS after the pass less the peak before it (library, model and batch loaded)."
        + (f" truncated: top_p {c['top_p']}." if "truncated" in modes else ""),
        "",
        "| vocab | completion tokens | chunk | " + " | ".join(f"{LABELS[m]} pass MB" for m in modes)
        + " | chunked / TRL memory | " + " | ".join(f"{LABELS[m]} s" for m in modes) + " |",
        "| ---: | ---: | ---: | " + " | ".join("---:" for _ in modes) + " | ---: | " + " | ".join("---:" for _ in modes) + " |",
    ]
    for key, r in record["results"].items():
        vocab, tokens = key.split("x")
        memory = {m: r[m]["pass_mb"] for m in modes}
        seconds = {m: f"{statistics.median(r[m]['seconds']):.2f}" if r[m]["seconds"] else "-" for m in modes}
        lines.append(
            f"| {int(vocab):,} | {int(tokens):,} | {r['chunk']} | " + " | ".join(f"{memory[m]:.0f}" for m in modes)
            + f" | {memory['chunked'] / max(memory['trl'], 1e-9):.2f} | " + " | ".join(seconds[m] for m in modes) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 151_936])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512], help="completion lengths to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after a warm-up (0: one untimed pass)")
    parser.add_argument("--top-p", type=float, default=1.0, help="below 1: also the truncated_logps pass at this top_p")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model_dir, args.vocab[0], args.rows, args.tokens[0], args.repeats, args.child, args.top_p)))
        return
    from retrain.models.tiny import TinyModelConfig, build_tiny_model

    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for vocab in args.vocab:
            model_dir = str(build_tiny_model(
                Path(scratch) / f"v{vocab}",
                TinyModelConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                                max_position_embeddings=PROMPT + max(args.tokens), vocab_size=vocab),
            ))
            for tokens in args.tokens:
                modes = [m for m in MODES if m != "truncated" or args.top_p < 1.0]
                results[f"{vocab}x{tokens}"] = {mode: run(model_dir, vocab, args.rows, tokens, args.repeats, mode, args.top_p) for mode in modes}
                results[f"{vocab}x{tokens}"]["chunk"] = _chunk(vocab)
    import torch

    record = {
        "benchmark": "lm_head", "commit": commit(), "machine": machine(load_before, torch.get_num_threads()),
        "config": {"vocab_sizes": args.vocab, "rows": args.rows, "tokens": args.tokens, "repeats": args.repeats, "top_p": args.top_p},
        "results": results,
    }
    table = markdown(record)
    write_results(args.out_dir, "lm_head", record, table)
    print(table)
    print(json.dumps({k: record[k] for k in ("benchmark", "commit", "config", "results")}))


if __name__ == "__main__":
    main()
