"""A comparison's tables and plots, from its runs' logs alone (`<out>/runs/<method>_s<seed>/`:
metrics.jsonl, eval.jsonl, config.json, harness.jsonl); `analyze` writes `<out>/tables.md` and
`<out>/plots/*.png`.

Accuracy is the average over the configured eval benchmarks of avg pass@1 (n samples per problem
at the eval temperature). Seed-mean curves average the seeds at each eval step; paired
differences compare two methods seed by seed (same initial adapters, data order and sampling
seed), with a percentile bootstrap over seeds for the 95% interval of their mean.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gxpo.tables import format_table
from gxpo.train.logging import read_jsonl

RUN_LOG = "harness.jsonl"  # per run: one row at each (re)start and one at the end
BOOTSTRAP_SAMPLES = 10_000
# Surrogate errors (gxpo.train.surrogate.prediction_errors) in the Table 6 analogue's columns.
SURROGATE_COLUMNS = [
    ("abs_err", "median |pred - real|"),
    ("abs_move", "median |real - theta0|"),
    ("rel_err", "rel. error"),
    ("rel_err_two_step", "rel. error, two steps only"),
    ("cos_err", "1 - cos"),
]


def _curve(run: Path) -> dict[str, np.ndarray]:
    """Eval curve of one run: step, backward passes, wall seconds, accuracy (mean pass@1 over
    benchmarks), one entry per evaluation."""
    by_step: dict[int, list[dict]] = {}
    for row in read_jsonl(run / "eval.jsonl"):
        by_step.setdefault(row["step"], []).append(row)
    steps = sorted(by_step)
    return {
        "step": np.array(steps),
        "backward_passes": np.array([by_step[s][0]["backward_passes"] for s in steps]),
        "wall_seconds": np.array([by_step[s][0]["wall_seconds"] for s in steps]),
        "accuracy": np.array([np.mean([r["pass@1"] for r in by_step[s]]) for s in steps]),
    }


def is_complete(workdir: Path, steps: int) -> bool:
    """Whether the run in `workdir` reached `steps`: the harness logged its end there, or (a
    run without that log) it was evaluated at that step."""
    ends = [r for r in read_jsonl(workdir / RUN_LOG) if r.get("event") == "end"]
    if any(r.get("step") == steps for r in ends):
        return True
    return any(r.get("step") == steps for r in read_jsonl(workdir / "eval.jsonl"))


def load_runs(out: Path) -> dict[str, dict[int, Path]]:
    """method -> seed -> run directory, for every finished run (`is_complete` at its config's
    `train.steps`): a run still under way would cut its method's seed-mean curve short."""
    runs: dict[str, dict[int, Path]] = {}
    for run in sorted((out / "runs").glob("*_s*")):
        method, seed = run.name.rsplit("_s", 1)
        steps = _config(run).get("train", {}).get("steps")
        if seed.isdigit() and steps is not None and is_complete(run, steps):
            runs.setdefault(method, {})[int(seed)] = run
    return runs


