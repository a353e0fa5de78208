"""FSDP2 for the policy (Lightning's `ModelParallelStrategy`), and sampling from a sharded policy.

Sharding. With `ModelParallelStrategy`, Lightning builds a device mesh before `configure_model`
and hands it to the module (`LightningModule.device_mesh`). `shard_model` then applies
`torch.distributed.fsdp.fully_shard` to every decoder layer (the classes a Hugging Face model
names in `_no_split_modules`, else `model.model.layers`) and then to the root, over the mesh's
data-parallel dimension. Tied embeddings stay together in the root's group. Each rank loads the
full weights on CPU first and keeps only its shard (`fully_shard` moves the shards to the mesh's
device); simple and correct, but every rank briefly holds a full CPU copy. Loading on the meta
device and materialising shards from rank 0 is not done yet. Tensor parallelism is not supported
(`tensor_parallel_size` must be 1): the data module shards prompts over all ranks.

Generation. `generate` runs many forward passes, and under FSDP2 each forward of a sharded
module is a collective (an all-gather), so every rank must run exactly the same number of forward
passes, in the same order. Ranks do not naturally agree: `generate` stops as soon as all of a
rank's sequences have ended, multi-turn episodes make a different number of `generate` calls on
each rank, and `DynamicSampling` re-rolls a different number of times. Two modes (chosen per
policy in `shard_model`, from `PolicyConfig.sharded_generation`):

- ``"gathered"`` (default): for a whole rollout phase (`generation_context`), every FSDP module
  of the policy is all-gathered once and kept unsharded (`reshard_after_forward=False`), then
  resharded at the end. Generation then makes no collectives at all, so ranks may stop early, make
  different numbers of calls and re-roll freely, and decoding pays no per-token all-gather. The
  price: the full parameters are resident on every rank while rolling out (as with DDP; gradients
  and optimizer state stay sharded).
- ``"sharded"``: parameters stay sharded; each decoding step all-gathers layer by layer (the
  memory of one layer at a time). Ranks stay in lockstep: `generate` runs with
  ``synced_gpus=True`` (a rank whose sequences have all ended keeps running forward passes until
  every rank's have), and each `generate` call starts with a round of `LockstepGeneration`
  (an all-reduce of "I have a batch"); at the end of the rollout phase, a rank that has no more
  batches keeps joining rounds with a one-token dummy `generate` until no rank has a batch.

FSDP1-wrapped policies (`FullyShardedDataParallel`, as Lightning's `FSDPStrategy` wraps them) can
be sampled from, always the "sharded" way: FSDP1 cannot gather inside its root's forward. Training
under `FSDPStrategy` is refused (`retrain.trainer.module.check_strategy`): the manual-optimization
backward inside that root forward breaks FSDP1 (seen on an H100, Lightning issue #19685).

`generation_context` must wrap a phase that every rank enters exactly once per step: the trainer
wraps the rollouts (and any re-rolls of `DynamicSampling`) of `gather_experience`, and those of
each validation/test batch (so validation needs the same number of batches on every rank).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

ShardedGeneration = Literal["gathered", "sharded"]
_MODE_ATTR = "_retrain_sharded_generation"
_ACTIVE_ATTR = "_retrain_generation_state"


def data_parallel_mesh(mesh: "DeviceMesh") -> "DeviceMesh":
    """The mesh's data-parallel dimension (Lightning names it "data_parallel"); TP must be off."""
    names = tuple(mesh.mesh_dim_names or ())
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()}: retrain shards the policy with FSDP2 only; "
            "use ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)."
        )
    if "data_parallel" in names:
        return mesh["data_parallel"]
    if mesh.ndim == 1:
        return mesh
    raise ValueError(f"Cannot tell the data-parallel dimension of a device mesh with dimensions {names}.")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: modules whose class a Hugging Face model lists in
    `_no_split_modules` (outermost only), else `model.model.layers`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    chosen: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in names and not any(name.startswith(f"{outer}.") for outer, _ in chosen):
            chosen.append((name, module))
    if chosen:
        return [module for _, module in chosen]
    inner = getattr(model, "model", None)
    return list(getattr(inner, "layers", None) or [])


