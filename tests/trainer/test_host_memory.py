"""Host-memory reuse on CPU (`retrain.trainer.host_memory`): once a CPU fit has set up, tensors of a
few MB come from malloc's heap (where freed ones are reused) instead of fresh `mmap`s that the kernel
must fault in again every step. Checked in fresh processes, since the setting is process-wide and
glibc's own threshold adapts to what a process has freed before."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from retrain.trainer.host_memory import skip_reason

# A CPU fit of one step on the tiny model, then where a fresh 20 MB tensor's memory comes from:
# mallinfo2's hblkhd is the bytes malloc holds in mmapped blocks, arena the bytes in its heap.
_CHILD = textwrap.dedent("""
    import ctypes, json, sys
    import lightning.pytorch as pl, torch
    from retrain.data.datamodule import PromptDataModule
    from retrain.models.loading import PolicyConfig
    from retrain.reward.calculator import RewardCalculator, RewardSpec
    from retrain.trainer.grpo import GRPOTrainer

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    algo = GRPOTrainer(policy=PolicyConfig(name_or_path=sys.argv[1]),
                       reward=RewardCalculator([RewardSpec(name="regex_match", kwargs={"pattern": "a"})]),
                       num_generations=2, max_completion_length=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=sys.argv[2])
    trainer.fit(algo, datamodule=PromptDataModule(prompts=["a", "b"], batch_size=2))
    before = libc.mallinfo2()
    block = torch.ones(5_000_000)  # 20 MB: above glibc's default mmap threshold
    after = libc.mallinfo2()
    print(json.dumps({"mmapped": after.hblkhd - before.hblkhd, "heap": after.arena}))
""")


def _fit_then_allocate(tiny_model_dir, tmp_path, **env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tiny_model_dir), str(tmp_path)], capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc; other C libraries are left alone")


@glibc_only
def test_a_cpu_fit_makes_malloc_reuse_its_heap_for_large_tensors(tiny_model_dir, tmp_path):
    tuned = _fit_then_allocate(tiny_model_dir, tmp_path / "tuned")
    assert tuned["mmapped"] == 0, tuned  # served from the heap, reused when freed
    assert tuned["heap"] >= 20_000_000, tuned
    untuned = _fit_then_allocate(tiny_model_dir, tmp_path / "untuned", RETRAIN_MALLOC_TUNING="0")
    assert untuned["mmapped"] >= 20_000_000, untuned  # glibc's default: a fresh mmap, faulted in anew


@glibc_only
def test_user_malloc_settings_are_left_alone():
    assert skip_reason({}) is None
    assert skip_reason({"RETRAIN_MALLOC_TUNING": "0"}) == "RETRAIN_MALLOC_TUNING=0"
    assert skip_reason({"MALLOC_MMAP_THRESHOLD_": "65536"}) == "MALLOC_MMAP_THRESHOLD_ is set"
    assert skip_reason({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == "GLIBC_TUNABLES sets malloc options"
    assert skip_reason({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "another malloc is preloaded"
    assert skip_reason({"LD_PRELOAD": "/usr/lib/libprofiler.so"}) is None  # not a malloc
