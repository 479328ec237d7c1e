"""Learning curves of one or more runs, one line per run, as PNG files.

    python -m gxpo.train.plots WORKDIR [WORKDIR ...] [--out DIR]

Reads each run's metrics.jsonl and eval.jsonl and draws, against the step, the cumulative
backward passes and the wall-clock seconds:

- ``reward.png``: training reward per step (faint) and its trailing mean;
- ``eval_pass1.png``: eval pass@1 per benchmark and their average (at steps where every
  benchmark of the run was evaluated).

Runs are labelled by their directory name, plus ``policy_update.name`` from the run's
``config.json`` when there is one. PNGs go to ``WORKDIR/plots`` of the first run, or ``--out``.
An eval row's backward passes and wall clock are its own ``backward_passes`` / ``wall_seconds``
fields if it has them, else those of the last training step logged at or before its step.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state

from gxpo.train.logging import EVAL_FILE, METRICS_FILE, read_jsonl

X_AXES = (
    ("step", "training step"),
    ("backward_passes", "backward passes (cumulative)"),
    ("wall_seconds", "wall-clock seconds"),
)
PASS1 = "pass@1"
AVERAGE = "average"


@dataclass
class Run:
    label: str
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]]


def _label(workdir: Path) -> str:
    name = workdir.resolve().name
    try:
        policy = json.loads((workdir / "config.json").read_text())["policy_update"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return name
    return name if str(policy) in name else f"{name} ({policy})"


def load_run(workdir: str | os.PathLike) -> Run:
    workdir = Path(workdir)
    metrics, evals = (
        [r for r in read_jsonl(workdir / name) if "step" in r] for name in (METRICS_FILE, EVAL_FILE)
    )
    if not metrics and not evals:
        raise FileNotFoundError(
            f"no rows in {workdir / METRICS_FILE} or {workdir / EVAL_FILE}: pass the work "
            "directory of a gxpo training run (train.workdir)."
        )
    return Run(_label(workdir), metrics, evals)


def _trailing_mean(y: np.ndarray, window: int) -> np.ndarray:
    cumsum = np.concatenate([[0.0], np.cumsum(y)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(hi - window, 0)
    return (cumsum[hi] - cumsum[lo]) / (hi - lo)


def _series(rows: list[dict[str, Any]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    pairs.sort(key=lambda p: p[0])
    return np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)


def _eval_rows(run: Run) -> dict[str, list[dict[str, Any]]]:
    """pass@1 rows per benchmark plus their average, each with every x-axis value filled in."""
    logged = sorted(run.metrics, key=lambda r: r["step"])

    def at(step: int, axis: str) -> float:
        earlier = [r[axis] for r in logged if r["step"] <= step and axis in r]
        return earlier[-1] if earlier else 0.0

    per_benchmark: dict[str, list[dict[str, Any]]] = {}
    for row in run.evals:
        if PASS1 in row and "benchmark" in row:
            filled = {a: row[a] if a in row else at(row["step"], a) for a, _ in X_AXES}
            per_benchmark.setdefault(row["benchmark"], []).append({**filled, PASS1: row[PASS1]})
    by_step: dict[int, list[dict[str, Any]]] = {}
    for rows in per_benchmark.values():
        for row in rows:
            by_step.setdefault(row["step"], []).append(row)
    average = [
        {**rows[0], PASS1: float(np.mean([r[PASS1] for r in rows]))}
        for _, rows in sorted(by_step.items())
        if len(rows) == len(per_benchmark)
    ]
    if len(per_benchmark) > 1:
        per_benchmark[AVERAGE] = average
    return per_benchmark


def _reward_figure(runs: Sequence[Run], path: Path) -> Path:
    fig = Figure(figsize=(5 * len(X_AXES), 3.4), layout="constrained")
    axes = fig.subplots(1, len(X_AXES), squeeze=False)[0]
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for ax, (x_key, x_label) in zip(axes, X_AXES):
            x, y = _series(run.metrics, x_key, "reward_mean")
            if not len(x):
                continue
            ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
            smooth = _trailing_mean(y, max(1, len(y) // 10))
            ax.plot(x, smooth, color=color, linewidth=1.8, label=run.label)
            ax.set_xlabel(x_label)
    axes[0].set_ylabel("training reward (mean)")
    _finish(fig, axes[0])
    fig.savefig(path, dpi=110)
    return path


def _eval_figure(runs: Sequence[Run], path: Path) -> Path | None:
    evals = [_eval_rows(run) for run in runs]
    names = sorted({b for e in evals for b in e} - {AVERAGE})
    names += [AVERAGE] if any(AVERAGE in e for e in evals) else []
    if not names:
        return None
    fig = Figure(figsize=(5 * len(X_AXES), 3.0 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), len(X_AXES), squeeze=False)
    for i, (run, per_benchmark) in enumerate(zip(runs, evals)):
        for row_axes, name in zip(axes, names):
            for ax, (x_key, _) in zip(row_axes, X_AXES):
                x, y = _series(per_benchmark.get(name, []), x_key, PASS1)
                if len(x):
                    ax.plot(x, y, color=f"C{i % 10}", marker="o", markersize=3, label=run.label)
    for row_axes, name in zip(axes, names):
        row_axes[0].set_ylabel(f"{name} {PASS1}")
    for ax, (_, x_label) in zip(axes[-1], X_AXES):
        ax.set_xlabel(x_label)
    _finish(fig, axes[0][0])
    fig.savefig(path, dpi=110)
    return path


def _finish(fig: Figure, legend_ax) -> None:
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    if legend_ax.get_legend_handles_labels()[0]:
        legend_ax.legend(fontsize="small")


def plot_runs(
    workdirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None
) -> list[Path]:
    """Draws the runs' curves into ``out_dir`` (default ``workdirs[0]/plots``).

    Returns the PNG paths written; ``eval_pass1.png`` only if some run has eval rows.
    """
    if not workdirs:
        raise ValueError("plot_runs needs at least one run work directory.")
    runs = [load_run(w) for w in workdirs]
    out = Path(out_dir) if out_dir is not None else Path(workdirs[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [_reward_figure(runs, out / "reward.png"), _eval_figure(runs, out / "eval_pass1.png")]
    return [p for p in written if p is not None]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m gxpo.train.plots", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("workdirs", nargs="+", help="run work directories (train.workdir)")
    parser.add_argument("--out", default=None, help="output folder (default WORKDIR/plots)")
    args = parser.parse_args(argv)
    paths = plot_runs(args.workdirs, args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
