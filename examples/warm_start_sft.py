"""The warm start for `configs/reasoning_skill.yaml`: a small Llama with a character tokenizer, taught a
little of a reasoning-gym task by supervised fine-tuning (TRL's `SFTTrainer`), saved with
`save_pretrained`. GRPO then starts from a model that partly knows the task.

    python examples/warm_start_sft.py                      # writes outputs/chain_sum_warm_start (~8 minutes on 2 CPU cores)
    python examples/warm_start_sft.py --steps 20 --out /tmp/warm --train-size 200   # a quick look

The problems are the RL config's: the same task, `task_kwargs` and system prompt, rendered by the same
chat template, from the training seed, with the held-out split's questions excluded
(`ReasoningGymSource(exclude=...)`), so the held-out accuracy GRPO reports is on problems neither step
saw. The completion is the bare answer followed by the end-of-sequence token (TRL appends it); the
loss is on the completion only (TRL's default for prompt-completion data). Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

TASK = "chain_sum"
TASK_KWARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
SYSTEM_PROMPT = "Give only the number."
HELD_OUT = {"seed": 1, "size": 200}
MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512, "max_position_embeddings": 256}


def training_examples(tokenizer: Any, size: int, seed: int) -> list[dict[str, str]]:
    """Prompt (the chat-template text the trainer will render) and completion (the answer) pairs."""
    from retrain.core.records import with_system_prompt
    from retrain.data import ReasoningGymSource

    source = ReasoningGymSource(task=TASK, size=size, seed=seed, task_kwargs=TASK_KWARGS, exclude=HELD_OUT)
    examples = []
    for i in range(size):
        record = with_system_prompt(source.record(i), SYSTEM_PROMPT)
        prompt = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
        examples.append({"prompt": prompt, "completion": str(record.answer)})
    return examples


def warm_start(out: Path, steps: int, train_size: int, seed: int, learning_rate: float, batch_size: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from retrain.models.tiny import TinyModelConfig, build_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        initial = build_tiny_model(Path(scratch) / "initial", TinyModelConfig(**MODEL, seed=seed))
        model = AutoModelForCausalLM.from_pretrained(initial, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(initial)
        dataset = Dataset.from_list(training_examples(tokenizer, train_size, seed))
        config = SFTConfig(
            output_dir=str(Path(scratch) / "sft"), max_steps=steps, per_device_train_batch_size=batch_size,
            learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=min(20, steps // 10), weight_decay=0.0,
            logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], seed=seed, bf16=False, use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, max_length=MODEL["max_position_embeddings"],
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        result = trainer.train()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"out": str(out), "steps": steps, "train_size": train_size, "seed": seed, "seconds": result.metrics.get("train_runtime"),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/chain_sum_warm_start")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    summary = warm_start(Path(args.out), args.steps, args.train_size, args.seed, args.learning_rate, args.batch_size)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
