"""`RewardCalculator`: weighted reward functions, each gated by verifiers, per rollout and per turn.

For every rollout (and, for `step_rewards`, every turn of it) and every configured function:

    value_i = verifier_penalty_i            if any verifier of function i fails
              error_penalty_i               if f_i raised or timed out and on_error = "penalty"
              f_i(rollout or turn)          otherwise
    reward  = sum_i weight_i * value_i

A turn's step reward is the environment's own reward for it plus the weighted step functions.
Every value, each verifier's pass/fail and each function's error count are kept for logging.

Execution: async functions are awaited. Where a sync function runs is its `execution`:
`inline` (on the event loop itself), `thread` (in worker threads) or `auto` (the default): inline
while its calls stay cheap, since handing a microsecond check such as `exact_match` to a worker
thread costs far more than the call (on the quickstart, a thread per rollout was 8 ms of each 77 ms
step), and in worker threads from the moment the median of its last few calls (`InlinePolicy`)
exceeds `INLINE_SECONDS`, so a slow check (math verification, a blocking HTTP judge) stalls the loop
for two calls and then runs concurrently with the rest. A median and not one call decides, so a
single slow call of a cheap function (a GC pause, a busy machine) does not move it to threads for
the rest of the run. A function with a `timeout` always runs in threads, where the timeout can fire
(`inline` with a `timeout` is a config error). All rollouts of a batch are scored concurrently; within one rollout the functions run in order (a verifier gates
cheaply). Faults follow each function's `on_error`: `raise` (the default) stops training with an
error naming the function and the prompt, because a broken reward silently turned into a number
trains the wrong thing; `penalty` scores the rollout `error_penalty` and counts it. A function
that returns NaN/inf or a non-number is a fault too. A `timeout` bounds each call; a timed-out sync
function's thread cannot be killed and finishes in the background, its result discarded.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, Union

from retrain.core.episode import Trajectory
from retrain.core.errors import ConfigError, TrainingFault
from retrain.reward.registry import REWARDS, VERIFIERS, call_with_accepted


_RESERVED = {"completion", "prompt", "answer", "trajectory", "turn", "action", "observation"}


def _verifier_label(spec: "VerifierSpec") -> str:
    """The verifier's name in logs: its name, plus its options when it has any."""
    if not spec.kwargs:
        return spec.name
    return f"{spec.name}[{','.join(f'{k}={v}' for k, v in sorted(spec.kwargs.items()))}]"


