"""`ReasoningGymSource`: procedurally generated reasoning tasks from the `reasoning-gym` package.

`reasoning-gym` (``pip install "retrain[reasoning]"``) generates its tasks locally from a seed, with
no downloads. Each record keeps the full reasoning-gym entry in its metadata, which is what the
`reasoning_gym_score` reward (`retrain.reward.reasoning_gym`) needs to call the task's own
`score_answer`. The package is imported only when this source is used.
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

from retrain.core.records import PromptRecord
from retrain.data.sources.base import DataSourceError, PromptSource

#: Metadata keys every record carries; reward functions receive them as keyword arguments.
ENTRY_KEY = "reasoning_gym_entry"
TASK_KEY = "reasoning_gym_task"
CONFIG_KEY = "reasoning_gym_config"


class ReasoningGymSource(PromptSource):
    """`size` tasks of one reasoning-gym dataset, generated from `seed`.

    The prompt is the entry's ``question``, the answer its ``answer``; metadata holds the entry
    (``reasoning_gym_entry``), the task name (``reasoning_gym_task``) and `task_kwargs`
    (``reasoning_gym_config``). Score completions with the ``reasoning_gym_score`` reward.

    Args:
        task: a reasoning-gym dataset name, e.g. ``basic_arithmetic``, ``leg_counting``, ``chain_sum``.
        size: how many tasks to generate.
        seed: the generation seed: the same seed gives the same tasks.
        task_kwargs: options of the task's config class (e.g. ``{min_terms: 2, max_terms: 4}``).
        exclude: a held-out split of the same task, ``{seed: ..., size: ...}``: tasks whose question
            it holds are skipped (more are generated in their place), so a validation split of
            another seed is really held out. Small task spaces repeat questions across seeds.
    """

    where = "data.source"

    def __init__(
        self, task: str, size: int = 1000, seed: int = 0, task_kwargs: Optional[dict[str, Any]] = None,
        exclude: Optional[dict[str, int]] = None,
    ) -> None:
        registry = _registry()
        if task not in registry:
            close = difflib.get_close_matches(task, list(registry), n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}." if close else ""
            raise DataSourceError(
                f"ReasoningGymSource task '{task}' is not a reasoning-gym dataset.{hint} "
                f"All {len(registry)}: python -c \"import reasoning_gym; print(sorted(reasoning_gym.factory.DATASETS))\"."
            )
        if size < 1:
            raise DataSourceError(f"ReasoningGymSource size={size}: must be at least 1.")
        self.task = task
        self.size = size
        self.seed = seed
        self.task_kwargs = dict(task_kwargs or {})
        if exclude is not None and (set(exclude) - {"seed", "size"} or "seed" not in exclude):
            raise DataSourceError(f"ReasoningGymSource exclude={exclude}: give the held-out split as {{seed: <int>, size: <int>}}.")
        self.exclude = dict(exclude) if exclude is not None else None
        self._dataset: Any = None
        self._indices: Optional[list[int]] = None  # with `exclude`: the dataset entries kept

    def load(self) -> None:
        if self._dataset is not None:
            return
        import reasoning_gym

        if self.exclude is None:
            self._dataset = self._create(reasoning_gym, self.size, self.seed)
            return
        held_out = self._create(reasoning_gym, self.exclude.get("size", 1000), self.exclude["seed"])
        questions = {held_out[i]["question"] for i in range(len(held_out))}
        pool = self.size
        for _ in range(6):  # generate more until `size` tasks survive the exclusion
            dataset = self._create(reasoning_gym, pool, self.seed)
            kept = [i for i in range(pool) if dataset[i]["question"] not in questions]
            if len(kept) >= self.size:
                self._dataset, self._indices = dataset, kept[: self.size]
                return
            pool *= 2
        raise DataSourceError(
            f"{self.where}: only {len(kept)} of {pool} '{self.task}' tasks (seed {self.seed}) are not in the held-out split "
            f"{self.exclude}; the task space is too small for size={self.size}: lower size, or widen task_kwargs."
        )

    def _create(self, reasoning_gym: Any, size: int, seed: int) -> Any:
        try:
            return reasoning_gym.create_dataset(self.task, size=size, seed=seed, **self.task_kwargs)
        except Exception as err:  # the task's config class rejects an option: name it and the task
            raise DataSourceError(
                f"{self.where}: reasoning-gym task '{self.task}' rejected task_kwargs {self.task_kwargs}: "
                f"{type(err).__name__}: {err}"
            ) from None

    @property
    def num_records(self) -> int:
        return self.size

    def record(self, index: int) -> PromptRecord:
        self.load()
        entry = self._dataset[index if self._indices is None else self._indices[index]]
        metadata = {ENTRY_KEY: entry, TASK_KEY: self.task, CONFIG_KEY: self.task_kwargs}
        return PromptRecord(prompt=entry["question"], answer=entry["answer"], metadata=metadata)


def _registry() -> dict[str, Any]:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise DataSourceError(
            "ReasoningGymSource needs the reasoning-gym package: pip install \"retrain[reasoning]\" "
            "(or pip install reasoning-gym)."
        ) from None
    return DATASETS
