"""Random states in checkpoints, per rank, so a resumed run samples exactly what the uninterrupted one would.

Lightning's checkpoints restore weights, optimizer and loops, but not the generators sampling draws
from; these functions save the torch (CPU and, when sampling on a GPU, CUDA) and Python states of
every rank and restore each rank's own.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

Gather = Callable[[torch.Tensor], list[torch.Tensor]]


def random_states(gather: Gather, device: torch.device) -> dict[str, Any]:
    """The checkpoint entries: every rank's states (`gather` collects one tensor from each rank)."""
    states: dict[str, Any] = {"retrain_rng": [g.cpu() for g in gather(torch.get_rng_state())]}
    if device.type == "cuda":  # sampling on a GPU draws from the device's generator
        states["retrain_cuda_rng"] = [g.cpu() for g in gather(torch.cuda.get_rng_state(device))]
    states["retrain_python_rng"] = random.getstate()
    return states


def restore_random_states(checkpoint: dict[str, Any], rank: int) -> None:
    """Restore rank `rank`'s states from `checkpoint`; a rank the checkpoint has no state for (more
    ranks than when saved) gets a fresh, rank-specific stream."""
    states = checkpoint.get("retrain_rng")
    if states:
        if rank < len(states):
            torch.set_rng_state(states[rank].clone().to(torch.uint8))  # a fresh tensor: views of a gathered one crash
        else:
            torch.manual_seed(int(states[0].sum()) + rank)  # (seeds every GPU too)
    cuda_states = checkpoint.get("retrain_cuda_rng")
    if cuda_states and rank < len(cuda_states) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_states[rank].to(torch.uint8))  # the rank's device is current by now
    if "retrain_python_rng" in checkpoint:
        random.setstate(checkpoint["retrain_python_rng"])
