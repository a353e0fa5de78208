"""Exporting the trained policy as a Hugging Face directory: it reloads with `from_pretrained` and
greedy decoding gives exactly the tokens of the trained policy. LoRA merged and as an adapter; from
`.ckpt` files and from sharded `torch.distributed.checkpoint` directories written by 2 real ranks."""

from __future__ import annotations

import copy
import json
import os
import socket

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.callbacks import ExportPolicy
from retrain.data.datamodule import PromptDataModule
from retrain.export import MARKER, export_checkpoint, export_policy
from retrain.models.loading import LoraSettings, PolicyConfig, load_policy
from retrain.reward.calculator import RewardCalculator, RewardSpec
from retrain.trainer.grpo import GRPOTrainer

PROMPTS = ["repeat a: ", "repeat bb: "]


def greedy(model: torch.nn.Module, tokenizer, new_tokens: int = 12) -> list[list[int]]:
    """Greedy continuations of a fixed, left-padded batch."""
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return out.tolist()


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def _module(model_dir, lora: bool, beta: float = 0.0) -> GRPOTrainer:
    return GRPOTrainer(
        policy=PolicyConfig(name_or_path=str(model_dir), lora=LoraSettings(r=4, alpha=8) if lora else None),
        reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "[a-f]"})]),
        num_generations=4, max_completion_length=4, learning_rate=5e-2, beta=beta,
    )


def _perturb(policy: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable weight far enough that greedy decoding changes (a few RL steps on a tiny
    random model barely do)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in policy.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


# ------------------------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """2 real training steps of a LoRA policy, exported merged and as an adapter by the callback."""
    out = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    module = _module(tiny_model_dir, lora=True)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
        callbacks=[
            ExportPolicy(str(out / "merged")),
            ExportPolicy(str(out / "adapter"), merge_lora=False),
            pl.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_last=True),
        ],
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts=["repeat a: ", "repeat b: ", "repeat c: "], batch_size=2))
    return module, out


def test_lora_callback_exports_merged_weights_and_an_adapter(lora_run, tiny_model_dir):
    module, out = lora_run
    policy, tokenizer = module.policy, module.tokenizer
    assert any(torch.count_nonzero(p) for n, p in policy.named_parameters() if "lora_B" in n)  # it trained
    expected_merged = copy.deepcopy(policy).merge_and_unload()

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM" and not hasattr(merged, "peft_config")
    assert_same_weights(merged.state_dict(), expected_merged.state_dict())
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert reloaded_tokenizer.padding_side == "left" and reloaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert greedy(merged, reloaded_tokenizer) == greedy(expected_merged, tokenizer)
    assert json.loads((out / "merged" / MARKER).read_text())["format"] == "merged"

    # The adapter alone, loaded through transformers' PEFT integration and through PEFT itself.
    assert not (out / "adapter" / "model.safetensors").exists()
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    from peft import AutoPeftModelForCausalLM

    via_transformers = AutoModelForCausalLM.from_pretrained(out / "adapter")
    via_peft = AutoPeftModelForCausalLM.from_pretrained(out / "adapter")
    expected = greedy(policy, tokenizer)
    assert greedy(via_transformers, AutoTokenizer.from_pretrained(out / "adapter")) == expected
    assert greedy(via_peft, tokenizer) == expected
    trained = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
    assert_same_weights({k: v for k, v in via_peft.state_dict().items() if "lora_" in k}, trained)

    # Exporting never changed the trained module: still an unmerged adapter.
    assert hasattr(module.policy, "peft_config") and any("lora_A" in n for n, _ in module.policy.named_parameters())


def test_lora_checkpoint_exports_without_a_config(lora_run, tmp_path):
    """The policy settings stored in the checkpoint are enough; merged and adapter match the callback's."""
    module, out = lora_run
    merged = export_checkpoint(out / "ckpt" / "last.ckpt", None, tmp_path / "merged")
    adapter = export_checkpoint(out / "ckpt" / "last.ckpt", None, tmp_path / "adapter", merge_lora=False)
    assert_same_weights(
        AutoModelForCausalLM.from_pretrained(merged).state_dict(), AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    )
    from peft import AutoPeftModelForCausalLM

    from_ckpt = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert greedy(from_ckpt, module.tokenizer) == greedy(module.policy, module.tokenizer)
    info = json.loads((adapter / MARKER).read_text())
    assert info["format"] == "adapter" and info["global_step"] == 2


def test_perturbed_lora_export_differs_from_the_base_and_matches_the_module(tiny_model_dir, tmp_path):
    """With an adapter large enough to change greedy decoding, the exports still decode exactly like the module."""
    module = _module(tiny_model_dir, lora=True)
    module.configure_model()
    _perturb(module.policy)
    base_tokens = greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), module.tokenizer)
    expected = greedy(module.policy, module.tokenizer)
    assert expected != base_tokens

    export_policy(module, tmp_path / "adapter", merge_lora=False)
    assert greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "adapter"), module.tokenizer) == expected
    export_policy(module, tmp_path / "merged")
    merged_module = copy.deepcopy(module.policy).merge_and_unload()
    assert greedy(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), module.tokenizer) == greedy(merged_module, module.tokenizer)


