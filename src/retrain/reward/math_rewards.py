"""Math answer checking: the `math_verify` reward and the `boxed_answer` helper.

`math_verify` scores 1.0 when the completion's final answer is mathematically equivalent to the
reference answer, using Hugging Face's `math-verify` (an optional extra:
`pip install 'retrain[math]'`): `\\boxed{0.5}` matches `\\frac{1}{2}` and `1/2`, `\\boxed{1+2x}`
matches `2x+1`, `\\boxed{(x+1)^2}` matches `x^2+2x+1`, `\\boxed{\\{2,1\\}}` matches `\\{1,2\\}`.

Threads and time. The check is CPU-heavy, pure-Python sympy work, and some answers never finish
(`\\boxed{10^{10^{10}}}` makes sympy compute a ten-billion-digit number). `RewardCalculator` runs
synchronous reward functions like this one in worker threads, off the event loop that drives the
episodes, so the function must work in any thread. math-verify's own timeouts use
`signal.alarm`, which works only in the main thread (and would cancel any other SIGALRM timer of
the process), so they are switched off (`parse(..., parsing_timeout=None)`,
`verify(..., timeout_seconds=None)`) and the work is bounded another way: each check runs in a
small pool of worker processes (at most `MAX_WORKERS`, each serving one thread at a time, started
on first use and reused). A check that takes longer than `verify_timeout` seconds scores 0.0 and
its worker is killed and replaced; each worker's memory is capped (Linux) so a huge expression
fails with MemoryError instead of exhausting the machine. The processes also let checks from
several threads run in parallel, which threads alone cannot do under the GIL.

With `verify_timeout=None` the check runs in the calling thread, unbounded, serialised by a lock
(math-verify's parser caches are not documented as thread-safe; under the GIL the lock costs no
parallelism): faster for trusted answers, but a pathological completion can hang it.

>>> boxed_answer(r"so the area is \\boxed{\\frac{1}{2}}.")
'\\\\frac{1}{2}'
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from typing import Any, Optional

from retrain.reward import _math_verify_worker
from retrain.reward.builtins import _require_answer
from retrain.reward.registry import reward

logger = logging.getLogger(__name__)

MAX_WORKERS = max(1, min(8, os.cpu_count() or 1))
"""The most worker processes `math_verify` keeps (and so the most checks running at once)."""

WORKER_MEMORY_BYTES = 2 * 1024**3
"""Address space one worker may allocate beyond what it holds after importing math-verify (Linux)."""

WORKER_STARTUP_TIMEOUT = 120.0
"""Seconds a new worker may take to start Python and import math-verify."""

_INSTALL_HINT = "the 'math_verify' reward needs the math-verify package: pip install 'retrain[math]'"


def boxed_answer(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` in `text` (nested braces kept), or None.

    Boxes are read left to right; a box inside another is part of the outer one's content. An
    escaped brace (`\\{`, `\\}`) does not open or close anything. A box whose braces never close
    (a truncated generation) ends the search.

    >>> boxed_answer(r"\\boxed{1} then \\boxed{\\frac{a}{b}}")
    '\\\\frac{a}{b}'
    >>> boxed_answer(r"\\boxed{\\{1, 2\\}}")
    '\\\\{1, 2\\\\}'
    >>> boxed_answer(r"\\boxed {x^{2}}")
    'x^{2}'
    >>> boxed_answer("no box") is None, boxed_answer(r"\\boxed{1 + ") is None
    (True, True)
    """
    found: Optional[str] = None
    position = 0
    while True:
        start = text.find("\\boxed", position)
        if start < 0:
            return found
        i = start + len("\\boxed")
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text) or text[i] != "{":
            position = i  # `\boxed` without a brace (or `\boxedfoo`): not a box
            continue
        depth, j = 1, i + 1
        while j < len(text) and depth:
            if text[j] == "\\":
                j += 2  # an escaped character, `\{` and `\}` included
                continue
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            return found  # unbalanced: the text ends inside the box
        found = text[i + 1 : j - 1]
        position = j


MIN_MATH_VERIFY = (0, 8)
"""Oldest math-verify whose timeouts can be switched off (`None`); 0.7 would call
`signal.alarm(None)`, fail inside its own error handling, and score every answer 0.0."""


def _require_math_verify() -> None:
    try:
        import math_verify  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    _require_recent_math_verify()


@functools.lru_cache(maxsize=None)
def _require_recent_math_verify() -> None:
    try:
        installed = importlib.metadata.version("math-verify")
    except importlib.metadata.PackageNotFoundError:
        return  # imported from a source tree without metadata: assume it is recent
    numbers = tuple(int(part) for part in re.findall(r"\d+", installed)[:2])
    if numbers < MIN_MATH_VERIFY:
        raise ImportError(
            f"math-verify {installed} is too old for the 'math_verify' reward (it needs >= "
            f"{'.'.join(map(str, MIN_MATH_VERIFY))}): pip install 'retrain[math]'"
        )


# --------------------------------------------------------------------------- worker processes

_BOOT = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


class _WorkerDied(RuntimeError):
    pass


