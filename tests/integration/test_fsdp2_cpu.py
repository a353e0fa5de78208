"""FSDP2 (`fully_shard`, Lightning's `ModelParallelStrategy`) for real: 2 CPU processes, gloo.

* Generation from a sharded policy, in both `sharded_generation` modes and under FSDP1 (as
  Lightning's `FSDPStrategy` runs it), with ranks that do unequal work (a different number of
  `generate` calls, different budgets, sequences ending at different steps): nothing hangs, and
  every rank samples exactly what the unsharded model samples.
* A sharded LoRA policy rolls out and trains, its reference the sharded base with the adapter off.
* One update on a fixed experience, each rank holding half of it: the loss (averaged over ranks)
  and the gathered weights after a clipped AdamW step equal the single-process ones.
* Training under `lightning.Trainer(strategy=ModelParallelStrategy(...))`, generation included,
  against a single-process run with the same global batch (`fsdp2_train.py` explains why their
  rollouts are the same): identical rollouts, equal losses and weights; then a resume from the
  sharded checkpoint directory written at step 2 ends with the uninterrupted run's weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrain.core.records import PromptRecord
from retrain.models.loading import LoraSettings, PolicyConfig, load_policy, load_tokenizer
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.grpo import GRPOTrainer
from retrain.rollout.sampler import BatchingSampler
from retrain.rollout.sharding import LockstepGeneration, generation_context, generation_state, shard_model

HERE = Path(__file__).resolve().parent
TIMEOUT = 150  # seconds for one group of processes; each takes 7-30 s on 2 CPU cores
RECORDS = [PromptRecord(prompt=f"repeat {c}: ", answer=c) for c in "ab"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _algo(model_dir: str, **options) -> GRPOTrainer:
    return GRPOTrainer(
        policy=PolicyConfig(name_or_path=model_dir),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
        num_generations=4, max_completion_length=6, learning_rate=1e-3, beta=0.05, **options,
    )


def _unequal_generation(model, tokenizer, rank: int) -> tuple[list, int]:
    """Rank 0 makes two calls (budgets 3 and 8), rank 1 one (budget 8); a third of the vocabulary
    ends a sequence, so sequences (and whole calls) stop at different steps on each rank."""
    calls = [([[5, 6, 7], [8, 9]], 3, 11), ([[12, 13]], 8, 12)] if rank == 0 else [([[20, 21, 22, 23], [24]], 8, 13)]
    outputs, dummy = [], 0
    with generation_context(model):
        for contexts, budget, seed in calls:
            sampler = BatchingSampler(model, tokenizer, max_new_tokens=budget, draw="generate")  # sharded: generate
            sampler.generation_config.eos_token_id = list(range(4, 36))
            torch.manual_seed(seed)
            outputs.append(sampler._generate_batch(contexts, budget))
        state = generation_state(model)
    if isinstance(state, LockstepGeneration):
        dummy = state.dummy_calls
    return outputs, dummy


class _Redirect(torch.nn.Module):
    """Runs a function on the policy inside the FSDP1 root's forward, as Lightning's
    `FSDPStrategy` runs `training_step` (its forward redirection)."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, fn):
        return fn(self.policy)


