"""One short block per mistake: turning what went wrong into what the user reads.

A config error reaches the command line in one of three shapes, and each becomes the same kind of
report (what is wrong, where, the valid choices, the fix), printed without a traceback:

1. jsonargparse's own parse errors (an unknown key, a wrong type, a value outside a `Literal`):
   an `ArgumentError` whose chain of causes spells the key path one level at a time
   (`Parser key "model"` -> `class_path 'retrain.GRPOTrainer'` -> `Parser key "loss_type"` ->
   the message). The chain is read into a key path and the innermost message; an unknown key gets
   the closest valid ones.
2. A constructor refusing its arguments while jsonargparse builds the config's objects: retrain's
   `ConfigError`s name their key themselves; any other `ValueError`/`TypeError` a constructor
   raises is named after the class it was building.
3. A `RetrainError` at any depth of the chain (or inside an exception group, as asyncio and anyio
   raise them), before or during training.

Anything else is a bug: it keeps its traceback. `RETRAIN_DEBUG=1` keeps every traceback.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from argparse import ArgumentError
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Optional, Sequence

from retrain.core.errors import ConfigError, RetrainError

DEBUG_VARIABLE = "RETRAIN_DEBUG"
_CONSTRUCTOR_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").lower() not in ("", "0", "false", "no")


@dataclass
class Report:
    """What the command line prints for one mistake, and the exit status."""

    message: str
    exit_code: int = 2
    title: str = "error"

    def render(self, command: str, config_files: Sequence[str]) -> str:
        where = f" (config: {', '.join(config_files)})" if config_files else ""
        body = "\n".join("  " + line if line else "" for line in self.message.strip().splitlines())
        return f"{command}: {self.title}{where}\n{body}\n  ({DEBUG_VARIABLE}=1 shows the traceback)"


# ---------------------------------------------------------------------- walking exception chains
def causes(err: BaseException) -> Iterator[BaseException]:
    """`err`, then what caused it, depth first; an exception group's members are walked too."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        members = getattr(current, "exceptions", None)  # BaseExceptionGroup (asyncio TaskGroup, anyio)
        following = [current.__cause__ or current.__context__]
        if isinstance(members, (list, tuple)):
            following = list(members) + following
        stack.extend(reversed([e for e in following if isinstance(e, BaseException)]))


def find_retrain_error(err: BaseException) -> Optional[RetrainError]:
    return next((e for e in causes(err) if isinstance(e, RetrainError)), None)


# ---------------------------------------------------------------------- 1. jsonargparse parse errors
_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":')
_CLASS_PATH = re.compile(r"^Problem with given class_path '([^']+)':")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_NOT_EXPECTED = re.compile(r"^Subcommand '(\w+)' does not accept option '([^']+)'")
_EXPECTED = re.compile(r"^Expected a (.+?)\. Got value: (.*)$", re.S)
_LITERAL = re.compile(r"typing\.Literal\[(.*)\]$")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _type_name(expected: str) -> str:
    match = re.fullmatch(r"<class '([\w.]+)'>", expected)
    return match.group(1) if match else expected


def closest(name: str, choices: Sequence[str]) -> list[str]:
    """The valid names nearest to `name` (as a typo of one of them), best first: the best alone when
    it stands out, else up to three."""
    tail = name.rsplit(".", 1)[-1]

    def similarity(choice: str) -> float:
        full = difflib.SequenceMatcher(None, name, choice).ratio()
        return max(full, difflib.SequenceMatcher(None, tail, choice.rsplit(".", 1)[-1]).ratio())

    scored = sorted(((similarity(c), c) for c in set(choices)), key=lambda sc: (-sc[0], sc[1]))
    near = [(score, c) for score, c in scored if score >= 0.7]
    if near and near[0][0] >= 0.9 and (len(near) == 1 or near[1][0] < near[0][0] - 0.05):
        return [near[0][1]]
    return [c for _, c in near[:3]]


def class_options(class_path: str) -> list[str]:
    """The constructor options of the class at `class_path` (following `**kwargs` up the MRO, as
    jsonargparse does), for suggesting the option a typo meant."""
    module_name, _, name = class_path.rpartition(".")
    try:
        import importlib

        cls = getattr(importlib.import_module(module_name), name)
    except Exception:  # the class was importable a moment ago; without it there is simply no hint
        return []
    options: list[str] = []
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]
        options += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(options))


