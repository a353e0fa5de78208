"""Built-in reward functions and verifiers, registered by name.

Each is a plain function of one rollout, so it can be tested (and reused) on its own:

>>> exact_match(completion=" 42 ", answer=42)
1.0
>>> numeric_match(completion="so the total is 3.50", answer="3.5")
1.0
>>> contains_penalty(completion="As an AI model, I", texts=["As an AI"])
-1.0
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

from retrain.reward.registry import reward, verifier

_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _require_answer(name: str, answer: Any) -> Any:
    if answer is None:
        raise ValueError(
            f"reward '{name}' needs the prompt record's reference answer, but this record has none. "
            "Add an 'answer' field to the data (or set data.answer_field)."
        )
    return answer


@reward
def exact_match(completion: str, answer: Any = None, ignore_case: bool = False, **_: Any) -> float:
    """1.0 when the completion, stripped of surrounding whitespace, equals the reference answer."""
    expected = str(_require_answer("exact_match", answer)).strip()
    got = completion.strip()
    if ignore_case:
        expected, got = expected.lower(), got.lower()
    return 1.0 if got == expected else 0.0


def last_number(text: str) -> Optional[float]:
    """The last number written in `text` (thousands separators allowed), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    try:
        return float(matches[-1].replace(",", ""))
    except ValueError:
        return None


@reward
def numeric_match(
    completion: str, answer: Any = None, rel_tol: float = 1e-6, abs_tol: float = 1e-9, **_: Any
) -> float:
    """1.0 when the last number in the completion equals the numeric reference answer (within tolerance)."""
    expected = last_number(str(_require_answer("numeric_match", answer)))
    if expected is None:
        raise ValueError(f"reward 'numeric_match': the reference answer {answer!r} holds no number.")
    got = last_number(completion)
    return 1.0 if got is not None and math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0


@reward
def regex_match(completion: str, pattern: str = "", fullmatch: bool = False, **_: Any) -> float:
    """1.0 when the completion matches `pattern` (a format check); `fullmatch` anchors both ends."""
    if not pattern:
        raise ValueError("reward 'regex_match' needs a 'pattern' in its kwargs.")
    matcher = re.fullmatch if fullmatch else re.search
    return 1.0 if matcher(pattern, completion, flags=re.DOTALL) else 0.0


@reward
def length_penalty(completion: str, max_length: int = 256, **_: Any) -> float:
    """0 up to `max_length` characters, then falls linearly to -1 at twice that length."""
    excess = max(0, len(completion) - max_length)
    return -min(1.0, excess / max_length)


@reward
def contains_penalty(completion: str, texts: Sequence[str] = (), ignore_case: bool = True, **_: Any) -> float:
    """-1.0 when the completion contains any of `texts`, else 0.0."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("reward 'contains_penalty' needs 'texts' (a list of strings) in its kwargs.")
    haystack = completion.lower() if ignore_case else completion
    needles = [t.lower() for t in texts] if ignore_case else list(texts)
    return -1.0 if any(needle in haystack for needle in needles) else 0.0


@reward
def step_reward_sum(trajectory: Any = None, **_: Any) -> float:
    """The sum of the environment's step rewards over the episode (e.g. a gymnasium return)."""
    if trajectory is None:
        raise ValueError("reward 'step_reward_sum' needs the trajectory.")
    return float(sum(trajectory.step_rewards))


@verifier
def matches_regex(completion: str, pattern: str = "", **_: Any) -> bool:
    """Passes when the completion contains a match of `pattern`."""
    if not pattern:
        raise ValueError("verifier 'matches_regex' needs a 'pattern'.")
    return re.search(pattern, completion, flags=re.DOTALL) is not None


@verifier
def not_truncated(trajectory: Any = None, **_: Any) -> bool:
    """Passes when the policy finished on its own rather than hitting the token budget."""
    return not (trajectory is not None and trajectory.truncated)


@verifier
def non_empty(completion: str, **_: Any) -> bool:
    """Passes when the completion has any non-whitespace text."""
    return bool(completion.strip())


@reward
def agent_reward(trajectory: Any = None, **_: Any) -> float:
    """The reward an agent reported for its episode (`AgentEnvironment`: its return value)."""
    value = getattr(trajectory, "info", {}).get("reward")
    if value is None:
        raise ValueError(
            "reward 'agent_reward': the agent reported no reward for this episode. Return a float, "
            "AgentResult(reward=...) or a dict with a 'reward' key from the agent, or score the episode with other reward functions."
        )
    return float(value)