class RewardError(TrainingFault):
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
        on_error: what a raise, a timeout or a NaN does: `raise` stops training, `penalty` scores
            `error_penalty` and counts it in `train/reward_errors/<label>`.
        error_penalty: the value given when `on_error` is `penalty`.
        timeout: seconds one call may take (None = no limit).
        execution: where a sync function runs: `auto` (inline while its calls are cheap, worker
            threads once they are not: see the module docstring), `inline` (always on the event
            loop: for a function known to be cheap) or `thread` (always in worker threads: for one
            known to block). Async functions are awaited whatever this says.
    """

    name: str
    weight: float = 1.0
    verifiers: list[Union[str, VerifierSpec]] = field(default_factory=list)
    verifier_penalty: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: Optional[str] = None
    on_error: Literal["raise", "penalty"] = "raise"
    error_penalty: float = 0.0
    timeout: Optional[float] = None
    execution: Literal["auto", "inline", "thread"] = "auto"


@dataclass
class RewardResult:
    """Rewards for a batch of rollouts.

    Attributes:
        total: the combined rollout-level reward of each rollout, `[N]`.
        components: each rollout function's (gated, unweighted) value, by label, `{label: [N]}`.
        verifier_passed: each verifier's pass/fail per rollout, by name, `{name: [N]}`.
        errors: per function label, how many calls failed and were scored `error_penalty`.
        step_total: each rollout's per-turn step rewards (environment reward plus weighted step
            functions), `[N][turns]`.
        step_components: each step function's value per turn, by label, `{label: [N][turns]}`.
    """

    total: list[float]
    components: dict[str, list[float]]
    verifier_passed: dict[str, list[bool]]
    errors: dict[str, int] = field(default_factory=dict)
    step_total: list[list[float]] = field(default_factory=list)
    step_components: dict[str, list[list[float]]] = field(default_factory=dict)

    def select(self, indices: Sequence[int]) -> "RewardResult":
        """The results of the rollouts at `indices`, in that order (error counts are kept whole)."""
        return RewardResult(
            total=[self.total[i] for i in indices],
            components={k: [v[i] for i in indices] for k, v in self.components.items()},
            verifier_passed={k: [v[i] for i in indices] for k, v in self.verifier_passed.items()},
            errors=dict(self.errors),
            step_total=[self.step_total[i] for i in indices] if self.step_total else [],
            step_components={k: [v[i] for i in indices] for k, v in self.step_components.items()},
        )

    @staticmethod
    def concat(results: Sequence["RewardResult"]) -> "RewardResult":
        """One result holding the rollouts of `results` in order."""
        first = results[0]
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r.errors.items():
                errors[k] = errors.get(k, 0) + v
        return RewardResult(
            total=[x for r in results for x in r.total],
            components={k: [x for r in results for x in r.components[k]] for k in first.components},
            verifier_passed={k: [x for r in results for x in r.verifier_passed[k]] for k in first.verifier_passed},
            errors=errors,
            step_total=[x for r in results for x in r.step_total],
            step_components={k: [x for r in results for x in r.step_components[k]] for k in first.step_components},
        )


INLINE_SECONDS = 0.002  # a sync function whose recent calls' median is within this keeps running on the event loop
INLINE_WINDOW = 5  # how many of a function's latest inline calls the median is taken over


class InlinePolicy:
    """Decides when a sync function with `execution: auto` leaves the event loop for worker threads.

    It moves once the lower median of its last `window` inline calls exceeds `threshold` seconds,
    judged from the second call on: one slow call among fast ones never moves it; a function slow
    from its first call moves after two, one that turns slow once most of its last `window` calls
    were (3 of 5). The move is for good; a function that has been slow is not tried inline again.
    """

    def __init__(self, threshold: float = INLINE_SECONDS, window: int = INLINE_WINDOW) -> None:
        self.threshold = threshold
        self.seconds: deque[float] = deque(maxlen=window)
        self.threaded = False

    def observe(self, seconds: float) -> bool:
        """Record one inline call's duration; True once the function should run in threads."""
        self.seconds.append(seconds)
        if len(self.seconds) >= 2 and statistics.median_low(self.seconds) > self.threshold:
            self.threaded = True
        return self.threaded


@dataclass
class _Resolved:
    spec: RewardSpec
    label: str
    function: Callable[..., Any]
    verifiers: list[tuple[str, Callable[..., Any], dict[str, Any]]]


