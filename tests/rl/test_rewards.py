"""Scoring tricky answers, the format reward, and the verifier workers' hard timeouts."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gxpo.rl.rewards import RewardScorer

# (response, reference, kind, expected score)
TRICKY = [
    # fractions: \frac, \dfrac, a/b, shorthand, decimals
    (r"so \boxed{\frac{1}{2}}", "0.5", "math", 1.0),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", "math", 1.0),
    (r"\boxed{1/2}", r"\frac{1}{2}", "math", 1.0),
    (r"\boxed{\tfrac{2}{4}}", "1/2", "math", 1.0),
    (r"\boxed{0.5}", r"\dfrac{1}{2}", "math", 1.0),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", "math", 0.0),
    (r"\boxed{-\frac{3}{4}}", "-0.75", "math", 1.0),
    (r"\boxed{\frac{-3}{4}}", r"-\frac{3}{4}", "math", 1.0),
    # radicals and symbolic equivalence (sympy)
    (r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}", "math", 1.0),
    (r"\boxed{\frac{1}{2(n+1)}}", r"\frac{1}{2 n+2}", "math", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", "math", 1.0),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{8}", "math", 0.0),
    # units, degrees, dollars, percent
    (r"\boxed{10 \text{ cm}}", "10", "math", 1.0),
    (r"\boxed{90^\circ}", "90", "math", 1.0),
    (r"\boxed{90}", r"90^\circ", "math", 1.0),
    (r"\boxed{\$18}", "18", "math", 1.0),
    (r"\boxed{50\%}", "50", "math", 1.0),
    # intervals
    (r"\boxed{[1,3)}", "[1,3)", "math", 1.0),
    (r"\boxed{(1,3)}", "[1,3)", "math", 0.0),
    (r"\boxed{(-\infty, 2]}", r"(-\infty,2]", "math", 1.0),
    # text answers
    (r"\boxed{\text{east}}", r"\text{east}", "math", 1.0),
    (r"\boxed{\text{west}}", r"\text{east}", "math", 0.0),
    (r"\boxed{\textbf{(C)}}", r"\text{(C)}", "math", 1.0),
    # commas in numbers, negative numbers
    (r"\boxed{1,000}", "1000", "math", 1.0),
    (r"\boxed{-3}", "-3", "math", 1.0),
    (r"\boxed{3}", "-3", "math", 0.0),
    (r"\boxed{−3}", "-3", "math", 1.0),  # unicode minus
    # multiple answers (OlympiadBench is_multiple_answer, comma-separated lists)
    (r"\boxed{2, 1}", "1,2", "math", 1.0),
    (r"\boxed{1, 2, 3}", "1,2", "math", 0.0),
    (r"\boxed{(4,5,7),(1,8,19),(2,7,13)}", "(1,8,19), (2,7,13), (4,5,7)", "math", 1.0),
    (r"\boxed{f(x)=2-x, f(x)=x}", "f(x)=x, f(x)=2-x", "math", 1.0),
    # nested braces, tuples with \left( \right)
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt2}{2}", "math", 1.0),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\pi/2)", "math", 1.0),
    (r"\boxed{\{1, 2\}}", r"\{1,2\}", "math", 1.0),
    # equations, scientific notation (Minerva), plain-text answers
    (r"\boxed{x = 5}", "5", "math", 1.0),
    (r"\boxed{4.5 \times 10^{33}}", "4.5e33", "math", 1.0),
    (r"\boxed{4.4 \times 10^{33}}", "4.5e33", "math", 0.0),
    (r"The answer is $\frac{3}{4}$.", "0.75", "math", 1.0),
    ("I have no idea.", "5", "math", 0.0),
    # numeric kind (GSM8K, arithmetic)
    ("#### 1,000", "1000", "numeric", 1.0),
    ("She makes $18.00 a day. The answer is $18.00.", "18", "numeric", 1.0),
    (r"\boxed{18 \text{ dollars}}", "18", "numeric", 1.0),
    ("3 + 5 = 8", "8", "numeric", 1.0),
    ("8", "9", "numeric", 0.0),
    ("10-3=7", "7", "numeric", 1.0),
    ("It drops to −7 degrees.", "-7", "numeric", 1.0),
    ("The rate is 50%.", "50", "numeric", 1.0),
    (r"\boxed{\frac{3}{4}}", "0.75", "numeric", 1.0),
    ("No number here.", "3", "numeric", 0.0),
]


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(timeout_s=5.0, num_workers=2) as s:
        yield s


def test_tricky_answers(scorer):
    responses, references, kinds, expected = zip(*TRICKY)
    rewards_B, stats = scorer.score_batch(responses, references, kinds)
    wrong = [c for c, r in zip(TRICKY, rewards_B) if r != c[3]]
    assert not wrong, wrong
    assert rewards_B.dtype == np.float32 and rewards_B.shape == (len(TRICKY),)
    assert stats.count == len(TRICKY) and stats.correct == int(sum(expected))
    assert stats.timeouts == stats.errors == 0
    assert stats.verified > 0 and stats.fast > 0  # both paths exercised
    assert stats.fast + stats.verified + stats.cached + stats.no_answer == len(TRICKY)
    # A repeat is answered from the cache without any worker.
    _, again = scorer.score_batch(responses, references, kinds)
    assert again.verified == 0 and again.cached == stats.verified


def test_format_reward(scorer):
    rewards_B, stats = scorer.score_batch(
        [r"\boxed{4}", r"\boxed{5}", "The answer is 4."], ["4"] * 3, "math", format_reward=0.1
    )
    # float32 1 + 0.1 and 0.1 are within an ulp of 1.1 and 0.1 (eps32 ~ 1.2e-7 relative).
    np.testing.assert_allclose(rewards_B, [1.1, 0.1, 1.0], rtol=1e-6)
    assert stats.boxed == 2 and stats.correct == 2


def test_bad_arguments(scorer):
    with pytest.raises(ValueError, match="kind"):
        scorer.score_batch(["1"], ["1"], "algebra")
    with pytest.raises(ValueError, match="same length"):
        scorer.score_batch(["1", "2"], ["1"], "math")
    with pytest.raises(ValueError, match="verifier"):
        RewardScorer(verifier="no_such_module_xyz:f")
    with pytest.raises(ValueError, match="timeout_s"):
        RewardScorer(timeout_s=0)


def test_score_one_response(scorer):
    assert scorer.score(r"\boxed{\dfrac{6}{8}}", r"\frac34") == 1.0
    assert scorer.score("so 7", "7", "numeric", format_reward=0.5) == 1.0


def test_worker_imports_no_jax():
    """What a verifier worker imports (the pool module and the matcher) leaves JAX unloaded."""
    code = "import sys, gxpo.rl.rewards, gxpo.rl.answers; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --- hard timeouts -------------------------------------------------------------------------

_VERIFIERS = """
import os, signal, time

