"""The `@reward` and `@verifier` registries.

A reward function scores one rollout: it is called with keyword arguments `completion` (the text
the policy wrote), `prompt`, `answer`, every metadata field of the prompt record, `trajectory` (the
whole episode) and the options given in the config, and returns a float. A verifier takes the same
arguments and returns a bool (pass/fail). Either may be `async`. A function that does not take
`**kwargs` receives only the arguments it names.

Functions are found (`retrain.core.registry`) by registered name, by import path (`package.module:function` or
`package.module.function`), or by file path (`path/to/rewards.py:function`), so user code needs no
packaging to be used from a config.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar, Union, overload

from retrain.core.registry import Registry, call_with_accepted, import_function  # noqa: F401  (re-exported)

F = TypeVar("F", bound=Callable[..., Any])


REWARDS = Registry("reward")
VERIFIERS = Registry("verifier")


def _decorator(registry: Registry, function: Any, name: Optional[str]) -> Any:
    if isinstance(function, str):  # @reward("name")
        name, function = function, None
    if function is None:
        return lambda f: registry.add(f, name)
    return registry.add(function, name)


@overload
def reward(function: F) -> F: ...
@overload
def reward(function: Optional[str] = None, *, name: Optional[str] = None) -> Callable[[F], F]: ...
def reward(function: Union[Callable[..., Any], str, None] = None, *, name: Optional[str] = None) -> Any:
    """Register a reward function: `@reward`, `@reward("name")` or `@reward(name="name")`."""
    return _decorator(REWARDS, function, name)


@overload
def verifier(function: F) -> F: ...
@overload
def verifier(function: Optional[str] = None, *, name: Optional[str] = None) -> Callable[[F], F]: ...
def verifier(function: Union[Callable[..., Any], str, None] = None, *, name: Optional[str] = None) -> Any:
    """Register a verifier (a pass/fail check): `@verifier`, `@verifier("name")` or `@verifier(name=...)`."""
    return _decorator(VERIFIERS, function, name)