def _worker(rank: int, port: int, model_dir: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    try:
        config = PolicyConfig(name_or_path=model_dir)
        tokenizer, unsharded = load_tokenizer(config), load_policy(config)
        expected, _ = _unequal_generation(unsharded, tokenizer, rank)
        for mode in ("gathered", "sharded"):
            model = shard_model(load_policy(config), mesh, generation=mode)
            outputs, dummy = _unequal_generation(model, tokenizer, rank)
            results[f"generation/{mode}/{rank}"] = (outputs == expected, dummy, outputs)
        # FSDP1 as Lightning's FSDPStrategy runs it: layers wrapped, generation inside the root's forward.
        root = FSDP(
            _Redirect(load_policy(config)), auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            device_id=torch.device("cpu"), use_orig_params=True,
        )
        outputs, dummy = root(lambda policy: _unequal_generation(policy, tokenizer, rank))
        results[f"generation/fsdp1/{rank}"] = (outputs == expected, dummy, outputs)

        # A fixed experience: the same 8 rollouts on both ranks (same seed, same weights, no collectives).
        # The single process takes the full logits, the sharded one the chunked LM head (the default).
        torch.manual_seed(0)
        single, sharded = _algo(model_dir, full_logits=True), _algo(model_dir)
        single.configure_model()
        sharded._device_mesh = mesh  # what ModelParallelStrategy sets before configure_model
        sharded.configure_model()
        experience = single.gather_experience(RECORDS)
        half = experience.split(2)[rank]  # each rank: one prompt's group
        real = half.attention_mask[:, -half.completion_width :].bool()
        ref_gap = (sharded.reference_logps(half) - half.ref_logps)[real].abs().max().item()

        def update(algo, batch, num_items):
            optimizer = algo.configure_optimizers()["optimizer"]
            loss, _ = algo.compute_loss(batch, num_items)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(list(algo.policy.parameters()), 0.05)
            optimizer.step()
            return loss.detach(), norm.full_tensor() if hasattr(norm, "full_tensor") else norm

        loss, norm = update(single, experience, experience.completion_mask.sum())
        tokens = half.completion_mask.sum().reshape(1)
        dist.all_reduce(tokens)
        half_loss, half_norm = update(sharded, half, tokens / 2)  # dapo: the ranks' mean token count
        dist.all_reduce(half_loss)
        full = {name: p.full_tensor() for name, p in sharded.policy.named_parameters()}
        moved = max((p - q).abs().max().item() for p, q in zip(single.policy.parameters(), unsharded.parameters()))
        gap = max((full[name] - p).abs().max().item() for name, p in single.policy.named_parameters())

        # Token-budget passes: this rank's budget makes 4 passes of one row on rank 0 and one pass on
        # rank 1; both must run 4 backwards (FSDP2 reduce-scatters in each), and the accumulated
        # gradient must be the whole batch's.
        passes = _algo(model_dir)
        passes._device_mesh = mesh
        passes.configure_model()
        passes.manual_backward = lambda loss: loss.backward()

        def gradients():
            return {name: p.grad.full_tensor().clone() for name, p in passes.policy.named_parameters() if p.grad is not None}

        passes.policy.zero_grad()
        passes.compute_loss(half, tokens / 2)[0].backward()
        whole = gradients()
        passes.policy.zero_grad()
        passes.hparams.micro_batch_tokens = 1 if rank == 0 else 10**6
        results[f"passes/{rank}"] = len(passes.micro_batches(half))
        passes._accumulate_gradients(half, tokens / 2)
        split = gradients()
        results[f"passes_gap/{rank}"] = max((split[name] - grad).abs().max().item() for name, grad in whole.items())

        # LoRA: PEFT's `generate` bypasses its own forward (FSDP2's root); the reference is the
        # sharded base with the adapter off.
        lora = GRPOTrainer(
            policy=PolicyConfig(name_or_path=model_dir, lora=LoraSettings(r=4, alpha=8)),
            reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
            num_generations=4, max_completion_length=6, learning_rate=1e-3, beta=0.05, num_iterations=2,
        )
        lora._device_mesh = mesh
        lora.configure_model()
        lora_experience = lora.gather_experience(RECORDS[rank : rank + 1])
        lora_experience.advantages = torch.linspace(-1.0, 1.0, len(lora_experience))  # whatever the rewards, a gradient
        results[f"lora/{rank}"] = [lora.step(lora_experience) for _ in range(2)]

        results[f"update/{rank}"] = {
            "loss": (loss.item(), half_loss.item() / 2), "norm": (norm.item(), half_norm.item()),
            "ref_gap": ref_gap, "weight_gap": gap, "moved": moved,
        }
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tiny_model_dir):
    results = mp.Manager().dict()
    context = mp.spawn(_worker, args=(_free_port(), str(tiny_model_dir), results), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"2 FSDP2 processes did not finish in {TIMEOUT} s (a collective hung)")
    return dict(results)


@pytest.mark.parametrize("mode", ["gathered", "sharded", "fsdp1"])
def test_ranks_with_unequal_generation_work_sample_like_the_unsharded_model(spawned, mode):
    for rank in (0, 1):
        same, dummy, outputs = spawned[f"generation/{mode}/{rank}"]
        assert same, f"rank {rank} ({mode}) sampled differently from the unsharded model: {outputs}"
    ends = set(range(4, 36))
    rows = [row for rank in (0, 1) for call in spawned[f"generation/{mode}/{rank}"][2] for row in call]
    assert any(ends & set(row[:-1]) for row in rows)  # some sequences ended before others
    if mode != "gathered":  # rank 1 had one call fewer: it kept rank 0 company with a dummy call
        assert spawned[f"generation/{mode}/1"][1] == 1 and spawned[f"generation/{mode}/0"][1] == 0


