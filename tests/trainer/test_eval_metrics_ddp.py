"""pass@k and maj@k reduce correctly across 2 real processes (torch.distributed, gloo on CPU)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrain.trainer.metrics import MajAtK, PassAtK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        passed, majority = PassAtK(), MajAtK()
        if rank == 0:  # 2 prompts: one passes (any), its majority "a" is wrong; one fails
            correct = torch.tensor([[False, True, False], [False, False, False]])
            answers = [["a", "b", "a"], ["c", "d", "e"]]
        else:  # 1 prompt: majority "x" correct
            correct = torch.tensor([[True, True, False]])
            answers = [["x", "x", "y"]]
        passed.update(correct)
        majority.update(answers, correct)
        results[rank] = (passed.compute().item(), majority.compute().item())
    finally:
        dist.destroy_process_group()


def test_metrics_sum_over_ranks():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    # global: 3 prompts; pass@3 = 2/3 (rank 0's first and rank 1's), maj@3 = 1/3 (rank 1's only)
    for rank in (0, 1):
        assert abs(results[rank][0] - 2 / 3) < 1e-6 and abs(results[rank][1] - 1 / 3) < 1e-6
