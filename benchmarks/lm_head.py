"""The loss's log-prob pass at real vocabulary sizes: the full logits vs `logits_chunk_size`.

    python benchmarks/lm_head.py                          # vocab 32,000 and 151,936, 16 rows x 512 tokens
    python benchmarks/lm_head.py --vocab 100 --rows 2 --tokens 8 --repeats 1   # smoke test

One forward and backward of what `compute_loss` asks of the policy: `completion_logps` with entropy
(at temperature 0.9, gradient through the log-probs and the entropy) on the `small` model body
(hidden 256, 4 layers) with the given vocabulary, random weights, `--rows` rows of 16 prompt +
`--tokens` completion tokens. Each configuration runs in its own process, so its peak resident
memory (`ru_maxrss`) is its own; the model and batch alone are measured too (the `baseline` row),
so "pass MB" is what the pass itself added. Median seconds of `--repeats` passes after a warm-up.

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
import time
from typing import Any

from common import REPO, commit, machine, write_results

MODES = ("baseline", "full", "chunked")


def child(vocab: int, rows: int, tokens: int, repeats: int, mode: str) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrain.trainer.experience import completion_logps

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, tie_word_embeddings=True,
    ))
    ids = torch.randint(0, vocab, (rows, 16 + tokens))
    mask = torch.ones_like(ids)
    chunk = _chunk(vocab) if mode == "chunked" else None
    seconds = []
    for _ in range(0 if mode == "baseline" else repeats + 1):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        logps, entropy = completion_logps(
            model, ids, mask, tokens, temperature=0.9, with_entropy=True, entropy_grad=True, chunk_size=chunk,
        )
        (logps.sum() + 0.01 * entropy.sum()).backward()
        seconds.append(time.perf_counter() - started)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds[1:]}


def _chunk(vocab: int) -> int:
    from retrain.trainer.lm_head import default_chunk_size

    return default_chunk_size(vocab)


def run(vocab: int, rows: int, tokens: int, repeats: int, mode: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--vocab", str(vocab), "--rows", str(rows), "--tokens", str(tokens), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"{mode} at vocab {vocab} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(record: dict[str, Any]) -> str:
    c = record["config"]
    lines = [
        f"# The loss's log-prob pass: full logits vs chunked ({record['commit']}, {record['machine']['summary']})",
        "",
        f"`small` body (hidden 256, 4 layers), {c['rows']} rows x {c['tokens']} completion tokens, forward + backward of "
        f"`completion_logps` with entropy, median of {c['repeats']}.",
        "",
        "| vocab | chunk | full s | chunked s | full pass MB | chunked pass MB | memory chunked / full |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for vocab, r in record["results"].items():
        base = r["baseline"]["peak_rss_mb"]
        full, chunked = r["full"]["peak_rss_mb"] - base, r["chunked"]["peak_rss_mb"] - base
        lines.append(
            f"| {int(vocab):,} | {r['chunk']} | {statistics.median(r['full']['seconds']):.3f} | {statistics.median(r['chunked']['seconds']):.3f} | "
            f"{full:.0f} | {chunked:.0f} | {chunked / max(full, 1e-9):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 151_936])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.vocab[0], args.rows, args.tokens, args.repeats, args.child)))
        return
    load_before = os.getloadavg()[0]
    results = {}
    for vocab in args.vocab:
        results[str(vocab)] = {mode: run(vocab, args.rows, args.tokens, args.repeats, mode) for mode in MODES}
        results[str(vocab)]["chunk"] = _chunk(vocab)
    import torch

    record = {
        "benchmark": "lm_head", "commit": commit(), "machine": machine(load_before, torch.get_num_threads()),
        "config": {"vocab_sizes": args.vocab, "rows": args.rows, "tokens": args.tokens, "repeats": args.repeats}, "results": results,
    }
    table = markdown(record)
    write_results(args.out_dir, "lm_head", record, table)
    print(table)
    print(json.dumps({k: record[k] for k in ("benchmark", "commit", "config", "results")}))


if __name__ == "__main__":
    main()
