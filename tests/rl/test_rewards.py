"""Scoring tricky answers, the format reward, the verifier workers' hard timeouts, and the
reward functions (built-ins and users' own, with their columns, errors and timeouts)."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from gxpo.rl.rewards import RewardFunctions, RewardScorer, function_name, resolve_function

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


# --- reward functions: built-ins, users' functions, weights ----------------------------------

_USER_REWARDS = """
import math, time

def by_column(prompts, completions, answers, bonus, **columns):
    # one call per prompt: every argument is a list over that prompt's responses
    assert len(set(prompts)) == 1 and len(completions) == len(answers) == len(bonus)
    return [b + len(completions) + len(columns["tag"][0]) for b in bonus]

def raises(prompts, completions, answers, **columns):
    if "boom" in prompts[0]:
        raise RuntimeError("boom")
    return [1.0] * len(completions)

def hangs(prompts, completions, answers, **columns):
    if "hang" in prompts[0]:
        time.sleep(10_000)
    return [2.0] * len(completions)

def too_few(prompts, completions, answers, **columns):
    return [1.0]

def not_finite(prompts, completions, answers, **columns):
    return [math.nan] + [3.0] * (len(completions) - 1)

NOT_A_FUNCTION = 3
"""


@pytest.fixture(scope="module")
def user_rewards(tmp_path_factory):
    """Module name of the injected reward functions, importable by fresh worker interpreters."""
    root = tmp_path_factory.mktemp("rewards")
    (root / "gxpo_test_rewards.py").write_text(textwrap.dedent(_USER_REWARDS))
    sys.path.insert(0, str(root))
    yield "gxpo_test_rewards"
    sys.path.remove(str(root))


def test_user_reward_gets_extra_columns_per_prompt(user_rewards, scorer):
    functions = ("correct", "boxed_format", f"{user_rewards}:by_column")
    with RewardFunctions(functions, (1.0, 0.1, 0.5), scorer=scorer, num_workers=2) as f:
        scores = f(
            ["q0", "q0", "q1", "q1", "q1"],  # prompts of 2 and 3 responses
            [r"\boxed{4}", "4", r"\boxed{5}", "x", r"\boxed{7}"],
            ["4", "4", "4", "4", "7"],
            "math",
            [{"bonus": 10 * i, "tag": "ab"} for i in range(5)],
            groups=[0, 0, 1, 1, 1],
        )
    assert list(scores.parts) == ["correct", "boxed_format", "by_column"]
    np.testing.assert_array_equal(scores.parts["correct"], [1, 1, 0, 0, 1])
    np.testing.assert_array_equal(scores.parts["boxed_format"], [1, 0, 1, 0, 1])
    # bonus + the call's size (2 or 3 responses) + len("ab"): the columns reached the function
    np.testing.assert_array_equal(scores.parts["by_column"], [4, 14, 25, 35, 45])
    expected = scores.parts["correct"] + 0.1 * scores.parts["boxed_format"]
    np.testing.assert_allclose(scores.rewards, expected + 0.5 * scores.parts["by_column"])
    np.testing.assert_array_equal(scores.correct, [True, True, False, False, True])
    assert scores.counts["reward/by_column/errors"] == scores.counts["reward/by_column/timeouts"]
    assert scores.counts["reward/by_column/errors"] == 0


def test_boxed_format_is_the_old_format_reward(scorer):
    responses, refs = [r"\boxed{4}", r"\boxed{5}", "The answer is 4."], ["4"] * 3
    old, _ = scorer.score_batch(responses, refs, "math", format_reward=0.1)
    with RewardFunctions(("correct", "boxed_format"), (1.0, 0.1), scorer=scorer) as f:
        new = f(["q"] * 3, responses, refs, "math").rewards
    np.testing.assert_allclose(new, old, rtol=1e-6)


def test_raising_and_hanging_rewards_score_zero_and_are_counted(user_rewards, caplog):
    functions = (f"{user_rewards}:raises", f"{user_rewards}:hangs")
    with RewardFunctions(functions, timeout_s=0.5, kill_grace_s=0.5, num_workers=2) as f:
        prompts = ["boom", "boom", "hang", "hang", "fine", "fine"]
        start = time.perf_counter()
        scores = f(prompts, ["a"] * 6, [None] * 6, groups=[0, 0, 1, 1, 2, 2])
        elapsed = time.perf_counter() - start
        np.testing.assert_array_equal(scores.parts["raises"], [0, 0, 1, 1, 1, 1])
        np.testing.assert_array_equal(scores.parts["hangs"], [2, 2, 0, 0, 2, 2])
        np.testing.assert_array_equal(scores.rewards, [2, 2, 1, 1, 3, 3])
        assert scores.counts == {
            "reward/raises/errors": 2,
            "reward/raises/timeouts": 0,
            "reward/hangs/errors": 0,
            "reward/hangs/timeouts": 2,
        }
        assert scores.correct is None  # no answers: no accuracy
        assert elapsed < 0.5 + 0.5 + 5.0, elapsed  # the timeout, the kill grace, worker starts
        assert "RuntimeError: boom" in caplog.text and "timeout_s=0.5" in caplog.text
        # Still usable afterwards (a fresh worker replaced the hung one).
        again = f(["fine"] * 2, ["a"] * 2, [None] * 2)
        np.testing.assert_array_equal(again.rewards, [3, 3])
        pids = f.worker_pids
    assert not any(_alive(p) for p in pids)


def test_bad_values_score_zero(user_rewards):
    functions = (f"{user_rewards}:too_few", f"{user_rewards}:not_finite")
    with RewardFunctions(functions, num_workers=1) as f:
        scores = f(["q"] * 3, ["a"] * 3, [None] * 3)
    np.testing.assert_array_equal(scores.parts["too_few"], [0, 0, 0])
    np.testing.assert_array_equal(scores.parts["not_finite"], [0, 3, 3])
    assert scores.counts["reward/too_few/errors"] == 3
    assert scores.counts["reward/not_finite/errors"] == 1


def test_reward_function_errors(user_rewards):
    assert resolve_function("correct") is None and function_name("a.b:c") == "c"
    with pytest.raises(ValueError, match="neither a built-in"):
        resolve_function("accuracy")
    with pytest.raises(ValueError, match=r"'no_such_module_xyz' does not import.*PYTHONPATH"):
        resolve_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        resolve_function(f"{user_rewards}:missing")
    with pytest.raises(ValueError, match="non-callable 'NOT_A_FUNCTION'"):
        resolve_function(f"{user_rewards}:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match="weights has 1 entries for 2"):
        RewardFunctions(("correct", "boxed_format"), (1.0,))
    with pytest.raises(ValueError, match="share a name"):
        RewardFunctions((f"{user_rewards}:hangs", "other_module:hangs"))
    with RewardFunctions(("correct",)) as f, pytest.raises(ValueError, match="needs a reference"):
        f(["q"], ["a"], [None])


def test_length_penalty_example():
    from examples.rewards import length_penalty  # noqa: PLC0415 (the README's example)

    assert length_penalty(["q"] * 3, ["a" * 10, "a" * 15, "a" * 40], [None] * 3, [10] * 3) == [
        -0.0,
        -0.5,
        -1.0,
    ]
    assert length_penalty(["q"], ["a" * 300], [None]) == [-0.5]  # the default budget, 200