def sleeps(pred, ref):
    if pred == "hang":
        time.sleep(10_000)
    return pred.lower() == ref.lower()

def ignores_alarm(pred, ref):
    if pred == "hang":  # SIGALRM blocked: only a kill from outside ends this
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(10_000)
    return pred.lower() == ref.lower()

def raises(pred, ref):
    if pred == "boom":
        raise RuntimeError("boom")
    return pred.lower() == ref.lower()

def exits(pred, ref):
    if pred == "die":
        os._exit(3)
    return pred.lower() == ref.lower()
"""


@pytest.fixture(scope="module")
def verifiers(tmp_path_factory):
    """Module name of the injected verifiers, importable by fresh worker interpreters."""
    root = tmp_path_factory.mktemp("verifiers")
    (root / "gxpo_test_verifiers.py").write_text(textwrap.dedent(_VERIFIERS))
    sys.path.insert(0, str(root))
    yield "gxpo_test_verifiers"
    sys.path.remove(str(root))


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()  # a reaped child is gone, a zombie still listed


def _worker_children() -> list[int]:
    """Live or zombie child processes of this process that are verifier workers."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"_worker_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


# "hang" goes last so the timing below does not include starting its replacement.
_HANG_BATCH = ([r"\boxed{A}", r"\boxed{b}", r"\boxed{hang}"], ["a", "c", "x"])


