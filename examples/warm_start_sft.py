"""The warm start for `configs/reasoning_skill.yaml`: a small Llama with a character tokenizer, taught
some of a reasoning-gym task by supervised fine-tuning (TRL's `SFTTrainer`), saved with
`save_pretrained` where the config loads its policy from. GRPO then starts from a model that partly
knows the task.

    python examples/warm_start_sft.py                      # writes outputs/spell_backward_warm_start (~4 minutes on 2 CPU cores)
    python examples/warm_start_sft.py --steps 20 --out /tmp/warm --train-size 200   # a quick look

The task, its options, the system prompt and the held-out split are read from the RL config
(`--config`), so the two steps cannot drift apart. The supervised problems are the config's task
drawn with another seed (`--data-seed`), the held-out split's questions excluded
(`ReasoningGymSource(exclude=...)`): the held-out accuracy GRPO reports is on problems neither step
saw. They are rendered by the same chat template; the completion is the bare answer followed by the
end-of-sequence token (TRL appends it); the loss is on the completion only (TRL's default for
prompt-completion data). Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "reasoning_skill.yaml")
# reasoning-gym draws item i of seed s from Random(s + i), so seeds close to the RL stream's (0) share
# its problems; a seed a million away gives problems RL never trains on, except where a word or a
# number recurs by chance.
DATA_SEED = 1_000_000
MODEL = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512, "max_position_embeddings": 256}


def recipe(config_path: str) -> dict[str, Any]:
    """The RL config's task (its training source, held-out split excluded) and system prompt, and where
    it loads its policy from (this script's default output)."""
    import yaml

    config = yaml.safe_load(Path(config_path).read_text())
    data = config["data"]["init_args"]
    return {"source": data["source"]["init_args"], "system_prompt": data.get("system_prompt"),
            "out": config["model"]["init_args"]["policy"]["name_or_path"]}


def training_examples(tokenizer: Any, config_path: str, size: int, data_seed: int) -> list[dict[str, str]]:
    """Prompt (the chat-template text the trainer will render) and completion (the answer) pairs: `size`
    problems of the RL config's task drawn with `data_seed`, the held-out split excluded."""
    from retrain.core.records import with_system_prompt
    from retrain.data import ReasoningGymSource

    r = recipe(config_path)
    source = ReasoningGymSource(**{**r["source"], "size": size, "seed": data_seed})
    examples = []
    for i in range(size):
        record = with_system_prompt(source.record(i), r["system_prompt"])
        prompt = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
        examples.append({"prompt": prompt, "completion": str(record.answer)})
    return examples


def warm_start(
    out: Path, config_path: str, steps: int, train_size: int, seed: int, learning_rate: float, batch_size: int, data_seed: int
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from retrain.models.tiny import TinyModelConfig, build_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        initial = build_tiny_model(Path(scratch) / "initial", TinyModelConfig(**MODEL, seed=seed))
        model = AutoModelForCausalLM.from_pretrained(initial, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(initial)
        dataset = Dataset.from_list(training_examples(tokenizer, config_path, train_size, data_seed))
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
    return {"out": str(out), "steps": steps, "train_size": train_size, "seed": seed, "data_seed": data_seed, "seconds": result.metrics.get("train_runtime"),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=CONFIG, help="the RL config whose task, system prompt and held-out split to use")
    parser.add_argument("--out", help="where to save the model (default: the config's policy.name_or_path)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--train-size", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0, help="the model's initialization and the trainer's seed")
    parser.add_argument("--data-seed", type=int, default=DATA_SEED, help="the reasoning-gym seed of the supervised problems")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    out = Path(args.out or recipe(args.config)["out"])
    summary = warm_start(out, args.config, args.steps, args.train_size, args.seed, args.learning_rate, args.batch_size, args.data_seed)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
