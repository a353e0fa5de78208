"""Drawing tokens at real vocabulary sizes: retrain's draw (`retrain.rollout.draw`) vs `generate`'s.

    python benchmarks/sampling.py                                   # vocab 100, 32,000, 151,936; 32 rows
    python benchmarks/sampling.py --vocab 1000 --steps 3 --tokens 4 # smoke test
    python benchmarks/sampling.py --device cuda                     # on a GPU (adds the exponential race there too)

Two parts, both on `--rows` rows:

1. One decoding step's draw from fixed logits, median ms of `--steps` calls after a warm-up, for two
   kinds of rows: `peaked` (Gaussian logits with standard deviation 4: a few likely tokens and a long
   tail, as a trained model's; the table gives their entropy and top-p 0.9 nucleus size) and `flat`
   (standard deviation 0.02: an untrained model's, whose nucleus is most of the vocabulary). Each
   `generate` column is what `generate` does per token: `transformers`' warpers, `softmax`,
   `torch.multinomial`; the exponential race (`(p / Exponential(1)).argmax()`) is the other exact
   draw in common use; retrain's column is `draw()` with the same settings.
2. A whole generation: the benchmark's `small` model body (hidden 256, 4 layers) with each vocabulary,
   `--rows` x `--tokens` forced new tokens through the trainer's `BatchingSampler`: retrain's decoder
   with its draw (`inverse_cdf`), the same decoder with `draw="generate"` (`transformers`' warpers and
   `torch.multinomial`), and `generate` itself; `--top-p` for all three.

Prints a Markdown table, then one line of JSON; writes benchmarks/results/sampling.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from common import commit, machine, write_results
from throughput import build_model, prompt_records

KINDS = {"peaked": 4.0, "flat": 0.02}  # standard deviation of the Gaussian logits


def _median_ms(function: Callable[[], Any], steps: int, sync: Callable[[], None]) -> float:
    function()  # warm-up
    sync()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        function()
        sync()
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds)


def draw_step(vocab: int, kind: str, rows: int, steps: int, device: str) -> dict[str, Any]:
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from retrain.rollout.draw import draw, nucleus

    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(rows, vocab, generator=generator) * KINDS[kind]).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def generate_draw(warper=None):
        scores = logits if warper is None else warper(None, logits)
        return torch.multinomial(scores.softmax(-1), 1)

    def race():
        probs = logits.softmax(-1)
        return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)

    top_p, top_k = TopPLogitsWarper(0.9), TopKLogitsWarper(50)
    ms = {
        "generate": _median_ms(generate_draw, steps, sync),
        "race": _median_ms(race, steps, sync),
        "retrain": _median_ms(lambda: draw(logits), steps, sync),
        "generate_top_p": _median_ms(lambda: generate_draw(top_p), steps, sync),
        "retrain_top_p": _median_ms(lambda: draw(logits, top_p=0.9), steps, sync),
        "generate_top_k": _median_ms(lambda: generate_draw(top_k), steps, sync),
        "retrain_top_k": _median_ms(lambda: draw(logits, top_k=50), steps, sync),
    }
    probs = logits.float().softmax(-1)
    entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
    kept = float((nucleus(probs, 0.9) > 0).sum(-1).float().mean())
    return {
        "vocab": vocab, "kind": kind, "ms": ms, "entropy_nats": entropy, "nucleus_size_top_p_0.9": kept,
        "speedup": ms["generate"] / ms["retrain"], "speedup_top_p": ms["generate_top_p"] / ms["retrain_top_p"],
        "speedup_top_k": ms["generate_top_k"] / ms["retrain_top_k"],
    }


def whole_generation(vocab: int, rows: int, tokens: int, top_p: float, device: str, scratch: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrain.rollout.sampler import BatchingSampler

    model_dir = scratch / f"model_{vocab}"
    build_model(model_dir, "small", vocab_size=vocab)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    contexts = [tokenizer(prompt_records(1)[0]["prompt"])["input_ids"]] * rows
    variants = {
        "retrain": dict(backend="auto"),
        "retrain_generate_draw": dict(backend="auto", draw="generate"),
        "generate": dict(backend="transformers"),
    }
    seconds = {}
    for name, options in variants.items():
        sampler = BatchingSampler(model, tokenizer, max_new_tokens=tokens, min_new_tokens=tokens, top_p=top_p, **options)
        torch.manual_seed(0)
        sampler._generate_batch(contexts[:2], 2)  # warm-up
        started = time.perf_counter()
        out = sampler._generate_batch(contexts, tokens)
        seconds[name] = time.perf_counter() - started
        if any(len(row) != tokens for row in out):
            raise RuntimeError(f"{name}: a row stopped before {tokens} tokens")
    return {"vocab": vocab, "seconds": seconds, "speedup_vs_generate": seconds["generate"] / seconds["retrain"],
            "speedup_vs_generate_draw": seconds["retrain_generate_draw"] / seconds["retrain"]}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    steps = [draw_step(v, kind, args.rows, args.steps, args.device) for v in args.vocab for kind in KINDS]
    with tempfile.TemporaryDirectory() as scratch:
        generations = [whole_generation(v, args.rows, args.tokens, args.top_p, args.device, Path(scratch))
                       for v in args.vocab if v >= args.generation_min_vocab]
    return {
        "benchmark": "sampling", "commit": commit(), "machine": machine(load_before, torch.get_num_threads(), args.device),
        "config": {"rows": args.rows, "steps": args.steps, "tokens": args.tokens, "top_p": args.top_p, "device": args.device,
                   "logit_std": KINDS},
        "draw_step": steps, "generation": generations,
    }


def markdown(record: dict[str, Any]) -> str:
    c = record["config"]
    lines = [
        f"# Drawing tokens at real vocabulary sizes ({record['commit']}, {record['machine']['summary']})",
        "",
        f"One decoding step's draw for {c['rows']} rows, median ms of {c['steps']} calls (`generate`: `transformers`' warpers + "
        "`softmax` + `torch.multinomial`; race: `(p / Exponential(1)).argmax()`; retrain: `retrain.rollout.draw.draw`).",
        "",
        "| vocab | rows | entropy (nats) | nucleus at 0.9 | `generate` | race | retrain | speed-up | top-p 0.9: `generate` | retrain | speed-up | top-k 50: `generate` | retrain | speed-up |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in record["draw_step"]:
        ms = r["ms"]
        lines.append(
            f"| {r['vocab']:,} | {r['kind']} | {r['entropy_nats']:.2f} | {r['nucleus_size_top_p_0.9']:,.0f} | {ms['generate']:.2f} | "
            f"{ms['race']:.2f} | {ms['retrain']:.2f} | {r['speedup']:.1f}x | {ms['generate_top_p']:.2f} | {ms['retrain_top_p']:.2f} | "
            f"{r['speedup_top_p']:.1f}x | {ms['generate_top_k']:.2f} | {ms['retrain_top_k']:.2f} | {r['speedup_top_k']:.1f}x |"
        )
    if record["generation"]:
        lines += [
            "",
            f"A whole generation: model `small` body, {c['rows']} rows x {c['tokens']} new tokens, top-p {c['top_p']}, one call, seconds.",
            "",
            "| vocab | retrain decoder | same decoder, `draw=\"generate\"` | `generate` | speed-up vs `generate` | from the draw alone |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for g in record["generation"]:
            s = g["seconds"]
            lines.append(f"| {g['vocab']:,} | {s['retrain']:.2f} | {s['retrain_generate_draw']:.2f} | {s['generate']:.2f} | "
                         f"{g['speedup_vs_generate']:.1f}x | {g['speedup_vs_generate_draw']:.1f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[100, 32000, 151936])
    parser.add_argument("--rows", type=int, default=32, help="rows drawn at once (a batch of rollouts)")
    parser.add_argument("--steps", type=int, default=20, help="timed draw calls per measurement")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per row in the whole-generation part")
    parser.add_argument("--top-p", type=float, default=1.0, help="top-p of the whole-generation part")
    parser.add_argument("--generation-min-vocab", type=int, default=1000, help="whole generations only for vocabularies this large")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    record = run_benchmark(args)
    table = markdown(record)
    print(table)
    print(json.dumps(record))
    write_results(args.out_dir, "sampling", record, table)


if __name__ == "__main__":
    main()