# ------------------------------------------------------------------------------------ output directory


def test_export_replaces_an_earlier_export_but_nothing_else(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, lora=False)
    module.configure_model()
    target = tmp_path / "export"
    export_policy(module, target, merge_lora=False)
    (target / "stale.txt").write_text("from an earlier export")
    export_policy(module, target)  # replaced whole
    assert not (target / "stale.txt").exists() and (target / "config.json").is_file()
    with pytest.raises(FileExistsError, match="not an earlier retrain export"):
        export_policy(module, tiny_model_dir)  # e.g. the base model's own directory
    assert (tiny_model_dir / "config.json").is_file()
    assert not list(tmp_path.glob(".export.export-*"))  # no staging directory left behind


def test_mismatched_settings_are_reported(lora_run, tiny_model_dir, tmp_path):
    _, out = lora_run
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"model": {
        "class_path": "retrain.GRPOTrainer",
        "init_args": {"policy": {"name_or_path": str(tiny_model_dir)}, "reward": {"rewards": [{"name": "regex_match", "kwargs": {"pattern": "a"}}]}},
    }}))
    with pytest.raises(ValueError, match="lora"):  # a LoRA checkpoint, a config without LoRA
        export_checkpoint(out / "ckpt" / "last.ckpt", config, tmp_path / "out")


# ------------------------------------------------------------------------------------ sharded checkpoints


def test_single_process_fsdp_layout_directory_checkpoint(tiny_model_dir, tmp_path):
    """The layout FSDPStrategy(state_dict_type="sharded") writes: DCP shards under `model`, optimizer
    states beside them, the rest in meta.pt. Only the policy is read; the reference copy is ignored."""
    import torch.distributed.checkpoint as dcp

    module = _module(tiny_model_dir, lora=False, beta=0.1)
    module.configure_model()
    _perturb(module.policy)
    optimizer = torch.optim.AdamW(module.policy.parameters())
    module.policy(torch.tensor([[5, 6, 7]])).logits.sum().backward()
    optimizer.step()
    path = tmp_path / "last.ckpt"
    dcp.save({"model": module.state_dict(), "optimizer_0": optimizer.state_dict()}, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": 7, "hyper_parameters": dict(module.hparams)}, path / "meta.pt")

    export_checkpoint(path, module, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert_same_weights(exported.state_dict(), module.policy.state_dict())
    assert greedy(exported, module.tokenizer) == greedy(module.policy, module.tokenizer)
    assert json.loads((tmp_path / "export" / MARKER).read_text())["global_step"] == 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Strategy:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def barrier(self, name: str = "") -> None:
        dist.barrier()


class _Trainer:
    def __init__(self, model: torch.nn.Module) -> None:
        self.strategy = _Strategy(model)
        self.is_global_zero = dist.get_rank() == 0
        self.global_step = 3


def _sharded_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    """Rank `rank` of 2: FSDP2-shard a LoRA policy (as ModelParallelStrategy does), then (a) save the
    sharded checkpoint as ModelParallelStrategy(save_distributed_checkpoint=True) does and (b) run the
    ExportPolicy callback, which gathers the full weights and writes from rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # the same LoRA initialisation on both ranks
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from retrain.models.loading import load_tokenizer

        module = _module(model_dir, lora=True)
        module.configure_model()
        _perturb(module.policy)  # same seed on both ranks: the same full weights
        if rank == 0:
            torch.save({k: v.clone() for k, v in module.policy.state_dict().items()}, os.path.join(out, "full.pt"))
        mesh = init_device_mesh("cpu", (2,))
        for layer in module.policy.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module.policy, mesh=mesh)
        state = get_model_state_dict(module)
        assert any(hasattr(v, "to_local") for v in state.values())  # really sharded
        path = os.path.join(out, "last.ckpt")
        dcp.save({"state_dict": state}, checkpoint_id=path)
        if rank == 0:
            torch.save({"global_step": 3, "hyper_parameters": dict(module.hparams)}, os.path.join(path, "meta.pt"))
        module.tokenizer = load_tokenizer(module.policy_config)
        ExportPolicy(os.path.join(out, "callback_export")).on_fit_end(_Trainer(module), module)
    finally:
        dist.destroy_process_group()


def test_two_rank_sharded_checkpoint_and_callback_export(tiny_model_dir, tmp_path):
    # fork: the ranks start with everything already imported (spawning re-imports torch, transformers, ...)
    mp.start_processes(_sharded_worker, args=(_free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    assert len(list((tmp_path / "last.ckpt").glob("*.distcp"))) == 2

    reference = load_policy(PolicyConfig(name_or_path=str(tiny_model_dir), lora=LoraSettings(r=4, alpha=8)))
    reference.load_state_dict(torch.load(tmp_path / "full.pt"))
    expected = reference.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"

    from_shards = export_checkpoint(tmp_path / "last.ckpt", None, tmp_path / "from_shards")
    for directory in (from_shards, tmp_path / "callback_export"):
        exported = AutoModelForCausalLM.from_pretrained(directory)
        assert_same_weights(exported.state_dict(), expected.state_dict())
        assert greedy(exported, tokenizer) == greedy(expected, tokenizer)
