"""How far each sampler's log-probs are from the trainer's, by backend and dtype.

    python benchmarks/mismatch.py                            # small model, 32 rows x 64 tokens, float32 and bfloat16
    python benchmarks/mismatch.py --model-size tiny --rows 4 --tokens 8    # smoke test
    python benchmarks/mismatch.py --device cuda --model-size medium        # on a GPU

For each dtype the model is loaded in that dtype; each backend (retrain's decoder, `generate`)
samples `--rows` continuations of `--tokens` tokens through the trainer's `BatchingSampler`, and the
trainer's log-probs of the same tokens are recomputed with `completion_logps` (the loss's forward).
The table shows the metrics training logs every step (`train/sampler/...`, see
`retrain/trainer/off_policy.py`) and the largest per-token |log-prob difference|.

Prints a Markdown table, then one line of JSON; writes benchmarks/results/mismatch.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from common import commit, machine, write_results
from throughput import MODEL_SIZES, build_model, prompt_records

BACKENDS = ("auto", "transformers")
DTYPES = ("float32", "bfloat16")


def measure(model: Any, tokenizer: Any, backend: str, rows: int, tokens: int, temperature: float) -> dict[str, float]:
    import torch

    from retrain.rollout.sampler import BatchingSampler
    from retrain.trainer.experience import completion_logps
    from retrain.trainer.off_policy import sampler_mismatch

    torch.manual_seed(0)
    # No forced length (`min_new_tokens`): suppressing end-of-sequence changes the sampled
    # distribution, and the mismatch would show that instead of the backends' numerics.
    sampler = BatchingSampler(model, tokenizer, max_new_tokens=tokens, temperature=temperature, backend=backend)
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in prompt_records(rows)]
    sampled, logprobs = sampler._sample_batch(prompts, tokens)
    device = next(model.parameters()).device
    width = max(len(row) for row in sampled)
    completion = torch.full((rows, width), tokenizer.pad_token_id, device=device)
    sampler_logps = torch.zeros((rows, width), device=device)
    mask = torch.zeros((rows, width), device=device)
    for i, (row, row_logprobs) in enumerate(zip(sampled, logprobs)):
        kept = sampler._to_generation(row, row_logprobs)  # cut after the first end-of-sequence token
        completion[i, : len(kept.token_ids)] = torch.tensor(kept.token_ids)
        sampler_logps[i, : len(kept.token_ids)] = torch.tensor(kept.logprobs)
        mask[i, : len(kept.token_ids)] = 1.0
    input_ids = torch.cat([torch.tensor(prompts, device=device), completion], dim=1)
    attention_mask = torch.cat([torch.ones((rows, len(prompts[0])), device=device), mask], dim=1).long()
    with torch.no_grad():
        trainer_logps, _ = completion_logps(model, input_ids, attention_mask, width, temperature=temperature)
    metrics = {k.split("/")[1]: float(v) for k, v in sampler_mismatch(trainer_logps.float(), sampler_logps, mask).items()}
    metrics["max_abs_logprob_diff"] = float(((trainer_logps.float() - sampler_logps).abs() * mask).max())
    metrics["tokens"] = int(mask.sum())
    metrics["own_decoder_used"] = sampler.uses_own_decoder
    return metrics


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        shape = build_model(model_dir, args.model_size)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        for dtype in DTYPES:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(args.device).eval()
            for backend in BACKENDS:
                results[f"{backend}/{dtype}"] = measure(model, tokenizer, backend, args.rows, args.tokens, args.temperature)
    return {
        "benchmark": "mismatch", "commit": commit(), "machine": machine(load_before, torch.get_num_threads(), args.device),
        "model": {"size": args.model_size, **shape}, "rows": args.rows, "tokens": args.tokens, "temperature": args.temperature,
        "results": results,
    }


def table(record: dict[str, Any]) -> str:
    lines = [
        f"Sampler vs trainer log-probs ({record['model']['size']} model, {record['rows']} rows x {record['tokens']} tokens, "
        f"temperature {record['temperature']}, commit {record['commit']}; {record['machine']['summary']})",
        "",
        "| backend | dtype | train/sampler/kl | ratio_mean | ratio_min | ratio_max | max abs log-prob diff |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, m in record["results"].items():
        backend, dtype = key.split("/")
        name = "retrain decoder" if m["own_decoder_used"] else "transformers generate"
        lines.append(
            f"| {name} | {dtype} | {m['kl']:.2e} | {m['ratio_mean']:.4f} | {m['ratio_min']:.4f} | {m['ratio_max']:.4f} | {m['max_abs_logprob_diff']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    record = run(args)
    text = table(record)
    print(text)
    print(json.dumps(record))
    write_results(args.out_dir, "mismatch", record, text)


if __name__ == "__main__":
    main()
