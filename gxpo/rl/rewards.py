"""Rewards: the reward functions of a run, and the worker processes that bound their time.

A run's reward is a weighted sum of reward functions (``config.reward.functions`` and
``config.reward.weights``, see :class:`RewardFunctions`):

- ``"correct"``: 1.0 for a response whose final answer equals the reference, else 0.0. Two
  kinds of reference answer (``KINDS``), matched by :mod:`gxpo.rl.answers`: ``"math"`` (MATH,
  Math-500, AMC23, Minerva Math, OlympiadBench) through ``math-verify`` (fractions, radicals,
  intervals, sets, units, text answers, ...), and ``"numeric"`` (GSM8K, the arithmetic task),
  a number compared numerically, tolerant of ``1,000``, ``$``, ``%`` and ``18.00``.
- ``"boxed_format"``: 1.0 for a response whose answer sits in a ``\\boxed{}``, else 0.0.
- ``"package.module:function"``: a user's function, called TRL-style on the responses to one
  prompt at a time::

      def length_penalty(prompts, completions, answers, **columns) -> list[float]:
          return [-len(c) / 1000 for c in completions]

  ``prompts`` are the dataset's questions (before the prompt template), ``completions`` the
  decoded responses, ``answers`` the reference answers (None where the data has none), and
  ``columns`` every other field of the dataset rows, one list per field. The module must be
  importable in a fresh interpreter (on ``sys.path`` or ``PYTHONPATH``).

Most ``"correct"`` answers are decided in-process by cheap string and number matching. The
rest, and every call of a user's function, go to small pools of worker processes, each task
under a hard deadline: sympy (or a user's code) can hang forever, and a signal-based timeout
works only in a main thread, while this module is called from a multithreaded JAX process. A
worker that overruns its deadline is killed and replaced; its rows score 0 and are counted as
timeouts. A task that raises scores 0 and is counted as an error. Neither stops training.

Shapes: the key in ``gxpo.models.config`` (B responses scored together).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import connection
from typing import Any

import numpy as np

from gxpo.rl.answers import extract_answer_and_box, fast_math_equal, numeric_equal

KINDS = ("math", "numeric")
BUILTIN = ("correct", "boxed_format")  # the reward functions this module computes itself
# The positional arguments of a user's reward function: no dataset field may take these names.
ARGUMENTS = ("prompts", "completions", "answers")

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Worker processes.

_DEFAULT_VERIFIER = "gxpo.rl.answers:math_verify_equal"
_READY, _OK, _TIMEOUT, _ERROR = "ready", 0, 1, 2
_VERIFY, _CALL = "verify", "call"  # worker modes: fn(pred, ref) -> bool; fn(*args, **kw) -> floats
_STARTUP_TIMEOUT_S = 120.0
# A fresh interpreter that imports this module and, through the specs, the functions it runs
# (gxpo.rl.answers by default). The package's __init__ files import nothing, so a worker never
# loads JAX (unless a user's module does).
_WORKER_BOOT = "import sys\nfrom gxpo.rl.rewards import _worker_main\n_worker_main(sys.argv[1:])\n"


class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside a worker; a BaseException so `except Exception` lets it by."""


def _raise_soft_timeout(signum, frame):
    raise _SoftTimeout


def _resolve_verifier(spec: str) -> Callable[..., Any]:
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


def _timed(work: Callable[[], Any], timeout_s: float) -> tuple[int, Any]:
    """(status, value) of ``work()`` under a SIGALRM deadline; on an error the value is its
    one-line description."""
    status, value = _ERROR, None
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            value = work()
            status = _OK
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        if status != _OK:
            status, value = _TIMEOUT, None
    except Exception as e:
        status, value = _ERROR, f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return status, value


def _verify_one(fn: Callable[[str, str], bool], task: tuple[str, str], timeout_s: float):
    pred, ref = task
    status, value = _timed(lambda: bool(fn(pred, ref)), timeout_s)
    return status, value if status == _OK else False


def _call_one(fns: list[Callable[..., Any]], task: tuple, timeout_s: float):
    index, args, kwargs = task
    # Converted inside the deadline: a lazy result (a generator, a tensor) runs the user's code.
    return _timed(lambda: [float(v) for v in fns[index](*args, **kwargs)], timeout_s)


