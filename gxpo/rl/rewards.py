"""Rewards: 1.0 for a correct response, 0.0 otherwise, plus an optional format bonus.

Two kinds of reference answer (``KINDS``), matched by :mod:`gxpo.rl.answers`:

- ``"math"`` (MATH, Math-500, AMC23, Minerva Math, OlympiadBench): equivalence through
  ``math-verify`` (fractions, radicals, intervals, sets, units, text answers, ...).
- ``"numeric"`` (GSM8K, the arithmetic task): a number compared numerically, tolerant of
  ``1,000``, ``$``, ``%`` and ``18.00``.

Most responses are decided in-process by cheap string and number matching. The rest go to
a small pool of verifier processes, each answer under a hard deadline: sympy can hang
forever, and math-verify's own signal-based timeout works only in a main thread, while this
module is called from a multithreaded JAX process. A worker that overruns its deadline is
killed and replaced; the answer scores 0 and counts in ``RewardStats.timeouts``.

Shapes: the key in ``gxpo.models.config`` (B responses scored together).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing import connection

import numpy as np

from gxpo.rl.answers import extract_answer_and_box, fast_math_equal, numeric_equal

KINDS = ("math", "numeric")

# ---------------------------------------------------------------------------------------------
# Verifier worker processes.

_DEFAULT_VERIFIER = "gxpo.rl.answers:math_verify_equal"
_READY, _OK, _TIMEOUT, _ERROR = "ready", 0, 1, 2
_STARTUP_TIMEOUT_S = 120.0
# A fresh interpreter that imports this module and, through the verifier spec, the matcher
# (gxpo.rl.answers by default). The package's __init__ files import nothing, so a worker
# never loads JAX.
_WORKER_BOOT = "import sys\nfrom gxpo.rl.rewards import _worker_main\n_worker_main(sys.argv[1:])\n"


class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside a worker; a BaseException so `except Exception` lets it by."""


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout


def _resolve_verifier(spec: str) -> Callable[[str, str], bool]:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when the parent dies, even mid-hang."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _verify_one(fn: Callable[[str, str], bool], pred: str, ref: str, timeout_s: float):
    status, value = _ERROR, False
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            value = bool(fn(pred, ref))
            status = _OK
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        if status != _OK:
            status = _TIMEOUT
    except Exception:
        status = _ERROR
    return status, value


def _worker_main(argv: list[str]) -> None:
    task_fd, result_fd, parent_pid = int(argv[0]), int(argv[1]), int(argv[2])
    timeout_s, spec = float(argv[3]), argv[4]
    _die_with_parent(parent_pid)
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    tasks = connection.Connection(task_fd, writable=False)
    results = connection.Connection(result_fd, readable=False)
    fn = _resolve_verifier(spec)
    if spec == _DEFAULT_VERIFIER:  # pay sympy's and the LaTeX parser's first-call cost now
        fn("\\frac{1}{2}", "0.5")
    signal.signal(signal.SIGALRM, _raise_soft_timeout)
    results.send(_READY)
    while True:
        try:
            pred, ref = tasks.recv()
        except (EOFError, OSError):  # the scorer closed or its process died
            os._exit(0)  # skips interpreter teardown, slow with sympy loaded
        results.send(_verify_one(fn, pred, ref, timeout_s))