def test_an_update_on_half_the_experience_per_rank_equals_the_single_process_update(spawned):
    for rank in (0, 1):
        r = spawned[f"update/{rank}"]
        assert r["moved"] > 1e-4  # the step did change the weights
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5, r
        assert abs(r["norm"][0] - r["norm"][1]) < 1e-5 * max(1.0, r["norm"][0]) and r["norm"][0] > 0.05, r  # clipping applied
        assert r["ref_gap"] < 1e-5 and r["weight_gap"] < 1e-5, r


def test_ranks_needing_different_numbers_of_token_budget_passes_run_the_same_number_and_the_whole_gradient(spawned):
    assert spawned["passes/0"] == spawned["passes/1"] == 4  # rank 1's one pass, stretched to rank 0's four
    for rank in (0, 1):
        assert spawned[f"passes_gap/{rank}"] < 1e-5


def test_a_sharded_lora_policy_rolls_out_and_trains_against_its_base_as_reference(spawned):
    for rank in (0, 1):
        first, second = spawned[f"lora/{rank}"]
        assert all(v == v and abs(v) < 1e3 for v in [*first.values(), *second.values()]), (first, second)
        assert first["kl"] == 0.0 and second["kl"] > 0  # the adapter starts as a no-op, then moves


# ---------------------------------------------------------------------- under lightning.Trainer
def _launch(out: Path, model_dir: Path, *args: str) -> None:
    """`fsdp2_train.py` on 2 processes (Lightning starts the second); killed as a group on timeout."""
    command = [sys.executable, str(HERE / "fsdp2_train.py"), "--model", str(model_dir), "--out", str(out), "--devices", "2", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=out.parent, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout"
    assert code == 0, f"{' '.join(command)} -> {code}\n{log.read_text()[-4000:]}"


def _single_process_run(out: Path, model_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("fsdp2_train", HERE / "fsdp2_train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        script.main(["--model", str(model_dir), "--out", str(out), "--devices", "1", "--steps", "4"])
    finally:
        torch.set_num_threads(threads)


def _steps(out: Path, rank: int) -> list[dict]:
    return json.loads((out / f"rank{rank}.json").read_text())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "policy.pt", weights_only=True)


def test_model_parallel_strategy_trains_like_one_process_and_resumes_from_its_sharded_checkpoint(tiny_model_dir, tmp_path):
    single, fsdp, resumed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "resumed"
    _single_process_run(single, tiny_model_dir)
    _launch(fsdp, tiny_model_dir, "--steps", "4", "--checkpoint_every", "2", "--sharded_generation", "sharded")

    ranks = [_steps(fsdp, 0), _steps(fsdp, 1)]
    for i, step in enumerate(_steps(single, 0)):
        # The two ranks together rolled out exactly the single process's rollouts ...
        assert {**ranks[0][i]["completions"], **ranks[1][i]["completions"]} == step["completions"], f"step {step['step']}"
        assert not set(ranks[0][i]["completions"]) & set(ranks[1][i]["completions"])
        # ... and the mean of the ranks' losses is the single process's loss (dapo: tokens of the global batch).
        assert abs((ranks[0][i]["loss"] + ranks[1][i]["loss"]) / 2 - step["loss"]) < 1e-6, (step, ranks[0][i], ranks[1][i])
    expected, got = _weights(single), _weights(fsdp)
    assert sorted(expected) == sorted(got)
    initial = load_policy(PolicyConfig(name_or_path=str(tiny_model_dir))).state_dict()
    assert max((expected[k] - initial[k]).abs().max().item() for k in expected) > 1e-3  # training moved the weights
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-5

    checkpoint = fsdp / "checkpoints" / "epoch=0-step=2.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard file per rank
    _launch(resumed, tiny_model_dir, "--steps", "4", "--ckpt_path", str(checkpoint))
    for rank in (0, 1):
        assert _steps(resumed, rank) == _steps(fsdp, rank)[2:]
    final = _weights(resumed)
    assert max((final[k] - got[k]).abs().max().item() for k in got) < 1e-6