def _worker_main(argv: list[str]) -> None:
    task_fd, result_fd, parent_pid = int(argv[0]), int(argv[1]), int(argv[2])
    timeout_s, mode, specs = float(argv[3]), argv[4], argv[5:]
    _die_with_parent(parent_pid)
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    tasks = connection.Connection(task_fd, writable=False)
    results = connection.Connection(result_fd, readable=False)
    fns = [_resolve_verifier(spec) for spec in specs]
    if mode == _VERIFY:
        run, fn = _verify_one, fns[0]
        if specs[0] == _DEFAULT_VERIFIER:  # pay sympy's and the LaTeX parser's first call now
            fn("\\frac{1}{2}", "0.5")
    else:
        run, fn = _call_one, fns
    signal.signal(signal.SIGALRM, _raise_soft_timeout)
    results.send(_READY)
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):  # the pool closed or its process died
            os._exit(0)  # skips interpreter teardown, slow with sympy loaded
        results.send(run(fn, task, timeout_s))


class _Worker:
    """One worker subprocess and its two pipes; handles at most one task at a time."""

    def __init__(self, mode: str, specs: Sequence[str], timeout_s: float):
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        paths = [p or os.getcwd() for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT]
                + [str(task_r), str(result_w), str(os.getpid()), repr(timeout_s), mode]
                + list(specs),
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


class _Pool:
    """Worker processes of one mode and specs; runs tasks, at most one in flight per worker,
    each under ``timeout_s`` (killed and replaced at ``timeout_s + kill_grace_s``).

    Not thread-safe: its owner serialises calls.
    """

    def __init__(
        self, mode: str, specs: Sequence[str], timeout_s: float, kill_grace_s: float, size: int
    ):
        self.mode, self.specs = mode, tuple(specs)
        self.timeout_s, self.kill_grace_s, self.size = timeout_s, kill_grace_s, size
        self.workers: list[_Worker] = []

    def _spawn(self) -> _Worker:
        return _Worker(self.mode, self.specs, self.timeout_s)

    def top_up(self) -> None:
        while len(self.workers) < self.size:
            self.workers.append(self._spawn())

    def close(self) -> None:
        _stop_all(self.workers)

    def run(self, tasks: Sequence[Any]) -> list[tuple[int, Any]]:
        """Outcome (status, value) of each task; a timed-out or dead worker's is (status, None)."""
        self.top_up()
        outcomes: list[tuple[int, Any] | None] = [None] * len(tasks)
        todo = collections.deque(range(len(tasks)))
        workers = self.workers
        while todo or any(w.task is not None for w in workers):
            for idx, w in enumerate(workers):
                if w.ready and w.task is None and todo:
                    w.task = todo.popleft()
                    w.deadline = time.monotonic() + self.timeout_s + self.kill_grace_s
                    try:
                        w.tasks.send(tasks[w.task])
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
                f"a reward worker ({', '.join(self.specs)}) did not start within "
                f"{_STARTUP_TIMEOUT_S:.0f} s or died while starting (exit code "
                f"{w.proc.returncode}); see its stderr above"
            )
        if w.task is not None:
            outcomes[w.task] = (status, None)
        w.kill()
        return self._spawn()


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
        self._pool = _Pool(
            _VERIFY, (verifier,), self.timeout_s, self.kill_grace_s, self.num_workers
        )
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._pool.workers)

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
            self._pool.top_up()

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool.workers]

    def close(self) -> None:
        """Stop and reap every worker. The scorer stays usable (workers restart on demand)."""
        with self._lock:
            self._pool.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- workers -----------------------------------------------------------------------------

    def _verify_pending(
        self, pending: dict[tuple[str, str], list[int]], correct_B: np.ndarray, stats: RewardStats
    ) -> None:
        pairs = list(pending)
        outcomes = self._pool.run(pairs)
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


# ---------------------------------------------------------------------------------------------
# Reward functions.


def function_name(entry: str) -> str:
    """The name a reward function is logged under (``reward/<name>``): a built-in's name, or
    the part after the colon of ``"package.module:function"``."""
    return entry.rpartition(":")[2]


