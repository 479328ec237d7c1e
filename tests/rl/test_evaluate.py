"""pass@k against hand-computed and brute-force values; maj@n; summaries and the table."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from gxpo.rl.evaluate import benchmark_table, default_ks, majority_correct, pass_at_k, summarize

# n = 5: PASS5[c][k - 1] = 1 - C(5 - c, k) / C(5, k), worked by hand.
PASS5 = [
    [0.0, 0.0, 0.0, 0.0, 0.0],
    [0.2, 0.4, 0.6, 0.8, 1.0],
    [0.4, 0.7, 0.9, 1.0, 1.0],
    [0.6, 0.9, 1.0, 1.0, 1.0],
    [0.8, 1.0, 1.0, 1.0, 1.0],
    [1.0, 1.0, 1.0, 1.0, 1.0],
]


@pytest.mark.parametrize("c", range(6))
@pytest.mark.parametrize("k", range(1, 6))
def test_pass_at_k_by_hand(c, k):
    assert pass_at_k(5, c, k) == pytest.approx(PASS5[c][k - 1], abs=1e-12)


def _brute_force(n: int, c: int, k: int) -> Fraction:
    """Share of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(min(s) < c for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 6, 9])
def test_pass_at_k_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(_brute_force(n, c, k)), abs=1e-12)


def test_pass_at_k_large_n_vectorized():
    n, k = 200, 50  # C(200, 50) ~ 4.5e47: the product form stays exact to float precision
    c = np.arange(n + 1)
    exact = [1 - Fraction(math.comb(n - ci, k), math.comb(n, k)) for ci in c]
    np.testing.assert_allclose(pass_at_k(n, c, k), [float(x) for x in exact], atol=1e-12)
    assert isinstance(pass_at_k(n, 3, k), float)


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="correct counts"):
        pass_at_k(4, 5, 1)


def test_majority_vote():
    correct = np.array(
        [
            [1, 0, 0, 1],  # "3" and "4" tie twice each: the first seen ("3") wins
            [0, 1, 1, 0],  # 1/2 written three ways outvotes 7
            [0, 0, 0, 0],  # no answer at all
            [0, 1, 0, 0],  # None never wins, even when most common
        ],
        dtype=bool,
    )
    answers = [
        ["3", "4", "4", "3"],
        ["7", r"\frac{1}{2}", "0.5", r"\dfrac12"],
        [None, None, None, None],
        [None, "5", None, "6"],
    ]
    np.testing.assert_array_equal(majority_correct(correct, answers), [1.0, 1.0, 0.0, 1.0])


def test_summarize():
    correct = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    answers = [["2", "2", "3", "3", "3"], ["9"] * 5, ["1"] * 5]
    out = summarize(correct, answers, ks=(1, 2, 5))
    assert out["n"] == 5 and out["problems"] == 3
    assert out["pass@1"] == pytest.approx(7 / 15, rel=1e-12)  # mean over all 15 samples
    assert out["pass@2"] == pytest.approx((PASS5[2][1] + 0 + 1) / 3, rel=1e-12)
    assert out["pass@5"] == pytest.approx(2 / 3, rel=1e-12)
    # "3" wins the first problem, and is wrong.
    assert out["maj@n"] == pytest.approx(1 / 3, rel=1e-12)
    assert set(summarize(correct)) == {"n", "problems", "pass@1", "pass@2", "pass@4", "pass@5"}
    with pytest.raises(ValueError, match="answers"):
        summarize(correct, answers[:2])
    with pytest.raises(ValueError, match="problems, n"):
        summarize(np.zeros(5, dtype=bool))


def test_default_ks():
    assert default_ks(1) == (1,)
    assert default_ks(5) == (1, 2, 4, 5)
    assert default_ks(16) == (1, 2, 4, 8, 16)


def test_table():
    results = {
        "math500": {"n": 4, "problems": 500, "pass@1": 0.5, "pass@4": 0.75, "maj@n": 0.6},
        "gsm8k": {"n": 4, "problems": 1319, "pass@1": 0.25, "pass@4": 0.5, "maj@n": 0.3},
    }
    table = benchmark_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["benchmark", "n", "pass@1", "pass@4", "maj@n"]
    assert lines[2].split() == ["math500", "4", "50.0", "75.0", "60.0"]
    assert lines[3].split() == ["gsm8k", "4", "25.0", "50.0", "30.0"]
    assert lines[4].split() == ["Average", "37.5", "62.5", "45.0"]
    assert benchmark_table({}) == "(no benchmarks)"
