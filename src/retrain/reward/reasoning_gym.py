"""`reasoning_gym_score`: score a completion with the reasoning-gym task's own `score_answer`.

Records from `retrain.data.ReasoningGymSource` carry the reasoning-gym entry in their metadata
(``reasoning_gym_entry``, with ``reasoning_gym_task`` and ``reasoning_gym_config``); this reward
extracts the answer from the completion and asks the task's dataset to score it (1.0 correct, 0.0
wrong, partial credit where the task gives it). `reasoning_gym` is imported on the first call, so
the reward stays registered without the optional package installed.

How the answer is extracted (`extract_answer`), first match wins:

1. the text inside the last ``<answer>...</answer>`` tags;
2. the text after the last ``answer:`` (any case), up to the end of its first non-empty line;
3. the whole completion, stripped.

>>> extract_answer("Let me think. <answer> 42 </answer>")
'42'
>>> extract_answer("3 + 4 = 7.\\nFinal answer: 7\\nDone.")
'7'
>>> extract_answer("  7 ")
'7'
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Optional

from retrain.reward.registry import reward

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)


def extract_answer(completion: str) -> str:
    """The answer part of `completion` (see the module docstring for the rules)."""
    tagged = _TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    markers = list(_MARKER.finditer(completion))
    if markers:
        rest = completion[markers[-1].end():]
        return next((line.strip() for line in rest.splitlines() if line.strip()), "")
    return completion.strip()


@reward
def reasoning_gym_score(
    completion: str,
    reasoning_gym_entry: Optional[dict[str, Any]] = None,
    reasoning_gym_task: Optional[str] = None,
    reasoning_gym_config: Optional[dict[str, Any]] = None,
    extract: bool = True,
    partial_credit: bool = True,
    **_: Any,
) -> float:
    """The reasoning-gym task's score (0.0 to 1.0) of the completion's answer.

    Args:
        completion: the policy's text.
        reasoning_gym_entry: the task entry (metadata of a `ReasoningGymSource` record).
        reasoning_gym_task: the task name (default: the entry's ``source_dataset``).
        reasoning_gym_config: the task options the entry was generated with.
        extract: score `extract_answer(completion)`; False scores the whole stripped completion.
        partial_credit: keep the task's partial credit (e.g. spell_backward's share of letters in
            place); False gives 1.0 for a fully correct answer and 0.0 for anything else, the
            pass/fail that held-out pass@1 counts.
    """
    if reasoning_gym_entry is None:
        raise ValueError(
            "reward 'reasoning_gym_score' needs a reasoning-gym entry in the record's metadata "
            "('reasoning_gym_entry'); use data.source: retrain.data.ReasoningGymSource."
        )
    task = reasoning_gym_task or reasoning_gym_entry.get("metadata", {}).get("source_dataset")
    if task is None:
        raise ValueError("reward 'reasoning_gym_score': the entry names no task; set 'reasoning_gym_task' in the metadata.")
    answer = extract_answer(completion) if extract else completion.strip()
    config = json.dumps(reasoning_gym_config or {}, sort_keys=True, default=str)
    score = float(_scorer(task, config)(answer=answer, entry=reasoning_gym_entry))
    return score if partial_credit else float(score >= 1.0)


@functools.lru_cache(maxsize=64)
def _scorer(task: str, config: str) -> Any:
    """`score_answer` of `task`'s dataset, built once per (task, options)."""
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError(
            "reward 'reasoning_gym_score' needs the reasoning-gym package: pip install \"retrain[reasoning]\"."
        ) from None
    return reasoning_gym.create_dataset(task, size=1, seed=0, **json.loads(config)).score_answer
