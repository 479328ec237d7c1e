"""Evaluation metrics over n sampled responses per problem: avg pass@1, pass@k, maj@n.

Shapes: the key in ``gxpo.models.config`` (Q problems of a benchmark, G samples per problem).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from gxpo.rl.answers import canonical_answer
from gxpo.tables import format_table


def pass_at_k(n: int, c: int | np.ndarray, k: int) -> float | np.ndarray:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n - c, k) / C(n, k).

    ``c`` correct out of ``n`` samples; scalar or array. The ratio of binomials is taken as
    the product prod_{i=n-c+1..n} (1 - k / i), which neither overflows nor cancels.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    c_arr = np.asarray(c)
    if np.any(c_arr < 0) or np.any(c_arr > n):
        raise ValueError(f"correct counts must lie in [0, n={n}], got {c}")
    # fail[c] = C(n - c, k) / C(n, k): all k draws miss the c correct samples.
    fail = np.ones(n + 1)
    fail[1:] = np.cumprod(1.0 - k / np.arange(n, 0, -1, dtype=np.float64))
    fail[n - k + 1 :] = 0.0  # fewer than k wrong samples: a correct one is always drawn
    result = 1.0 - fail[c_arr]
    return float(result) if result.ndim == 0 else result


def majority_correct(
    correct_QxG: np.ndarray, answers: Sequence[Sequence[str | None]]
) -> np.ndarray:
    """Per problem, the correctness of the most frequent answer (maj@n), float [Q].

    Answers are compared by ``answers.canonical_answer``; None (no answer) never wins; ties
    go to the answer seen first. A problem with no answer at all scores 0.
    """
    majority_Q = np.zeros(len(answers))
    for q, row in enumerate(answers):
        counts: dict[str, int] = {}
        first: dict[str, int] = {}
        for j, answer in enumerate(row):
            key = canonical_answer(answer)
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
                first.setdefault(key, j)
        if counts:
            # max() keeps the first of equal items; dicts iterate in first-seen order.
            winner = max(counts, key=counts.__getitem__)
            majority_Q[q] = float(correct_QxG[q, first[winner]])
    return majority_Q


def default_ks(n: int) -> tuple[int, ...]:
    """1, powers of two below n, and n."""
    return tuple(sorted({k for k in (2**i for i in range(n.bit_length())) if k <= n} | {n}))


def summarize(
    correct_QxG: np.ndarray,
    answers: Sequence[Sequence[str | None]] | None = None,
    ks: Sequence[int] | None = None,
) -> dict[str, float]:
    """One benchmark's metrics, fractions in [0, 1].

    Keys: ``n``, ``problems``, ``pass@1`` (mean correctness over all samples, i.e. avg
    pass@1), ``pass@k`` for each k in ``ks`` (default ``default_ks(n)``), and ``maj@n`` when
    ``answers`` (the extracted answers, [Q][G]) are given.
    """
    correct_QxG = np.asarray(correct_QxG, dtype=bool)
    if correct_QxG.ndim != 2 or correct_QxG.shape[1] < 1:
        raise ValueError(f"correct must be [problems, n] with n >= 1, got {correct_QxG.shape}")
    num_problems, n = correct_QxG.shape
    if answers is not None and [len(a) for a in answers] != [n] * num_problems:
        raise ValueError(f"answers must be [problems={num_problems}][n={n}] like correct")
    c_Q = correct_QxG.sum(axis=1)
    out: dict[str, float] = {"n": n, "problems": num_problems}
    out["pass@1"] = float(correct_QxG.mean())
    for k in ks or default_ks(n):
        if k != 1:
            out[f"pass@{k}"] = float(np.mean(pass_at_k(n, c_Q, k)))
    if answers is not None:
        out["maj@n"] = float(majority_correct(correct_QxG, answers).mean())
    return out


def _metric_order(name: str) -> tuple[int, int]:
    if name.startswith("pass@"):
        return 0, int(name[5:])
    return 1, 0


def benchmark_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Per-benchmark rows of percentages plus an unweighted "Average" row (cf. Table 1)."""
    if not results:
        return "(no benchmarks)"
    metrics = sorted(
        {m for r in results.values() for m in r if m.startswith(("pass@", "maj@"))},
        key=_metric_order,
    )
    rows = [
        {"benchmark": name, "n": int(r["n"]) if "n" in r else "", **_percent(r, metrics)}
        for name, r in results.items()
    ]
    average = {
        m: float(np.mean([r[m] for r in results.values()]))
        for m in metrics
        if all(m in r for r in results.values())
    }
    rows.append({"benchmark": "Average", "n": "", **_percent(average, metrics)})
    return format_table(rows, ["benchmark", "n", *metrics], float_format=".1f")


def _percent(values: Mapping[str, float], metrics: Sequence[str]) -> dict[str, float]:
    return {m: 100 * float(values[m]) for m in metrics if m in values}
