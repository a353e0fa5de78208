"""The math-verify check, and a worker process that runs it where a hang or blow-up can be killed.

This file imports nothing from `retrain`: `math_rewards` imports `check` from it, and also runs it
as a stand-alone script (`python -c <boot> this_file.py`) in worker processes, which then need
only the standard library and `math_verify`.

Worker protocol, one JSON object per line: the worker writes `{"ready": true}` (or
`{"error": "..."}` and exits) once `math_verify` is imported, then answers each request
`{"gold": str, "prediction": str}` read from stdin with `{"result": true | false | null}` on its
stdout (`null`: the reference answer could not be parsed). It exits when stdin closes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Optional


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its signal timeouts are off; the caller bounds the work instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


def quiet_math_verify_logs() -> None:
    """Drop math-verify's 'Timeout is disabled' warning (idempotent)."""
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTimeoutDisabledWarning) for f in logger.filters):
            logger.addFilter(_DropTimeoutDisabledWarning())


def gold_text(answer: str) -> str:
    """The reference answer as math-verify should read it: bare LaTeX or a number is boxed, so it is
    parsed as one expression (`2x+1`, not the number 2); text already delimited (`$...$`, a
    `\\boxed{}`) is kept as it is."""
    answer = answer.strip()
    if "$" in answer or "\\boxed" in answer or answer.startswith(("\\(", "\\[")):
        return answer
    return "\\boxed{" + answer + "}"


def check(gold: str, prediction: str) -> Optional[bool]:
    """Whether the final answer in `prediction` is mathematically equivalent to the reference `gold`.

    Returns None when `gold` yields no expression at all. math-verify's signal-based timeouts are
    switched off (`parsing_timeout=None`, `timeout_seconds=None`): `signal.alarm` works only in the
    main thread and would also cancel any other SIGALRM timer of the process (pytest-timeout's).
    The work is bounded by the caller instead (a killable worker process).
    """
    from math_verify import parse, verify

    quiet_math_verify_logs()
    parsed_gold = parse(gold_text(gold), parsing_timeout=None)
    if not parsed_gold:
        return None
    parsed_prediction = parse(prediction, parsing_timeout=None)
    if not parsed_prediction:
        return False
    return bool(verify(parsed_gold, parsed_prediction, timeout_seconds=None))


def _limit_memory(extra_bytes: int) -> None:
    """Cap this process's address space at its current size plus `extra_bytes` (Linux), so an
    expression like 10^{10^{10}} fails with MemoryError instead of taking the machine's memory."""
    try:
        import resource

        with open("/proc/self/status") as status:
            size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
        limit = size_kb * 1024 + extra_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, OSError, ValueError, StopIteration):
        pass  # no /proc or no rlimits here: the time limit still bounds the work


def serve(extra_memory_bytes: int) -> None:
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    try:
        import math_verify  # noqa: F401

        check("1", "\\boxed{1}")  # warm up the parser before the first timed request
    except Exception as err:  # an ImportError, or a broken installation
        send({"error": f"{type(err).__name__}: {err}"})
        return
    quiet_math_verify_logs()
    _limit_memory(extra_memory_bytes)
    send({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = check(request["gold"], request["prediction"])
        except Exception:  # math-verify catches its own errors; anything else is "not verified"
            result = False
        send({"result": result})


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2 * 1024**3)
