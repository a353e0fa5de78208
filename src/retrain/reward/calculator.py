"""`RewardCalculator`: weighted reward functions, each gated by verifiers, scored per rollout.

For every rollout and every configured reward function:

    value_i = verifier_penalty_i            if any verifier of function i fails
              f_i(rollout)                  otherwise
    reward  = sum_i weight_i * value_i

Each `value_i` and each verifier's pass/fail is kept for logging. Async functions run concurrently
across the rollouts of a batch (one rollout's functions run in order, so a verifier gates cheaply). A function that raises, or returns NaN/inf, stops training with an error that names
the function and the prompt: a wrong reward silently turned into a number trains the wrong thing.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from retrain.environment.base import Trajectory
from retrain.reward.registry import REWARDS, VERIFIERS, call_with_accepted


_RESERVED = {"completion", "prompt", "answer", "trajectory"}


def _verifier_label(spec: "VerifierSpec") -> str:
    """The verifier's name in logs: its name, plus its options when it has any."""
    if not spec.kwargs:
        return spec.name
    return f"{spec.name}[{','.join(f'{k}={v}' for k, v in sorted(spec.kwargs.items()))}]"


class RewardError(RuntimeError):
    """A reward function or verifier failed on a rollout."""


@dataclass
class VerifierSpec:
    """A verifier by name (registry name or import path) and the options it is called with."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardSpec:
    """One weighted reward function in the calculator.

    Attributes:
        name: a registered reward name, or an import/file path (`pkg.mod:fn`, `file.py:fn`).
        weight: the function's weight in the total reward.
        verifiers: checks that must all pass for this function to score the rollout; given as names
            or as `{name, kwargs}`.
        verifier_penalty: the value this function gives a rollout that fails any of its verifiers.
        kwargs: extra keyword arguments passed to the function (e.g. a regex pattern).
        label: the name used in logs (default: `name`).
    """

    name: str
    weight: float = 1.0
    verifiers: list[Union[str, VerifierSpec]] = field(default_factory=list)
    verifier_penalty: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: Optional[str] = None


@dataclass
class RewardResult:
    """Rewards for a batch of rollouts.

    Attributes:
        total: the combined reward of each rollout, `[N]`.
        components: each function's (gated, unweighted) value per rollout, by label, `{label: [N]}`.
        verifier_passed: each verifier's pass/fail per rollout, by name, `{name: [N]}`.
    """

    total: list[float]
    components: dict[str, list[float]]
    verifier_passed: dict[str, list[bool]]

    def select(self, indices: Sequence[int]) -> "RewardResult":
        """The results of the rollouts at `indices`, in that order."""
        return RewardResult(
            total=[self.total[i] for i in indices],
            components={k: [v[i] for i in indices] for k, v in self.components.items()},
            verifier_passed={k: [v[i] for i in indices] for k, v in self.verifier_passed.items()},
        )

    @staticmethod
    def concat(results: Sequence["RewardResult"]) -> "RewardResult":
        """One result holding the rollouts of `results` in order."""
        first = results[0]
        return RewardResult(
            total=[x for r in results for x in r.total],
            components={k: [x for r in results for x in r.components[k]] for k in first.components},
            verifier_passed={k: [x for r in results for x in r.verifier_passed[k]] for k in first.verifier_passed},
        )


@dataclass
class _Resolved:
    label: str
    function: Callable[..., Any]
    weight: float
    kwargs: dict[str, Any]
    verifiers: list[tuple[str, Callable[..., Any], dict[str, Any]]]
    penalty: float


class RewardCalculator:
    """Combines weighted, verifier-gated reward functions into one reward per rollout.

    Args:
        rewards: the reward functions, their weights, verifiers and options. Every name is resolved
            here, so a typo fails when the config is instantiated, before any model is loaded.
    """

    def __init__(self, rewards: list[RewardSpec]) -> None:
        if not rewards:
            raise ValueError("reward.rewards is empty: configure at least one reward function.")
        self.specs = [RewardSpec(**spec) if isinstance(spec, dict) else spec for spec in rewards]
        self._functions = [self._resolve(i, spec) for i, spec in enumerate(self.specs)]
        labels = [f.label for f in self._functions]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(
                f"reward.rewards: the label(s) {duplicates} appear more than once; set a distinct 'label' on each."
            )

    @staticmethod
    def _resolve(index: int, spec: RewardSpec) -> _Resolved:
        where = f"reward.rewards[{index}]"
        try:
            function = REWARDS.get(spec.name)
            verifiers = []
            for v in spec.verifiers:
                v = VerifierSpec(name=v) if isinstance(v, str) else VerifierSpec(**v) if isinstance(v, dict) else v
                verifiers.append((_verifier_label(v), VERIFIERS.get(v.name), dict(v.kwargs)))
        except KeyError as err:
            raise ValueError(f"{where}: {err.args[0]}") from None
        for option in ("weight", "verifier_penalty"):
            if not math.isfinite(getattr(spec, option)):
                raise ValueError(f"{where}.{option} must be a finite number, got {getattr(spec, option)}.")
        reserved = sorted(set(spec.kwargs) & _RESERVED)
        if reserved:
            raise ValueError(f"{where}.kwargs: {reserved} are supplied by retrain for every rollout; rename these options.")
        label = spec.label or (spec.name if spec.name in REWARDS else function.__name__)
        return _Resolved(label, function, spec.weight, dict(spec.kwargs), verifiers, spec.verifier_penalty)

    @property
    def labels(self) -> list[str]:
        return [f.label for f in self._functions]

    @property
    def verifier_names(self) -> list[str]:
        return sorted({name for f in self._functions for name, _, _ in f.verifiers})

    def score(self, trajectories: Sequence[Trajectory]) -> RewardResult:
        """Score rollouts from synchronous code (runs the async scorer on a private event loop)."""
        return asyncio.run(self.ascore(trajectories))

    async def ascore(self, trajectories: Sequence[Trajectory]) -> RewardResult:
        """Score rollouts; async reward functions and verifiers run concurrently."""
        per_rollout = await asyncio.gather(*(self._score_one(t) for t in trajectories))
        components = {f.label: [values[f.label] for values, _ in per_rollout] for f in self._functions}
        verifier_passed = {name: [passed[name] for _, passed in per_rollout] for name in self.verifier_names}
        total = [sum(f.weight * values[f.label] for f in self._functions) for values, _ in per_rollout]
        return RewardResult(total=total, components=components, verifier_passed=verifier_passed)

    async def _score_one(self, trajectory: Trajectory) -> tuple[dict[str, float], dict[str, bool]]:
        kwargs = {**trajectory.record.reward_kwargs(), "completion": trajectory.completion_text, "trajectory": trajectory}
        values: dict[str, float] = {}
        passed: dict[str, bool] = {}
        for f in self._functions:
            gate = True
            for name, check, options in f.verifiers:
                if name not in passed:
                    passed[name] = bool(await _call(name, "verifier", check, {**kwargs, **options}, trajectory))
                gate = gate and passed[name]
            if not gate:
                values[f.label] = f.penalty
                continue
            value = await _call(f.label, "reward", f.function, {**kwargs, **f.kwargs}, trajectory)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
                raise RewardError(f"reward '{f.label}' returned {value!r}; it must return a number.")
            value = float(value)
            if not math.isfinite(value):
                raise RewardError(
                    f"reward '{f.label}' returned {value} for prompt {_short(trajectory.record.prompt)}; "
                    "rewards must be finite."
                )
            values[f.label] = value
        return values, passed


async def _call(name: str, kind: str, function: Callable[..., Any], kwargs: dict[str, Any], trajectory: Trajectory) -> Any:
    try:
        result = call_with_accepted(function, kwargs)
        if inspect.isawaitable(result):
            result = await result
    except Exception as err:
        raise RewardError(
            f"{kind} '{name}' raised {type(err).__name__}: {err} (prompt {_short(trajectory.record.prompt)}, "
            f"completion {_short(trajectory.completion_text)})"
        ) from err
    return result


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