def parse_error_report(err: ArgumentError, parser_keys: Sequence[str] = ()) -> Report:
    """The report for a jsonargparse parse error (shape 1 of the module docstring)."""
    path: list[str] = []
    class_path: Optional[str] = None
    innermost = err
    for cause in causes(err):
        line = _first_line(cause)
        if match := _PARSER_KEY.match(line):
            if not path or path[-1] != match.group(1):
                path.append(match.group(1))
        elif match := _CLASS_PATH.match(line):
            if class_path != match.group(1):
                class_path = match.group(1)
                path.append("init_args")
        innermost = cause
    text = str(innermost).strip()
    if class_path and isinstance(innermost, (ImportError, AttributeError)):
        if path and path[-1] == "init_args":
            path.pop()
        return Report(f"{'.'.join(path)}: class_path '{class_path}' cannot be imported: {text}.{_class_hint(class_path)}")
    key = ".".join(path)
    if text.startswith("Problems parsing config"):
        return Report(f"the config could not be read: {text.removeprefix('Problems parsing config:').strip()}")
    if match := _NOT_ACCEPTED.match(text):
        option = match.group(1)
        choices = class_options(class_path) if class_path else []
        where = f"{key}.{option}" if key else option
        return Report(_unknown(where, f"{class_path} has no option '{option}'", option, choices))
    if match := _NOT_EXPECTED.match(text):
        option = match.group(2)
        section = option.split(".")[0]
        choices = [k for k in parser_keys if k.split(".")[0] == section] or list(parser_keys)
        return Report(_unknown(option, f"`retrain {match.group(1)}` has no key '{option}'", option, choices))
    if text.startswith("unrecognized arguments:"):  # a command-line flag no key matches
        flags = [a[2:].split("=")[0] for a in text.split(":", 1)[1].split() if a.startswith("--")]
        lines = [_unknown(f, f"`retrain` has no key '{f}'", f, [k for k in parser_keys if k.split(".")[0] == f.split(".")[0]] or parser_keys) for f in flags]
        return Report("\n".join(lines) or text)
    if match := _EXPECTED.match(text):
        expected, got = match.group(1), match.group(2).strip()
        literal = _LITERAL.search(expected)
        if literal:
            values = [v.strip().strip("'\"") for v in literal.group(1).split(",")]
            near = closest(got, values)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            return Report(f"{key}: '{got}' is not one of the choices: {', '.join(values)}.{hint}")
        return Report(f"{key}: expected {_type_name(expected)}, got '{got}'.")
    return Report(f"{key + ': ' if key else ''}{text}")


def _class_hint(class_path: str) -> str:
    """ 'Did you mean ...' among the classes of the module `class_path` names, when it imports."""
    module_name, _, name = class_path.rpartition(".")
    try:
        import importlib

        module = importlib.import_module(module_name)
    except Exception:  # the module itself is what is missing: nothing to choose from
        return ""
    classes = [n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_")]
    near = closest(name, classes)
    return f" Did you mean {' or '.join(f'{module_name}.{n}' for n in near)}?" if near else ""


def _unknown(where: str, what: str, option: str, choices: Sequence[str]) -> str:
    near = closest(option, choices)
    if near:
        return f"{where}: {what}. Did you mean {' or '.join(repr(n) for n in near)}?"
    listed = f" Valid options: {', '.join(choices)}." if choices and len(choices) <= 40 else ""
    return f"{where}: {what}.{listed} `retrain fit --help` lists every key."


# ---------------------------------------------------------------------- 2. constructors refusing their input
def _class_being_built(tb: Optional[TracebackType]) -> Optional[str]:
    """The class whose constructor raised: the first `__init__`/`__post_init__` frame outside the
    config machinery (jsonargparse, Lightning's CLI) in the traceback."""
    while tb is not None:
        frame = tb.tb_frame
        module = frame.f_globals.get("__name__", "")
        if frame.f_code.co_name in ("__init__", "__post_init__") and not module.startswith(("jsonargparse", "lightning.pytorch.cli")):
            owner = frame.f_locals.get("self")
            if owner is not None:
                return f"{type(owner).__module__}.{type(owner).__qualname__}"
        tb = tb.tb_next
    return None


def instantiation_error(err: BaseException) -> Optional[RetrainError]:
    """A `RetrainError` for an error raised while the config's objects are built, or None for a bug.

    A retrain error anywhere in the chain is the report. Otherwise the innermost exception is
    a constructor's refusal when it is a `ValueError`-like error raised inside some class's
    `__init__` (a constructor validating its arguments); it is reported with that class's name.
    """
    found = find_retrain_error(err)
    if found is not None:
        return found
    innermost = list(causes(err))[-1]
    if not isinstance(innermost, _CONSTRUCTOR_ERRORS):
        return None
    owner = _class_being_built(innermost.__traceback__)
    if owner is None:
        return None
    detail = innermost.args[0] if isinstance(innermost, KeyError) and innermost.args else innermost
    return ConfigError(f"{owner}: {detail}")


# ---------------------------------------------------------------------- before parsing: the files themselves
def config_files(argv: Sequence[str]) -> list[str]:
    """The `--config` / `-c` files named on the command line, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_files(files: Sequence[str]) -> None:
    """Each config file exists and is a YAML mapping; else a `ConfigError` naming the file and line."""
    import yaml

    for name in files:
        path = Path(name)
        if name.lstrip().startswith(("{", "[")) or "\n" in name:  # a config given inline, not a file
            continue
        if not path.is_file():
            raise ConfigError(
                f"--config {name}: no such file (resolved to {path.resolve()}). Relative paths are read from the "
                "directory you run retrain in; the shipped configs are under configs/."
            )
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            place = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            context = getattr(err, "context", None)
            raise ConfigError(
                f"{name}{place}: invalid YAML: {problem}" + (f" ({context})" if context else "") + "."
            ) from None
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"{name}: a config is a mapping of keys (trainer:, model:, data:, ...), got {type(content).__name__}.")


def report_for(err: BaseException, parser_keys: Sequence[str] = ()) -> Optional[Report]:
    """The report for `err`, or None when it is a bug that keeps its traceback."""
    found = find_retrain_error(err)
    if found is not None:
        title = "configuration error" if isinstance(found, ConfigError) else "training stopped"
        return Report(str(found), exit_code=found.exit_code, title=title)
    if isinstance(err, ArgumentError):
        report = parse_error_report(err, parser_keys)
        report.title = "configuration error"
        return report
    return None


def option_keys(parser: Any) -> list[str]:
    """Every key a (sub)command's parser accepts, for suggestions (e.g. `trainer.max_steps`)."""
    return sorted({a.dest for a in getattr(parser, "_actions", []) if isinstance(getattr(a, "dest", None), str)})