def shard_model(
    model: torch.nn.Module,
    mesh: "DeviceMesh",
    *,
    generation: ShardedGeneration = "gathered",
    mp_policy: Optional[Any] = None,
) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root, over `mesh`'s data-parallel dimension (in place)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if generation not in ("gathered", "sharded"):
        raise ValueError(f"sharded_generation={generation!r}: choose 'gathered' or 'sharded'.")
    kwargs: dict[str, Any] = {"mesh": data_parallel_mesh(mesh)}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    # A PEFT model's `generate` runs the base model's forward, never its own (the FSDP2 root's), so
    # FSDP2 would initialise a layer as the root: run the root's hooks around `generate` itself.
    # Not for a plain transformers model: its `generate` calls its own forward, and the nested hooks
    # would reshard the root after every call.
    if hasattr(model, "peft_config") and hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    setattr(model, _MODE_ATTR, generation)
    return model


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2-sharded modules in `model` (root first); empty when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(fsdp_modules(model))


def has_fsdp1_modules(model: torch.nn.Module) -> bool:
    """Whether `model` holds modules wrapped by FSDP1 (`FullyShardedDataParallel`, Lightning's `FSDPStrategy`)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def generation_state(model: torch.nn.Module) -> Optional[object]:
    """What `generation_context` set up for `model` (None outside it)."""
    return getattr(model, _ACTIVE_ATTR, None)


def generate_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Extra `generate` arguments for `model` as it is now (inside or outside `generation_context`)."""
    state = generation_state(model)
    if isinstance(state, LockstepGeneration):
        return {"synced_gpus": True}
    if is_sharded(model):
        # Gathered: no collectives while decoding, so no stopping synchronisation (transformers would
        # otherwise turn `synced_gpus` on by itself for an FSDP-managed model).
        return {"synced_gpus": False}
    if _distributed() and has_fsdp1_modules(model):  # transformers only detects an FSDP1 root
        return {"synced_gpus": True}
    return {}


@contextlib.contextmanager
def generation_context(model: Optional[torch.nn.Module]) -> Iterator[None]:
    """Around a whole rollout phase that every rank enters exactly once: make `model` ready for any
    number of `generate` calls per rank (see the module docstring). A no-op for an unsharded
    model, outside torch.distributed, and when already inside (re-entrant)."""
    if model is None or generation_state(model) is not None or not _distributed():
        yield
        return
    modules = fsdp_modules(model)
    fsdp1 = not modules and has_fsdp1_modules(model)
    if not modules and not fsdp1:
        yield
        return
    # FSDP1 (Lightning's FSDPStrategy) cannot gather inside the root's forward, where training_step
    # runs: it always decodes in lockstep.
    if fsdp1 or getattr(model, _MODE_ATTR, "gathered") == "sharded":
        sync = LockstepGeneration(model)
        setattr(model, _ACTIVE_ATTR, sync)
        try:
            yield
        except BaseException:
            delattr(model, _ACTIVE_ATTR)
            raise
        try:
            sync.drain()
        finally:
            delattr(model, _ACTIVE_ATTR)
        return
    with gathered(model, modules):
        yield


@contextlib.contextmanager
def gathered(model: torch.nn.Module, modules: Optional[list[torch.nn.Module]] = None) -> Iterator[None]:
    """All-gather every FSDP module of `model` once and keep the full parameters until exit."""
    modules = fsdp_modules(model) if modules is None else modules
    root = modules[0] if modules else None
    setattr(model, _ACTIVE_ATTR, "gathered")
    try:
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
        for module in modules:
            module.unshard()
        yield
    finally:
        for module in modules:
            module.reshard()
            # FSDP2's defaults as `shard_model` applies them: the root stays unsharded after forward
            # (its parameters are needed again at once by backward), every layer reshards.
            module.set_reshard_after_forward(module is not root, recurse=False)
        delattr(model, _ACTIVE_ATTR)


class LockstepGeneration:
    """Keeps ranks' `generate` calls paired when parameters stay sharded while decoding.

    Each call starts with `round(True)`; a rank done with its rollouts calls `drain()`, which joins
    rounds with a dummy call until a round finds no rank with a batch.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls = 0
        self.dummy_calls = 0

    def round(self, has_batch: bool) -> bool:
        """All-reduce whether any rank has a batch this round."""
        flag = torch.tensor([1.0 if has_batch else 0.0], device=_device(self.model))
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        if has_batch:
            self.calls += 1
        return bool(flag.item() > 0)

    @torch.no_grad()
    def drain(self) -> None:
        while self.round(False):
            self.dummy_calls += 1
            was_training = self.model.training
            self.model.eval()
            try:
                token = getattr(getattr(self.model, "config", None), "bos_token_id", None) or 0
                ids = torch.tensor([[token]], device=_device(self.model))
                self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                    synced_gpus=True, pad_token_id=token,
                )
            finally:
                self.model.train(was_training)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters())
    return param.device