def resolve_function(entry: str) -> Callable[..., Any] | None:
    """Checks one reward function entry: None for a built-in (``BUILTIN``), else the function
    that ``"package.module:function"`` names, imported here.

    Raises:
      ValueError: the entry is neither, its module does not import, or it is not callable.
    """
    if entry in BUILTIN:
        return None
    module_name, sep, attr = entry.partition(":")
    if not (sep and module_name and attr):
        raise ValueError(
            f"{entry!r} is neither a built-in reward function {BUILTIN} nor "
            "'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        message = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ValueError(
            f"reward function {entry!r}: its module {module_name!r} does not import "
            f"({message}); it must be importable from the working directory or PYTHONPATH"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        what = "has no attribute" if fn is None else "has a non-callable"
        raise ValueError(f"module {module_name!r} {what} {attr!r} (reward function {entry!r})")
    return fn


@dataclasses.dataclass
class Scores:
    """What :class:`RewardFunctions` gives for B responses."""

    rewards: np.ndarray  # [B] float32: the weighted sum of the parts
    parts: dict[str, np.ndarray]  # function name -> [B] float32: its own values, unweighted
    correct: np.ndarray | None  # [B] bool: the `correct` verdict; None when answers are missing
    # "reward/<name>/errors" and "reward/<name>/timeouts": responses scored 0 for that function
    # (for `correct`: the verifier's, counted whenever `correct` ran).
    counts: dict[str, int]


def _columns(fields: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows' fields as one list per field (None where a row lacks a field)."""
    names = list(dict.fromkeys(k for row in fields for k in row))
    return {k: [row.get(k) for row in fields] for k in names}


def _runs(groups: Sequence[Any] | None, n: int) -> list[slice]:
    """Consecutive rows with the same group id, as slices (one slice without groups)."""
    if groups is None:
        return [slice(0, n)] if n else []
    starts = [i for i in range(n) if i == 0 or groups[i] != groups[i - 1]]
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


class RewardFunctions:
    """A run's reward: the weighted sum of reward functions, each one's values kept apart.

    ``reward_b = sum_f weight_f * f(response_b)``. Built-ins: ``"correct"`` (1.0 when the final
    answer equals the reference, through ``scorer``) and ``"boxed_format"`` (1.0 when the answer
    sits in a ``\\boxed{}``). Any other entry is ``"package.module:function"``, called as
    ``fn(prompts, completions, answers, **columns) -> sequence of floats`` on the responses of
    one prompt at a time (consecutive rows with the same ``groups`` id), in worker processes,
    each call under the hard ``timeout_s``. A call that raises, times out, returns the wrong
    number of values, or a non-finite value scores 0 for its rows, is counted in
    ``Scores.counts`` and logged once per function; it never raises here.

    Args:
      functions: the entries, e.g. ``("correct", "boxed_format", "my_rewards:brevity")``.
      weights: one float per entry; ``()`` = 1.0 each.
      scorer: the ``RewardScorer`` that decides ``"correct"`` (default: one of its own, with
        ``timeout_s``, closed by ``close()``).
      timeout_s: the limit on one call of a user's function.
      num_workers: processes running the user's functions; default min(4, CPU count).
      kill_grace_s: how long past ``timeout_s`` a hung worker lives before it is killed.

    Use it as a context manager, or call ``close()``. Thread-safe: calls are serialised.

    Example::

      with RewardFunctions(("correct", "examples.rewards:length_penalty"), (1.0, 0.5)) as f:
          scores = f(questions, responses, answers, "math", fields, groups=prompt_ids)
          scores.rewards, scores.parts["length_penalty"], scores.counts
    """

    def __init__(
        self,
        functions: Sequence[str] = ("correct",),
        weights: Sequence[float] = (),
        *,
        scorer: RewardScorer | None = None,
        timeout_s: float = 3.0,
        num_workers: int | None = None,
        kill_grace_s: float = 0.5,
    ):
        functions, weights = tuple(functions), tuple(float(w) for w in weights)
        if not functions:
            raise ValueError(f"functions must name at least one reward function, e.g. {BUILTIN}")
        if weights and len(weights) != len(functions):
            raise ValueError(
                f"weights has {len(weights)} entries for {len(functions)} functions; give one "
                "per function, or () for 1.0 each"
            )
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
        names = [function_name(f) for f in functions]
        if len(set(names)) < len(names):
            raise ValueError(f"two reward functions share a name in {functions}: names {names}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        user = [f for f in functions if resolve_function(f) is not None]
        self.functions, self.names = functions, names
        self.weights = weights or (1.0,) * len(functions)
        self.timeout_s = float(timeout_s)
        self._user = {f: i for i, f in enumerate(user)}  # entry -> index in the workers' specs
        size = num_workers or min(4, os.cpu_count() or 1)
        self._pool = _Pool(_CALL, user, self.timeout_s, kill_grace_s, size) if user else None
        self._own_scorer = scorer is None
        self.scorer = RewardScorer(timeout_s=timeout_s) if scorer is None else scorer
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        workers = self._pool.workers if self._pool else []
        self._finalizer = weakref.finalize(self, _stop_all, workers)

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        answers: Sequence[str | None],
        kinds: str | Sequence[str] = "math",
        fields: Sequence[Mapping[str, Any]] | None = None,
        *,
        groups: Sequence[Any] | None = None,
    ) -> Scores:
        """Scores B responses.

        Args:
          prompts: [B] the questions, one per response.
          completions: [B] the decoded responses.
          answers: [B] reference answers, None where the data has none (then ``"correct"``
            cannot be among the functions, and ``Scores.correct`` is None).
          kinds: the answers' kind(s), each one of ``KINDS``.
          fields: [B] each row's other dataset fields, given to users' functions as columns.
          groups: [B] a prompt id per row; a user's function is called once per run of equal
            ids. None: once on all B rows.
        """
        n = len(completions)
        if len(prompts) != n or len(answers) != n or (fields is not None and len(fields) != n):
            raise ValueError(
                f"prompts ({len(prompts)}), completions ({n}), answers ({len(answers)}) and "
                f"fields ({n if fields is None else len(fields)}) must have the same length"
            )
        has_answers = all(a is not None for a in answers)
        if "correct" in self.functions and not has_answers:
            raise ValueError("the 'correct' reward function needs a reference answer per row")
        with self._lock:
            parts: dict[str, np.ndarray] = {}
            counts: dict[str, int] = {}
            correct = None
            if has_answers:
                values_B, stats = self.scorer.score_batch(completions, list(answers), kinds)
                values_B = np.asarray(values_B, np.float32)
                correct = values_B >= 1.0
                counts["reward/correct/timeouts"] = int(stats.timeouts)
                counts["reward/correct/errors"] = int(stats.errors)
                if "correct" in self.functions:
                    parts["correct"] = values_B
            if "boxed_format" in self.functions:
                boxed = [extract_answer_and_box(c)[1] for c in completions]
                parts["boxed_format"] = np.asarray(boxed, np.float32)
            if self._user:
                columns = _columns(fields or [{}] * n)
                for entry, values_B, errors, timeouts in self._call_user(
                    prompts, completions, answers, columns, _runs(groups, n)
                ):
                    name = function_name(entry)
                    parts[name] = values_B
                    counts[f"reward/{name}/errors"] = errors
                    counts[f"reward/{name}/timeouts"] = timeouts
        rewards_B = np.zeros(n, np.float32)
        for name, weight in zip(self.names, self.weights):
            rewards_B += np.float32(weight) * parts[name]
        ordered = {name: parts[name] for name in self.names}
        return Scores(rewards_B, ordered, correct, counts)

    def _call_user(self, prompts, completions, answers, columns, runs):
        """(entry, values_B, errors, timeouts) of each user function, all calls in one pool."""
        entries = list(self._user)
        tasks, where = [], []
        for entry in entries:
            for s in runs:
                args = (list(prompts[s]), list(completions[s]), list(answers[s]))
                tasks.append((self._user[entry], args, {k: v[s] for k, v in columns.items()}))
                where.append((entry, s))
        outcomes = self._pool.run(tasks)
        n = len(completions)
        results = {e: [np.zeros(n, np.float32), 0, 0] for e in entries}
        for (entry, s), (status, value) in zip(where, outcomes):
            result, rows = results[entry], s.stop - s.start
            if status == _TIMEOUT:
                result[2] += rows
                self._warn(entry, f"a call ran over timeout_s={self.timeout_s} s")
                continue
            if status == _OK and len(value) != rows:
                status, value = _ERROR, f"returned {len(value)} values for {rows} completions"
            if status != _OK:
                result[1] += rows
                self._warn(entry, value or "its worker process died")
                continue
            values = np.asarray(value, np.float32)
            finite = np.isfinite(values)
            if not finite.all():
                self._warn(entry, "returned a non-finite value")
                result[1] += int((~finite).sum())
            result[0][s] = np.where(finite, values, 0.0)
        return [(e, *results[e]) for e in entries]

    def _warn(self, entry: str, what: str) -> None:
        if entry not in self._warned:  # once per function: it may fail on every call
            self._warned.add(entry)
            name = function_name(entry)
            _log.warning(
                "reward function %s: %s; its rows score 0 (counted in reward/%s/errors and "
                "reward/%s/timeouts; later failures are not printed)",
                entry,
                what,
                name,
                name,
            )

    def start(self) -> None:
        """Start the user functions' workers now (they import while the model compiles)."""
        with self._lock:
            if self._pool:
                self._pool.top_up()

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._pool.workers] if self._pool else []

    def close(self) -> None:
        """Stop the workers (of the scorer too when it is this object's own)."""
        with self._lock:
            if self._pool:
                self._pool.close()
        if self._own_scorer:
            self.scorer.close()

    def __enter__(self) -> RewardFunctions:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