@pytest.mark.parametrize("verifier", ["sleeps", "ignores_alarm"])
def test_hanging_verifier_times_out(verifiers, verifier):
    before = set(_worker_children())
    scorer = RewardScorer(
        timeout_s=0.5, kill_grace_s=0.5, num_workers=1, verifier=f"{verifiers}:{verifier}"
    )
    try:
        scorer.score_batch([r"\boxed{Z}"], ["z"], "math")  # workers started and ready
        (pid,) = scorer.worker_pids
        start = time.perf_counter()
        rewards_B, stats = scorer.score_batch(*_HANG_BATCH, "math")
        elapsed = time.perf_counter() - start
        assert elapsed < 2.5, elapsed
        np.testing.assert_array_equal(rewards_B, [1.0, 0.0, 0.0])
        assert stats.timeouts == 1 and stats.errors == 0 and stats.verified == 2
        if verifier == "sleeps":  # the worker interrupted itself and lives on
            assert scorer.worker_pids == [pid]
        else:  # killed, reaped (no zombie) and replaced
            assert not _alive(pid) and scorer.worker_pids != [pid]
        # Still usable afterwards, including by the replacement worker.
        rewards_B, stats = scorer.score_batch([r"\boxed{B}", r"\boxed{d}"], ["b", "e"], "math")
        np.testing.assert_array_equal(rewards_B, [1.0, 0.0])
        pids = scorer.worker_pids
    finally:
        scorer.close()
    assert not any(_alive(p) for p in pids)
    assert set(_worker_children()) <= before


@pytest.mark.parametrize("verifier, bad", [("raises", "boom"), ("exits", "die")])
def test_failing_verifier_scores_zero(verifiers, verifier, bad):
    with RewardScorer(timeout_s=2.0, num_workers=1, verifier=f"{verifiers}:{verifier}") as scorer:
        responses = [rf"\boxed{{{bad}}}", r"\boxed{Q}", rf"\boxed{{{bad}}}"]
        rewards_B, stats = scorer.score_batch(responses, ["x", "q", "x"], "math")
        np.testing.assert_array_equal(rewards_B, [0.0, 1.0, 0.0])
        assert stats.errors == 2 and stats.timeouts == 0  # one distinct pair, two responses
        rewards_B, _ = scorer.score_batch([r"\boxed{R}"], ["r"], "math")
        assert rewards_B[0] == 1.0
        pids = scorer.worker_pids
    assert not any(_alive(p) for p in pids)


def test_numeric_batches_start_no_worker():
    with RewardScorer() as scorer:
        rewards_B, stats = scorer.score_batch(["7", "so 8"], ["7", "9"], "numeric")
        np.testing.assert_array_equal(rewards_B, [1.0, 0.0])
        assert scorer.worker_pids == [] and stats.fast == 2


def test_real_sympy_hang_times_out():
    """An answer sympy would grind on forever, through the real math-verify verifier."""
    with RewardScorer(timeout_s=1.0, num_workers=1) as scorer:
        scorer.start()
        start = time.perf_counter()
        rewards_B, stats = scorer.score_batch(
            [r"\boxed{9^{9^{9^{9}}}}", r"\boxed{7}"], ["7"] * 2, "math"
        )
        elapsed = time.perf_counter() - start
        np.testing.assert_array_equal(rewards_B, [0.0, 1.0])
        assert stats.timeouts == 1 and stats.errors == 0
        pids = scorer.worker_pids
    assert elapsed < 1.0 + 0.5 + 5.0, elapsed  # the timeout, the kill grace, a cold start
    assert not any(_alive(p) for p in pids)