class _Worker:
    """One worker process (see `_math_verify_worker`); used by one thread at a time."""

    def __init__(self) -> None:
        # Run by file path, not `-m`: the worker imports only math_verify, never this package. It
        # searches this process's sys.path too, so it finds what this process found.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), *sys.path] if p)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, _math_verify_worker.__file__, str(WORKER_MEMORY_BYTES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, name="retrain-math-verify-reader", daemon=True).start()
        try:
            hello = self._receive(WORKER_STARTUP_TIMEOUT)
        except (TimeoutError, _WorkerDied) as err:
            self.kill()
            raise RuntimeError(f"math_verify: a worker process failed to start ({err}).") from None
        if not hello.get("ready"):
            self.kill()
            error = str(hello.get("error"))
            if "math_verify" in error and ("ImportError" in error or "ModuleNotFoundError" in error):
                raise ImportError(f"{_INSTALL_HINT} (in the worker process {sys.executable}: {error})")
            raise RuntimeError(f"math_verify: a worker process failed to start: {error}")

    def _read(self) -> None:
        """Forward the worker's lines to `_lines`, then None at its end (the only reader and closer of stdout)."""
        stdout = self.process.stdout
        assert stdout is not None
        try:
            for line in stdout:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(None)
            stdout.close()

    def _receive(self, timeout: Optional[float]) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer within {timeout:g} s") from None
        if line is None:
            raise _WorkerDied(f"the worker exited with code {self.process.wait()}")
        return json.loads(line)

    def check(self, gold: str, prediction: str, timeout: float) -> Optional[bool]:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"gold": gold, "prediction": prediction}) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise _WorkerDied(f"the worker is gone ({err})") from None
        return self._receive(timeout).get("result")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass


class _WorkerPool:
    """Up to `MAX_WORKERS` workers, each lent to one thread per check, started on demand."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_WORKERS)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()

    def check(self, gold: str, prediction: str, timeout: float) -> Optional[bool]:
        if self._pid != os.getpid():
            self._reset()  # a forked child: the parent's workers are not this process's children
        with self._slots:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker = _Worker()
                with self._lock:
                    self._all.add(worker)
            try:
                result = worker.check(gold, prediction, timeout)
            except (TimeoutError, _WorkerDied) as err:
                self._discard(worker)
                logger.warning("math_verify: scored 0.0, %s; worker restarted (completion %.80r)", err, prediction)
                return False
            except BaseException:
                self._discard(worker)
                raise
            with self._lock:
                self._idle.append(worker)
            return result

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)

    def close(self) -> None:
        """Stop every worker (they are started again when needed)."""
        if self._pid != os.getpid():
            return
        with self._lock:
            workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            worker.kill()


_POOL = _WorkerPool()
atexit.register(_POOL.close)
_IN_PROCESS_LOCK = threading.Lock()


def _check(gold: str, prediction: str, verify_timeout: Optional[float]) -> Optional[bool]:
    if verify_timeout is None:
        with _IN_PROCESS_LOCK:
            return _math_verify_worker.check(gold, prediction)
    return _POOL.check(gold, prediction, verify_timeout)


# --------------------------------------------------------------------------- the reward


@reward
def math_verify(
    completion: str,
    answer: Any = None,
    boxed_only: bool = False,
    verify_timeout: Optional[float] = 5.0,
    **_: Any,
) -> float:
    """1.0 when the completion's final answer is mathematically equivalent to the reference answer.

    The completion's answer is found by math-verify: a `\\boxed{...}` first, else an "answer is
    ..."/"Answer: ..." phrase, else the last LaTeX expression or number in the text. Several boxes
    may be read together as one set-valued answer (`\\boxed{3}, \\boxed{7}` matches `\\{3, 7\\}`,
    not `7`); `boxed_only` takes the last box alone.
    Equivalence is numeric and symbolic (`1/2`, `0.5`, `\\frac{1}{2}`; `2x+1`, `1+2x`; sets,
    intervals, equations `x=2` against `2`). The reference answer is read as one expression
    (it is boxed unless it already holds `$...$` or `\\boxed{}`); one that yields nothing raises.

    Args:
        boxed_only: score only the content of the last `\\boxed{...}` (`boxed_answer`; 0.0 when
            there is none), rather than letting math-verify look for an answer anywhere in the text.
        verify_timeout: seconds one check may take in a worker process before it scores 0.0; None
            checks in the calling thread with no bound (see the module docstring). Set the
            calculator's own `timeout`, if any, above this.

    >>> math_verify(completion=r"The answer is \\boxed{0.5}.", answer=r"\\frac{1}{2}")
    1.0
    >>> math_verify(completion=r"So $x = \\boxed{1+2y}$", answer="2y+1", verify_timeout=None)
    1.0
    >>> math_verify(completion=r"\\boxed{3}", answer="4")
    0.0
    """
    _require_math_verify()
    gold = str(_require_answer("math_verify", answer)).strip()
    if not gold:
        raise ValueError("reward 'math_verify': the reference answer is empty.")
    if verify_timeout is not None and not verify_timeout > 0:
        raise ValueError(f"reward 'math_verify': verify_timeout must be > 0 seconds or None, got {verify_timeout}.")
    prediction = completion
    if boxed_only:
        content = boxed_answer(completion)
        if content is None:
            return 0.0
        prediction = "\\boxed{" + content + "}"
    if not prediction.strip():
        return 0.0
    result = _check(gold, prediction, verify_timeout)
    if result is None:
        raise ValueError(f"reward 'math_verify': math-verify finds no expression in the reference answer {answer!r}.")
    return 1.0 if result else 0.0