class _Worker:
    """One verifier subprocess and its two pipes; handles at most one task at a time."""

    def __init__(self, spec: str, timeout_s: float):
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        paths = [p or os.getcwd() for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT]
                + [str(task_r), str(result_w), str(os.getpid()), repr(timeout_s), spec],
                pass_fds=(task_r, result_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            for fd in (task_w, result_r):
                os.close(fd)
            raise
        finally:
            os.close(task_r)
            os.close(result_w)
        self.tasks = connection.Connection(task_w, readable=False)
        self.results = connection.Connection(result_r, writable=False)
        self.ready = False
        self.task: int | None = None
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S

    def close_pipes(self) -> None:
        self.tasks.close()  # idempotent
        self.results.close()

    def reap(self, grace_s: float) -> None:
        """Wait ``grace_s`` for an exit (EOF on its task pipe ends the loop), then kill."""
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.close_pipes()
        self.proc.wait()


def _stop_all(workers: list[_Worker], grace_s: float = 1.0) -> None:
    """Stop every worker: EOF to all at once, then reap each (killing stragglers)."""
    for w in workers:
        w.close_pipes()
    for w in workers:
        w.reap(grace_s)
    workers.clear()


# ---------------------------------------------------------------------------------------------
# Scoring.


@dataclasses.dataclass
class RewardStats:
    """Counts over one ``score_batch`` call (all but ``seconds`` count responses)."""

    count: int = 0  # responses scored
    correct: int = 0
    boxed: int = 0  # responses with a \boxed{} answer (earns the format reward)
    no_answer: int = 0  # nothing extractable
    fast: int = 0  # decided in-process by string / number matching
    cached: int = 0  # decided by an earlier verification of the same pair
    verified: int = 0  # decided by a verifier worker (distinct pairs go once)
    timeouts: int = 0  # verifier overran the per-answer timeout: scored 0
    errors: int = 0  # verifier raised or died: scored 0
    seconds: float = 0.0  # wall time of the call

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class RewardScorer:
    """Scores responses against references; owns the verifier worker processes.

    Use it as a context manager, or call ``close()``: workers start on the first answer that
    needs sympy (never for ``"numeric"`` batches) and live until then (or garbage collection /
    interpreter exit). Thread-safe: calls are serialised.

    Args:
      timeout_s: per-answer limit for a verification. A worker signals itself at
        ``timeout_s`` and is killed and replaced at ``timeout_s + kill_grace_s``.
      num_workers: verifier processes; default min(4, CPU count).
      verifier: ``"module:function"`` with ``function(prediction, reference) -> bool``,
        importable in a fresh interpreter; the default is ``gxpo.rl.answers.math_verify_equal``.
      cache_size: verified (answer, reference) results kept for reuse across calls.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 3.0,
        num_workers: int | None = None,
        verifier: str = _DEFAULT_VERIFIER,
        kill_grace_s: float = 0.5,
        cache_size: int = 65536,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 or None, got {num_workers}")
        module_name, sep, attr = verifier.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr) if sep else None
        except (ImportError, AttributeError):
            fn = None
        if not callable(fn):
            raise ValueError(
                f"verifier={verifier!r} is not an importable 'module:function'; the default is "
                f"{_DEFAULT_VERIFIER!r}"
            )
        self.timeout_s = float(timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)
        self.verifier = verifier
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[tuple[str, str], bool] = collections.OrderedDict()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    # -- public ------------------------------------------------------------------------------

    def score_batch(
        self,
        responses: Sequence[str],
        references: Sequence[str],
        kind: str | Sequence[str],
        *,
        format_reward: float = 0.0,
    ) -> tuple[np.ndarray, RewardStats]:
        """rewards_B (float32): 1.0 per correct response, + ``format_reward`` if it boxed."""
        start = time.perf_counter()
        n = len(responses)
        kinds = [kind] * n if isinstance(kind, str) else list(kind)
        if len(references) != n or len(kinds) != n:
            raise ValueError(
                f"responses ({n}), references ({len(references)}) and kind ({len(kinds)}) "
                "must have the same length"
            )
        if bad := sorted(set(kinds) - set(KINDS)):
            raise ValueError(f"unknown kind {bad}; expected one of {KINDS}")
        stats = RewardStats(count=n)
        correct_B = np.zeros(n, dtype=bool)
        boxed_B = np.zeros(n, dtype=bool)
        pending: dict[tuple[str, str], list[int]] = {}
        with self._lock:
            for i, (response, reference, k) in enumerate(zip(responses, references, kinds)):
                pred, boxed_B[i] = extract_answer_and_box(response)
                if pred is None:
                    stats.no_answer += 1
                    continue
                ref = str(reference)
                if k == "numeric":
                    correct_B[i] = numeric_equal(pred, ref)
                    stats.fast += 1
                    continue
                decided = fast_math_equal(pred, ref)
                if decided is not None:
                    correct_B[i] = decided
                    stats.fast += 1
                elif (pred, ref) in self._cache:
                    self._cache.move_to_end((pred, ref))
                    correct_B[i] = self._cache[(pred, ref)]
                    stats.cached += 1
                else:
                    pending.setdefault((pred, ref), []).append(i)
            if pending:
                self._verify_pending(pending, correct_B, stats)
        stats.correct = int(correct_B.sum())
        stats.boxed = int(boxed_B.sum())
        rewards_B = correct_B.astype(np.float32) + np.float32(format_reward) * boxed_B
        stats.seconds = time.perf_counter() - start
        return rewards_B, stats

    def score(
        self, response: str, reference: str, kind: str = "math", *, format_reward: float = 0.0
    ) -> float:
        """The reward of one response (``score_batch`` of one)."""
        rewards_B, _ = self.score_batch([response], [reference], kind, format_reward=format_reward)
        return float(rewards_B[0])

    def start(self) -> None:
        """Start the workers now without waiting for them (they warm up while you compile)."""
        with self._lock:
            self._top_up()

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """Stop and reap every worker. The scorer stays usable (workers restart on demand)."""
        with self._lock:
            _stop_all(self._workers)

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- workers -----------------------------------------------------------------------------

    def _verify_pending(
        self, pending: dict[tuple[str, str], list[int]], correct_B: np.ndarray, stats: RewardStats
    ) -> None:
        pairs = list(pending)
        outcomes = self._run(pairs)
        for pair, (status, value) in zip(pairs, outcomes):
            rows = pending[pair]
            if status == _OK:
                correct_B[rows] = value
                stats.verified += len(rows)
                self._cache[pair] = value
            elif status == _TIMEOUT:
                stats.timeouts += len(rows)
            else:
                stats.errors += len(rows)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _spawn(self) -> _Worker:
        return _Worker(self.verifier, self.timeout_s)

    def _top_up(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def _run(self, pairs: list[tuple[str, str]]) -> list[tuple[int, bool]]:
        """Outcome (status, value) of each pair, at most one in flight per worker."""
        self._top_up()
        outcomes: list[tuple[int, bool] | None] = [None] * len(pairs)
        todo = collections.deque(range(len(pairs)))
        workers = self._workers
        while todo or any(w.task is not None for w in workers):
            for idx, w in enumerate(workers):
                if w.ready and w.task is None and todo:
                    w.task = todo.popleft()
                    w.deadline = time.monotonic() + self.timeout_s + self.kill_grace_s
                    try:
                        w.tasks.send(pairs[w.task])
                    except OSError:  # it died while idle
                        workers[idx] = self._replace(w, _ERROR, outcomes)
            waiting = [w for w in workers if w.task is not None or not w.ready]
            wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            readable = set(connection.wait([w.results for w in waiting], timeout=wait_s))
            now = time.monotonic()
            for idx, w in enumerate(workers):
                if w.results in readable:
                    try:
                        message = w.results.recv()
                    except (EOFError, OSError):
                        message = None
                    if message == _READY:
                        w.ready = True
                    elif message is not None and w.task is not None:
                        outcomes[w.task] = message
                        w.task = None
                    else:
                        workers[idx] = self._replace(w, _ERROR, outcomes)
                elif now >= w.deadline and (w.task is not None or not w.ready):
                    workers[idx] = self._replace(w, _TIMEOUT, outcomes)
        return outcomes  # type: ignore[return-value]

    def _replace(self, w: _Worker, status: int, outcomes: list) -> _Worker:
        """Kill a hung or dead worker, record its task's outcome, start a fresh one."""
        if not w.ready and w.task is None:
            w.kill()
            raise RuntimeError(
                f"a reward verifier worker ({self.verifier}) did not start within "
                f"{_STARTUP_TIMEOUT_S:.0f} s or died while starting (exit code "
                f"{w.proc.returncode}); see its stderr above"
            )
        if w.task is not None:
            outcomes[w.task] = (status, False)
        w.kill()
        return self._spawn()
