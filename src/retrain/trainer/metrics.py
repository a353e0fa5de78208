"""Evaluation metrics over k samples per prompt, as torchmetrics (their sums reduce across DDP ranks).

- `pass@k`: the share of prompts for which at least one of the k samples is correct.
- `maj@k`: the share of prompts whose majority answer (the most frequent normalised answer among
  the k samples; ties broken by first appearance) is correct.

"Correct" is decided by the caller (by default: total reward >= a threshold). With exactly k samples
per prompt, pass@k is the plain estimator; see Chen et al. 2021 for the unbiased one from n > k.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
from torchmetrics import Metric


class PassAtK(Metric):
    """Share of prompts with at least one correct sample among their k."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("passed", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor) -> None:
        """`correct`: `[B, k]` bool, one row per prompt."""
        self.passed += correct.any(dim=1).sum().float()
        self.prompts += correct.size(0)

    def compute(self) -> torch.Tensor:
        return self.passed / self.prompts.clamp(min=1.0)


class MajAtK(Metric):
    """Share of prompts whose most frequent answer among k samples is correct."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("passed", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, answers: Sequence[Sequence[str]], correct: torch.Tensor) -> None:
        """`answers`: per prompt, its k normalised answers; `correct`: `[B, k]` bool."""
        for row, group in enumerate(answers):
            majority = Counter(group).most_common(1)[0][0]
            self.passed += float(bool(correct[row, list(group).index(majority)]))
        self.prompts += len(answers)

    def compute(self) -> torch.Tensor:
        return self.passed / self.prompts.clamp(min=1.0)