class RewardCalculator:
    """Combines weighted, verifier-gated reward functions into rewards per rollout and per turn.

    Args:
        rewards: rollout-level functions: each scores a whole trajectory (`completion` is all the
            text the policy wrote). Every name is resolved here, so a typo fails when the config is
            instantiated, before any model is loaded.
        step_rewards: step-level functions: each scores one turn of a multi-turn rollout; they are
            called with `completion` = that turn's text, `turn` (its index), `action`,
            `observation` and the `trajectory`.
    """

    def __init__(self, rewards: list[RewardSpec], step_rewards: Optional[list[RewardSpec]] = None) -> None:
        if not rewards and not step_rewards:
            raise ConfigError("reward.rewards is empty: configure at least one reward function.")
        self.specs = [RewardSpec(**spec) if isinstance(spec, dict) else spec for spec in rewards]
        self.step_specs = [RewardSpec(**spec) if isinstance(spec, dict) else spec for spec in step_rewards or []]
        self._functions = [self._resolve(f"reward.rewards[{i}]", spec) for i, spec in enumerate(self.specs)]
        self._step_functions = [self._resolve(f"reward.step_rewards[{i}]", spec) for i, spec in enumerate(self.step_specs)]
        self._policies: dict[int, InlinePolicy] = {}  # per sync function (by id) with execution auto
        labels = [f.label for f in self._functions + self._step_functions]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ConfigError(
                f"reward: the label(s) {duplicates} appear more than once; set a distinct 'label' on each."
            )

    @staticmethod
    def _resolve(where: str, spec: RewardSpec) -> _Resolved:
        try:
            function = REWARDS.get(spec.name)
            verifiers = []
            for v in spec.verifiers:
                v = VerifierSpec(name=v) if isinstance(v, str) else VerifierSpec(**v) if isinstance(v, dict) else v
                verifiers.append((_verifier_label(v), VERIFIERS.get(v.name), dict(v.kwargs)))
        except KeyError as err:
            raise ConfigError(f"{where}: {err.args[0]}") from None
        for option in ("weight", "verifier_penalty", "error_penalty"):
            if not math.isfinite(getattr(spec, option)):
                raise ConfigError(f"{where}.{option} must be a finite number, got {getattr(spec, option)}.")
        if spec.on_error not in ("raise", "penalty"):
            raise ConfigError(f"{where}.on_error must be 'raise' or 'penalty', got {spec.on_error!r}.")
        if spec.timeout is not None and not spec.timeout > 0:
            raise ConfigError(f"{where}.timeout must be > 0 seconds (or null), got {spec.timeout}.")
        if spec.execution not in ("auto", "inline", "thread"):
            raise ConfigError(f"{where}.execution must be 'auto', 'inline' or 'thread', got {spec.execution!r}.")
        if spec.execution == "inline" and spec.timeout is not None:
            raise ConfigError(
                f"{where}: execution 'inline' cannot honour timeout={spec.timeout:g} (a call on the event loop cannot be "
                "cut off); drop the timeout or use execution 'auto' or 'thread'."
            )
        reserved = sorted(set(spec.kwargs) & _RESERVED)
        if reserved:
            raise ConfigError(f"{where}.kwargs: {reserved} are supplied by retrain for every rollout; rename these options.")
        label = spec.label or (spec.name if spec.name in REWARDS else function.__name__)
        return _Resolved(spec, label, function, verifiers)

    @property
    def labels(self) -> list[str]:
        return [f.label for f in self._functions]

    @property
    def step_labels(self) -> list[str]:
        return [f.label for f in self._step_functions]

    @property
    def verifier_names(self) -> list[str]:
        return sorted({name for f in self._functions + self._step_functions for name, _, _ in f.verifiers})

    def score(self, trajectories: Sequence[Trajectory]) -> RewardResult:
        """Score rollouts from synchronous code (runs the async scorer on a private event loop)."""
        return asyncio.run(self.ascore(trajectories))

    async def ascore(self, trajectories: Sequence[Trajectory]) -> RewardResult:
        """Score rollouts; every rollout is scored concurrently."""
        errors: dict[str, int] = {}
        per_rollout = await asyncio.gather(*(self._score_rollout(t, errors) for t in trajectories))
        per_steps = await asyncio.gather(*(self._score_steps(t, errors) for t in trajectories))
        components = {f.label: [values[f.label] for values, _ in per_rollout] for f in self._functions}
        verifier_passed = {
            name: [passed.get(name, all(p.get(name, True) for p in steps_passed)) for (_, passed), (_, steps_passed) in zip(per_rollout, per_steps)]
            for name in self.verifier_names
        }
        step_components = {f.label: [[turn[f.label] for turn in steps] for steps, _ in per_steps] for f in self._step_functions}
        step_total = [
            [t.observation.reward + sum(f.spec.weight * values[f.label] for f in self._step_functions) for t, values in zip(traj.turns, steps)]
            for traj, (steps, _) in zip(trajectories, per_steps)
        ]
        total = [sum(f.spec.weight * values[f.label] for f in self._functions) for values, _ in per_rollout]
        return RewardResult(total, components, verifier_passed, errors, step_total, step_components)

    async def _score_rollout(self, trajectory: Trajectory, errors: dict[str, int]) -> tuple[dict[str, float], dict[str, bool]]:
        kwargs = {**trajectory.record.reward_kwargs(), "completion": trajectory.completion_text, "trajectory": trajectory}
        return await self._apply(self._functions, kwargs, trajectory, errors)

    async def _score_steps(self, trajectory: Trajectory, errors: dict[str, int]) -> tuple[list[dict[str, float]], list[dict[str, bool]]]:
        values, passed = [], []
        for index, turn in enumerate(trajectory.turns):
            kwargs = {
                **trajectory.record.reward_kwargs(), "completion": turn.action.text, "turn": index,
                "action": turn.action, "observation": turn.observation, "trajectory": trajectory,
            }
            turn_values, turn_passed = await self._apply(self._step_functions, kwargs, trajectory, errors)
            values.append(turn_values)
            passed.append(turn_passed)
        return values, passed

    async def _apply(
        self, functions: list[_Resolved], kwargs: dict[str, Any], trajectory: Trajectory, errors: dict[str, int]
    ) -> tuple[dict[str, float], dict[str, bool]]:
        values: dict[str, float] = {}
        passed: dict[str, bool] = {}
        for f in functions:
            gate = True
            for name, check, options in f.verifiers:
                if name not in passed:
                    passed[name] = bool(await self._call(name, "verifier", check, {**kwargs, **options}, trajectory, f.spec.timeout, "auto"))
                gate = gate and passed[name]
            if not gate:
                values[f.label] = f.spec.verifier_penalty
                continue
            try:
                values[f.label] = _as_reward(f.label, await self._call(
                    f.label, "reward", f.function, {**kwargs, **f.spec.kwargs}, trajectory, f.spec.timeout, f.spec.execution), trajectory)
            except RewardError:
                if f.spec.on_error == "raise":
                    raise
                errors[f.label] = errors.get(f.label, 0) + 1
                values[f.label] = f.spec.error_penalty
        return values, passed

    async def _call(
        self, name: str, kind: str, function: Callable[..., Any], kwargs: dict[str, Any], trajectory: Trajectory,
        timeout: Optional[float], execution: str,
    ) -> Any:
        where = f"(prompt {_short(trajectory.record.prompt)}, completion {_short(trajectory.completion_text)})"
        try:
            if inspect.iscoroutinefunction(function):
                pending = call_with_accepted(function, kwargs)
            elif self._runs_inline(function, timeout, execution):
                policy = self._policies.get(id(function)) if execution == "auto" else None
                started = self._clock()
                pending = call_with_accepted(function, kwargs)  # inline: see "Execution" in the module docstring
                if policy is not None:
                    policy.observe(self._clock() - started)
            else:  # a worker thread: the event loop keeps serving the other episodes, and the timeout can fire
                pending = asyncio.get_running_loop().run_in_executor(None, functools.partial(call_with_accepted, function, kwargs))
            result = await asyncio.wait_for(pending, timeout) if inspect.isawaitable(pending) else pending
            if inspect.isawaitable(result):  # a sync function that returned an awaitable
                result = await asyncio.wait_for(result, timeout)
        except asyncio.TimeoutError:
            raise RewardError(f"{kind} '{name}' timed out after {timeout:g} s {where}") from None
        except Exception as err:
            raise RewardError(f"{kind} '{name}' raised {type(err).__name__}: {err} {where}") from err
        return result

    _clock = staticmethod(time.perf_counter)  # what inline calls are timed with (tests give a clock they control)

    def _runs_inline(self, function: Callable[..., Any], timeout: Optional[float], execution: str) -> bool:
        """Whether this sync call runs on the event loop (True) or in a worker thread (False)."""
        if execution != "auto":
            return execution == "inline"  # `inline` with a timeout was refused at construction
        if timeout is not None:
            return False
        return not self._policies.setdefault(id(function), InlinePolicy()).threaded


def _as_reward(label: str, value: Any, trajectory: Trajectory) -> float:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise RewardError(f"reward '{label}' returned {value!r}; it must return a number.")
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"reward '{label}' returned {value} for prompt {_short(trajectory.record.prompt)}; rewards must be finite.")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
