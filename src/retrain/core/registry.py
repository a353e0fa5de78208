"""Named functions, and finding user functions by import path or file path.

`Registry` backs the `@reward`, `@verifier` and `@tool` registries; `import_function` resolves
`package.module:function`, `package.module.function` and `path/to/file.py:function`, so user code
needs no packaging to be used from a config. It sits below `reward`, `environment` and `data`
(each uses it), so none of them imports another for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Optional


class Registry:
    """Named functions of one kind ('reward' or 'verifier')."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._functions: dict[str, Callable[..., Any]] = {}

    def add(self, function: Callable[..., Any], name: Optional[str] = None) -> Callable[..., Any]:
        key = name or function.__name__
        existing = self._functions.get(key)
        if existing is not None and _qualified_name(existing) != _qualified_name(function):
            raise ValueError(
                f"A {self.kind} named '{key}' is already registered ({_qualified_name(existing)}); "
                f"give {_qualified_name(function)} another name with @{self.kind}(name=...)."
            )
        self._functions[key] = function
        return function

    def names(self) -> list[str]:
        return sorted(self._functions)

    def __contains__(self, name: str) -> bool:
        return name in self._functions

    def get(self, name: str) -> Callable[..., Any]:
        """The function registered as `name`, or imported from an import or file path."""
        if name in self._functions:
            return self._functions[name]
        if ":" in name or "." in name:
            return import_function(name, self.kind)
        raise KeyError(
            f"Unknown {self.kind} '{name}'. Registered {self.kind}s: {', '.join(self.names()) or 'none'}. "
            f"Or give an import path ('package.module:function') or a file path ('path/to/file.py:function')."
        )


def _qualified_name(function: Callable[..., Any]) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def import_function(path: str, kind: str) -> Callable[..., Any]:
    """The callable at `package.module:name`, `package.module.name` or `path/to/file.py:name`.

    Raises:
        KeyError: naming `kind`, the path and what failed (import error, no such callable).
    """
    if ":" in path:
        module_part, attribute = path.rsplit(":", 1)
    else:
        module_part, attribute = path.rsplit(".", 1)
    try:
        if module_part.endswith(".py"):
            module = _load_file(Path(module_part))
        else:
            module = importlib.import_module(module_part)
    except Exception as err:  # any failure while importing user code becomes a located config error
        raise KeyError(f"Cannot import {kind} '{path}': {type(err).__name__}: {err}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise KeyError(f"Cannot import {kind} '{path}': '{module_part}' has no callable named '{attribute}'.")
    return function


def _load_file(file: Path) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"no file '{file}' (resolved to '{file.resolve()}')")
    module_name = f"retrain_user_{file.resolve().stem}_{abs(hash(str(file.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]  # a half-imported file must not be found next time
        raise
    return module


def call_with_accepted(function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    """Call `function` with the keyword arguments it accepts (all of them if it takes **kwargs)."""
    parameters = inspect.signature(function).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return function(**kwargs)
    accepted = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return function(**{k: v for k, v in kwargs.items() if k in accepted})