def _mean_curve(curves: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Seed-averaged curve over the eval steps every seed has reached."""
    n = min(len(c["step"]) for c in curves)
    stacked = {k: np.stack([c[k][:n] for c in curves]) for k in curves[0]}
    mean = {k: v.mean(0) for k, v in stacked.items()}
    mean["accuracy_std"] = stacked["accuracy"].std(0)
    return mean


def _pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    v = np.asarray(values, float) * scale
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}"


def _first_reach(curve: dict[str, np.ndarray], target: float) -> int | None:
    hits = np.flatnonzero(curve["accuracy"] >= target - 1e-12)
    return int(hits[0]) if hits.size else None


def _metrics(run: Path) -> list[dict]:
    return read_jsonl(run / "metrics.jsonl")


def _config(run: Path) -> dict:
    path = run / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _update_name(run: Path, method: str) -> str:
    """The run's policy update (its config's, else the method name's letters)."""
    name = _config(run).get("policy_update", {}).get("name")
    return name or method.rstrip("0123456789").split("_")[0]


# ---------------------------------------------------------------------------------------------
# Accuracy against cost.


def _table2(methods, curves, means) -> str:
    base = means.get("grpo")
    target = float(base["accuracy"].max()) if base is not None else None
    rows = []
    for method in methods:
        peaks = [c["accuracy"].max() for c in curves[method]]
        row = {"method": method, "peak acc (%)": _pm(peaks), "seeds": len(peaks)}
        if target is not None:
            i = _first_reach(means[method], target)
            j = _first_reach(base, target)
            for key, label in [
                ("step", "steps"),
                ("backward_passes", "backward passes"),
                ("wall_seconds", "wall s"),
            ]:
                mine = None if i is None else float(means[method][key][i])
                row[f"{label} to GRPO peak"] = "not reached" if mine is None else f"{mine:.0f}"
                grpo_value = float(base[key][j])
                row[f"{label} speedup"] = (
                    "-" if mine is None or mine == 0 else f"{grpo_value / mine:.2f}x"
                )
        rows.append(row)
    header = f"GRPO's peak (seed-mean curve): {100 * target:.1f}%\n\n" if target else ""
    return header + format_table(rows, list(rows[0]))


def _table1(methods, runs) -> str:
    rows = []
    benchmarks: list[str] = []
    for method in methods:
        finals: dict[str, list[float]] = {}
        for run in runs[method].values():
            eval_rows = read_jsonl(run / "eval.jsonl")
            last = max(r["step"] for r in eval_rows)
            for r in eval_rows:
                if r["step"] == last:
                    finals.setdefault(r["benchmark"], []).append(r["pass@1"])
        benchmarks = benchmarks or sorted(finals)
        row = {"method": method}
        row.update({b: _pm(finals[b]) for b in benchmarks})
        if len(benchmarks) > 1:
            row["average"] = _pm(np.mean([finals[b] for b in benchmarks], axis=0))
        rows.append(row)
    return format_table(rows, list(rows[0]))


def _at_budget(curve: dict[str, np.ndarray], key: str, budget: float) -> float | None:
    """Accuracy at the last evaluation within `budget` of `key` (None: none is)."""
    within = np.flatnonzero(curve[key] <= budget + 1e-9)
    return float(curve["accuracy"][within[-1]]) if within.size else None


def _budget_table(methods, curves, means, key: str, label: str) -> str:
    base = means.get("grpo", next(iter(means.values())))
    total = float(base[key][-1])
    budgets = [total * f for f in (0.25, 0.5, 0.75, 1.0)]
    rows = []
    for method in methods:
        row = {"method": method}
        for b in budgets:
            accs = [a for c in curves[method] if (a := _at_budget(c, key, b)) is not None]
            row[f"{label} <= {b:.0f}"] = _pm(accs) if len(accs) == len(curves[method]) else "-"
        rows.append(row)
    return format_table(rows, list(rows[0]))


# ---------------------------------------------------------------------------------------------
# Paired per-seed differences.


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile bootstrap interval of the mean
    (resampling the values with replacement). With 3 seeds there are 10 distinct resamples: the
    interval is coarse, close to the range of the values."""
    v = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(samples, len(v)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(low), float(high)


def _paired_cell(diffs: list[float]) -> str:
    if not diffs:
        return "-"
    mean, low, high = bootstrap_interval(diffs)
    per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] ({per_seed})"


def _paired_table(methods, runs, curves_by_seed, reference: str) -> tuple[str, str] | str:
    """Each method minus `reference`, seed by seed, in accuracy points: at the final evaluation
    and at the reference's whole backward-pass and wall-clock budgets (and half of them), the
    method's accuracy being its last evaluation within the budget."""
    ref = curves_by_seed[reference]
    rows = []
    for method in methods:
        if method == reference:
            continue
        seeds = sorted(set(runs[method]) & set(ref))
        row = {"method": method, "seeds": len(seeds)}
        mine = curves_by_seed[method]
        row["final eval"] = _paired_cell(
            [100 * (mine[s]["accuracy"][-1] - ref[s]["accuracy"][-1]) for s in seeds]
        )
        for key, label in [("backward_passes", "passes"), ("wall_seconds", "wall s")]:
            for fraction in (0.5, 1.0):
                diffs = []
                for s in seeds:
                    budget = fraction * float(ref[s][key][-1])
                    a, b = _at_budget(mine[s], key, budget), _at_budget(ref[s], key, budget)
                    if a is not None and b is not None:
                        diffs.append(100 * (a - b))
                name = f"{label} <= {'ref' if fraction == 1 else 'ref/2'}"
                row[name] = _paired_cell(diffs) if len(diffs) == len(seeds) else "-"
        rows.append(row)
    if not rows:
        return "(no other method)"
    budgets = ", ".join(
        f"seed {s}: {ref[s]['backward_passes'][-1]:.0f} passes, {ref[s]['wall_seconds'][-1]:.0f} s"
        for s in sorted(ref)
    )
    note = (
        f"Accuracy points, {reference} = 0: mean [95% bootstrap interval over seeds] (per seed). "
        f"The budgets are {reference}'s own per seed ({budgets})."
    )
    return note, format_table(rows, list(rows[0]))


# ---------------------------------------------------------------------------------------------
# Training diagnostics.


def _table8(methods, runs) -> tuple[str, str]:
    rows = []
    for method in methods:
        ms = [m for run in runs[method].values() for m in _metrics(run)]
        no_kl = all(
            _config(run).get("loss", {}).get("kl_coef", 1.0) == 0 for run in runs[method].values()
        )
        row = {"method": method}
        for key, label in [("clip_frac", "clip frac"), ("kl_ref", "KL to ref")]:
            values = np.array([m[key] for m in ms if key in m])
            if key == "kl_ref" and no_kl:  # no reference log-probs: the value means nothing
                values = np.array([])
            row[f"mean {label}"] = f"{values.mean():.2e}" if values.size else "-"
            row[f"max {label}"] = f"{values.max():.2e}" if values.size else "-"
        rows.append(row)
    note = "KL to ref is '-' for a method trained without a KL term (kl_coef = 0)."
    return note, format_table(rows, list(rows[0]))


def shutoff_step(rows: list[dict], name: str) -> int | None:
    """The first step whose updates were all plain for good (`<name>/active` 0 from there to
    the run's end, a step with some active mini-batches counting as active), or None: the
    gate never shut extrapolation off. A lone plain step inside the active phase (a degenerate
    first gradient) is not a shutoff."""
    key = f"{name}/active"
    steps = [(m["step"], m[key]) for m in rows if key in m]
    if not steps or steps[-1][1] > 0:
        return None
    first = None
    for step, active in reversed(steps):
        if active > 0:
            break
        first = step
    return first


def _phase_table(methods, runs) -> tuple[str, str] | str:
    """Per gated method: the gate's shutoff step per seed, then the diagnostics and the
    training signals averaged over its active phase and over the steps after shutoff."""
    rows = []
    for method in methods:
        name = _update_name(next(iter(runs[method].values())), method)
        if name not in ("gxpo", "sfpo"):
            continue
        offs, peaks, phases = [], [], {"active": [], "after shutoff": []}
        for run in runs[method].values():
            ms = _metrics(run)
            off = shutoff_step(ms, name)
            offs.append("never" if off is None else str(off))
            zs = [m[f"{name}/gate_z"] for m in ms if f"{name}/gate_z" in m]
            peaks.append(f"{max(zs):.2f}" if zs else "-")
            for m in ms:
                after = off is not None and m["step"] >= off
                phases["after shutoff" if after else "active"].append(m)
        for phase, ms in phases.items():
            if not ms:
                continue
            seconds = [
                m["rollout_seconds"] + m["update_seconds"] for m in ms if "update_seconds" in m
            ]

            def med(key, ms=ms):
                values = [m[key] for m in ms if key in m]
                return f"{np.median(values):.3g}" if values else "-"

            rows.append(
                {
                    "method": method,
                    "phase": phase,
                    "steps": len(ms),
                    "train acc": med("accuracy"),
                    "s/step": f"{np.median(seconds):.1f}" if seconds else "-",
                    "passes/step": med("grad_evals"),
                    "retention r": med(f"{name}/retention_mean") if phase == "active" else "-",
                    "scale mean": med(f"{name}/scale_mean") if phase == "active" else "-",
                    "inactive frac": med(f"{name}/inactive_fraction") if phase == "active" else "-",
                    "cos(g~, g0)": med(f"{name}/cos_corrective_initial")
                    if phase == "active"
                    else "-",
                    "||g~||": med(f"{name}/corrective_norm") if phase == "active" else "-",
                    "||g0||": med("grad_norm"),
                    "clip frac": med("clip_frac"),
                    "entropy": med("entropy"),
                    "gate shutoff (per seed)": ", ".join(offs),
                    "max gate z (per seed)": ", ".join(peaks),
                }
            )
    if not rows:
        return "(no gated method)"
    note = (
        "Medians over the steps of each phase, all seeds pooled. Shutoff: the first step that "
        "was plain for good (the gate fired on the step before); max gate z: the largest z-score "
        "the gate saw in the run, against its threshold (and patience) in the run's config. "
        "grad_evals counts one mini-batch's gradients (the authors' variant runs 4 "
        "mini-batches a step)."
    )
    return note, format_table(rows, list(rows[0]))


def _surrogate_depths(checks: list[dict]) -> list[int]:
    """The K of the surrogate check's `surrogate/K<K>/<error>` metrics."""
    found = {k.split("/")[1] for m in checks for k in m if k.startswith("surrogate/K")}
    return sorted(int(k[1:]) for k in found if k[1:].isdigit())


def _surrogate_table(methods, runs) -> tuple[str, str] | None:
    """The Table 6 analogue: medians over every checked step (all seeds) of each K's errors."""
    rows = []
    for method in methods:
        checks = [
            m for run in runs[method].values() for m in _metrics(run) if "surrogate/seconds" in m
        ]
        if not checks:
            continue
        depths = _surrogate_depths(checks)
        for k in depths:
            row = {"method": method, "K": k, "checks": len(checks)}
            for key, label in SURROGATE_COLUMNS:
                name = f"surrogate/K{k}/{key}"
                values = [m[name] for m in checks if name in m]
                row[label] = f"{np.median(values):.3g}" if values else "-"
            rows.append(row)
    if not rows:
        return None
    note = (
        "GXPO's predicted K-step point against K real inner steps from the same params, state "
        "and batch (gxpo.train.surrogate; diagnostic only, not counted in the budgets). Medians "
        "over the checked steps: the median over coordinates of |pred - real| beside that of the "
        "real move |real - theta0|; ||pred - real|| / ||real - theta0|| for GXPO and for "
        "stopping at its two real steps; 1 - cos of the predicted and real displacements."
    )
    return note, format_table(rows, list(rows[0]))


def _runs_table(methods, runs) -> tuple[str, str]:
    """Per run: its clock and what ran beside it (harness.jsonl)."""
    rows = []
    for method in methods:
        for _, run in sorted(runs[method].items()):
            ms = _metrics(run)
            log = read_jsonl(run / "harness.jsonl")
            starts = [r["loadavg"][0] for r in log if r.get("event") == "start"]
            ends = [r for r in log if r.get("event") == "end"]
            cpu = sum(r["cpu_seconds"] for r in ends)
            elapsed = sum(r["elapsed_seconds"] for r in ends)
            surrogate = sum(m.get("surrogate/seconds", 0.0) for m in ms)
            last = ms[-1] if ms else {"step": 0}
            wall = last.get("wall_seconds")
            rows.append(
                {
                    "run": run.name,
                    "steps": last["step"],
                    "wall s (training)": "-" if wall is None else f"{wall:.0f}",
                    "s/step": "-" if wall is None else f"{wall / last['step']:.1f}",
                    "surrogate s (off clock)": f"{surrogate:.0f}" if surrogate else "-",
                    "starts": len(starts),
                    "load at start (1 min)": ", ".join(f"{x:.1f}" for x in starts) or "-",
                    "CPU s / elapsed s": f"{cpu / elapsed:.2f}" if elapsed else "-",
                }
            )
    note = (
        "wall s: the trainer's clock (rollout + update; evaluations, loading and the surrogate "
        "check excluded). load at start: the machine's 1-minute load average at each (re)start, "
        "which includes the run before it; CPU s / elapsed s: this process's CPU time over its "
        "elapsed time (2 cores: about 2 when it has the machine to itself, less when something "
        "else competes)."
    )
    return note, format_table(rows, list(rows[0]))


# ---------------------------------------------------------------------------------------------
# Plots.


def _plot(methods, means, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, key, label in zip(
        axes,
        ("step", "backward_passes", "wall_seconds"),
        ("training step", "backward passes", "wall-clock seconds"),
    ):
        for method in methods:
            m = means[method]
            acc, std = 100 * m["accuracy"], 100 * m["accuracy_std"]
            (line,) = ax.plot(m[key], acc, marker="o", ms=3, label=method)
            ax.fill_between(m[key], acc - std, acc + std, color=line.get_color(), alpha=0.15)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy, avg pass@1 (%)")
    axes[0].legend()
    fig.suptitle("Mean over seeds, band = ±1 std")
    fig.tight_layout()
    path = out / "plots" / "accuracy.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_surrogate(methods, runs, out: Path) -> Path | None:
    """Relative error and 1 - cos of the predicted K-step point against K, median and
    interquartile range over the checked steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for method in methods:
        checks = [m for r in runs[method].values() for m in _metrics(r) if "surrogate/seconds" in m]
        depths = _surrogate_depths(checks)
        for ax, key in zip(axes, ("rel_err", "cos_err")):
            values = [[m[n] for m in checks if (n := f"surrogate/K{k}/{key}") in m] for k in depths]
            ks = [k for k, v in zip(depths, values) if v]
            stats = [np.percentile(v, [25, 50, 75]) for v in values if v]
            if not stats:
                continue
            q = np.array(stats)
            ax.errorbar(ks, q[:, 1], yerr=[q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]], marker="o",
                        capsize=3, label=method)  # fmt: skip
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_ylabel("||pred - real|| / ||real - theta0||")
    axes[1].set_ylabel("1 - cos(pred - theta0, real - theta0)")
    for ax in axes:
        ax.set_xlabel("K (inner steps predicted)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("GXPO's predicted K-step point against K real steps (median, IQR)")
    fig.tight_layout()
    path = out / "plots" / "surrogate.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------


def analyze(out: str | Path, methods: Sequence[str] | None = None) -> str:
    """Builds every table and plot from `<out>/runs`; returns the tables as Markdown.

    - Peak accuracy, and the steps, backward passes and wall-clock seconds each method needs to
      reach GRPO's peak (the paper's Table 2); final avg pass@1 per benchmark (Table 1).
    - Accuracy at matched backward-pass and wall-clock budgets (Tables 3 / 4).
    - Paired per-seed differences against `grpo`, `grpo_lr3x` and `grpo_epochs3` (each when run:
      the config's step, a bigger step, the same backward passes as GXPO), with 95% bootstrap
      intervals, at the final evaluation and at matched budgets.
    - The gate's shutoff step per seed, and the diagnostics over GXPO's (SFPO's) active phase
      and after shutoff (Table 7); clip fraction and KL to the reference (Table 8).
    - The surrogate check (Table 6), when the runs logged it.
    - Each run's clock and the machine's load beside it.
    """
    out = Path(out)
    runs = load_runs(out)
    if not runs:
        raise FileNotFoundError(f"{out}/runs holds no run with an eval.jsonl")
    methods = [m for m in (methods or runs) if m in runs]
    curves_by_seed = {m: {s: _curve(r) for s, r in sorted(runs[m].items())} for m in methods}
    curves = {m: list(curves_by_seed[m].values()) for m in methods}
    means = {m: _mean_curve(curves[m]) for m in methods}
    plots = [_plot(methods, means, out), _plot_surrogate(methods, runs, out)]
    sections = [
        ("Peak accuracy and cost to reach GRPO's peak (cf. the paper's Table 2)",
         _table2(methods, curves, means)),
        ("Final avg pass@1 (cf. Table 1)", _table1(methods, runs)),
        ("Accuracy at matched backward-pass budgets (cf. Table 3)",
         _budget_table(methods, curves, means, "backward_passes", "passes")),
        ("Accuracy at matched wall-clock budgets (cf. Table 4)",
         _budget_table(methods, curves, means, "wall_seconds", "seconds")),
    ]  # fmt: skip
    for reference in ("grpo", "grpo_lr3x", "grpo_epochs3"):
        if reference in methods:
            sections.append(
                (
                    f"Paired differences against {reference}",
                    _paired_table(methods, runs, curves_by_seed, reference),
                )
            )
    sections += [
        ("Gate shutoff and diagnostics by phase (cf. Table 7)", _phase_table(methods, runs)),
        ("Clip fraction and KL to the reference (cf. Table 8)", _table8(methods, runs)),
    ]
    surrogate = _surrogate_table(methods, runs)
    if surrogate is not None:
        sections.append(("The surrogate on the real model (cf. Table 6)", surrogate))
    sections.append(("Runs: clock and load", _runs_table(methods, runs)))
    seeds = sorted({s for m in methods for s in runs[m]})
    drawn = ", ".join(str(p.relative_to(out)) for p in plots if p is not None)
    text = f"Runs: {', '.join(methods)}; seeds {seeds}. Plots: {drawn}\n"
    for title, body in sections:
        note, table = body if isinstance(body, tuple) else ("", body)
        text += f"\n### {title}\n\n" + (f"{note}\n\n" if note else "") + f"```\n{table}\n```\n"
    (out / "tables.md").write_text(text)
    return text
