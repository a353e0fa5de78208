"""The quickstart task: "repeat the letter".

Each prompt names a letter; the reward is the fraction of the completion's characters that are that
letter (0 for an empty completion). A freshly initialised character model scores about 1/100, and
the task is learnable by RL alone: the reward is dense (every right character counts) and the model
only has to learn to copy one token from a fixed place in the prompt.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from retrain.reward.registry import reward

LETTERS = string.ascii_lowercase


def make_prompts(letters: str = LETTERS, variants: int = 2) -> list[dict[str, Any]]:
    """Prompt records `{prompt, answer}` for each letter, in `variants` phrasings."""
    phrasings = ["repeat {0}: ", "say {0}: ", "echo {0}: "][:variants]
    return [{"prompt": p.format(letter), "answer": letter} for letter in letters for p in phrasings]


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@reward
def letter_fraction(completion: str, answer: Any = None, **_: Any) -> float:
    """The fraction of the completion's characters equal to the reference letter.

    >>> letter_fraction("aaab", answer="a")
    0.75
    """
    if not completion:
        return 0.0
    return sum(ch == answer for ch in completion) / len(completion)
