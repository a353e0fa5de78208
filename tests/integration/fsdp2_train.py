"""A training run for `test_fsdp2_cpu.py`: GRPO on the tiny model, single process or FSDP2 on CPU.

    python fsdp2_train.py --model DIR --out DIR --devices 2 --steps 4 [--ckpt_path PATH] [--precision bf16-mixed]

With `--devices 2` the run uses Lightning's `ModelParallelStrategy` (gloo), which re-launches this
script once per extra rank. The global batch is the same in both layouts (4 prompts per generation:
one process with batch 4, or two with batch 2, records in source order, so rank r gets records r,
r + 2, ...), and every record is rolled out in its own `generate` call (both layouts use
`generation_backend: transformers`) seeded by (prompt, step): its
samples do not depend on which rank rolls it out or beside which other records. So the FSDP2 run
and the single-process run see the same rollouts, and their updates must agree.

Each rank writes `rank{r}.json` (per step: the loss and every record's completions); rank 0 also
writes `policy.pt`, the full (gathered) policy weights at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl
import torch

from retrain.data.datamodule import PromptDataModule
from retrain.models.loading import PolicyConfig
from retrain.reward.calculator import RewardCalculator, RewardResult, RewardSpec
from retrain.trainer.grpo import GRPOTrainer

GLOBAL_BATCH = 4


class SeededGRPO(GRPOTrainer):
    """GRPO whose rollouts of a record depend only on the record, the step and the weights."""

    def rollout(self, records):
        trajectories, results = [], []
        for record in records:
            torch.manual_seed(zlib.crc32(f"{record.prompt}|{self.global_step}".encode()))
            t, r = super().rollout([record])
            trajectories += t
            results.append(r)
        return trajectories, RewardResult.concat(results)


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        completions: dict[str, list[list[int]]] = {}
        for t in pl_module._last_trajectories:
            completions.setdefault(t.record.prompt, []).append(list(t.completion_ids))
        self.steps.append({
            "step": trainer.global_step,
            "loss": float(trainer.callback_metrics["train/loss"]),
            "reward": float(trainer.callback_metrics["train/reward"]),
            "completions": completions,
        })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--checkpoint_every", type=int, default=0)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--sharded_generation", default="gathered")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    out = Path(args.out)

    if args.devices > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        strategy = "auto"
    callbacks: list[pl.Callback] = [recorder := Recorder()]
    if args.checkpoint_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=args.checkpoint_every, save_top_k=-1))
    algo = SeededGRPO(
        policy=PolicyConfig(name_or_path=args.model, sharded_generation=args.sharded_generation),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
        num_generations=4, max_completion_length=6, learning_rate=1e-3, beta=0.05, max_grad_norm=0.5,
        # A sharded policy samples with `generate`; so does the single process, for the same draws
        # (retrain's decoder draws from the same distribution, not the same tokens).
        generation_backend="transformers",
    )
    data = PromptDataModule(
        prompts=[{"prompt": f"repeat {c}: ", "answer": c} for c in "abcdefgh"],
        batch_size=GLOBAL_BATCH // args.devices, shuffle=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, precision=args.precision, max_steps=args.steps,
        logger=False, enable_checkpointing=bool(args.checkpoint_every), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False,
    )
    # weights_only=False: the checkpoint is our own, and its hyperparameters hold a PolicyConfig.
    trainer.fit(algo, datamodule=data, ckpt_path=args.ckpt_path, weights_only=False if args.ckpt_path else None)

    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(recorder.steps))
    if args.devices > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(algo.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = algo.policy.state_dict()
    if trainer.global_rank == 0:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, out / "policy.pt")


if __name__ == "__main__":
    main()
