"""GRPO vs SFPO vs GXPO from the same initial model, data order and seeds; the paper's tables.

    python -m gxpo.experiments.compare --config=configs/smollm2_arith.py --out=results/cpu_arith
    python -m gxpo.experiments.compare --config=... --out=... --methods=grpo,gxpo5 --seeds=0,1
    python -m gxpo.experiments.compare --out=results/cpu_arith --analyze_only

Each (method, seed) trains in `<out>/runs/<method>_s<seed>` (resumed if interrupted, skipped if
complete); then `analyze` reads every run's metrics.jsonl / eval.jsonl and writes
`<out>/tables.md` and `<out>/plots/*.png`:

- Table 2 analogue: peak accuracy (mean +- std over seeds), and the steps, backward passes and
  wall-clock seconds each method needs to reach GRPO's peak, with speedups over GRPO.
- Table 1 analogue: final avg pass@1 per benchmark and method.
- Tables 3 / 4 analogues: accuracy at matched backward-pass and wall-clock budgets.
- Table 7 analogue: GXPO diagnostics per K (median retention ratio, scale mean, inactive
  fraction, cos(g_tilde, g0), the step at which the gate shut off).
- Table 8 analogue: mean / max clip fraction and KL to the reference per method.

Accuracy is the average over the configured eval benchmarks of avg pass@1 (n samples per problem
at the eval temperature); curves are averaged over seeds at each eval step.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from gxpo.tables import format_table
from gxpo.train import updates
from gxpo.train.logging import read_jsonl

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=False)
_OUT = flags.DEFINE_string("out", None, "Results directory.", required=True)
_METHODS = flags.DEFINE_list(
    "methods", ["grpo", "sfpo3", "gxpo3", "gxpo5"], "policy updates: <name> or <name><K>"
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (LoRA init, data order, sampling).")
_ANALYZE_ONLY = flags.DEFINE_bool("analyze_only", False, "Only rebuild tables and plots.")


def method_overrides(method: str) -> dict[str, object]:
    """Config overrides of a method name: a registered policy update `<name>`, or `<name><K>`
    for one with a depth field (K = its value: gxpo5 is GXPO at virtual_depth 5)."""
    for name in sorted(updates.names(), key=len, reverse=True):  # the longest name that fits
        entry, depth = updates.get(name), method[len(name) :]
        if not method.startswith(name) or bool(depth) != bool(entry.depth_field):
            continue
        if not depth:
            return {"policy_update.name": name}
        if depth.isdigit():
            return {
                "policy_update.name": name,
                f"policy_update.{name}.{entry.depth_field}": int(depth),
            }
    forms = ", ".join(f"{n}<K>" if updates.get(n).depth_field else n for n in updates.names())
    raise ValueError(f"--methods: {method!r} is not one of {forms} (e.g. gxpo5)")


def _set(config, dotted: str, value) -> None:
    *groups, key = dotted.split(".")
    node = config
    for g in groups:
        node = node[g]
    node[key] = value


def method_config(config, method: str, seed: int):
    c = config.copy_and_resolve_references()
    for key, value in method_overrides(method).items():
        _set(c, key, value)
    c.train.seed = seed
    return c


def run_all(config, out: Path, methods: Sequence[str], seeds: Sequence[int]) -> None:
    from gxpo.train.builders import check  # heavy imports only when training
    from gxpo.train.trainer import Trainer

    for method in methods:  # every run's config is checked before the first one trains
        check(method_config(config, method, seeds[0]))
    for seed in seeds:  # seed-major: an interrupted comparison has every method at some seeds
        for method in methods:
            workdir = out / "runs" / f"{method}_s{seed}"
            c = method_config(config, method, seed)
            done = [r for r in read_jsonl(workdir / "eval.jsonl") if r["step"] == c.train.steps]
            if done:
                print(f"{workdir.name}: complete, skipped", flush=True)
                continue
            print(f"\n=== {workdir.name} ===", flush=True)
            Trainer(c, workdir, checked=True).run()


# ---------------------------------------------------------------------------------------------
# Analysis.


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


def _load(out: Path) -> dict[str, dict[int, Path]]:
    runs: dict[str, dict[int, Path]] = {}
    for run in sorted((out / "runs").glob("*_s*")):
        method, seed = run.name.rsplit("_s", 1)
        if (run / "eval.jsonl").exists():
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


def _budget_table(methods, curves, means, key: str, label: str) -> str:
    base = means.get("grpo", next(iter(means.values())))
    total = float(base[key][-1])
    budgets = [total * f for f in (0.25, 0.5, 0.75, 1.0)]
    rows = []
    for method in methods:
        row = {"method": method}
        for b in budgets:
            accs = []
            for c in curves[method]:
                within = np.flatnonzero(c[key] <= b + 1e-9)
                if within.size:
                    accs.append(c["accuracy"][within[-1]])
            row[f"{label} <= {b:.0f}"] = _pm(accs) if len(accs) == len(curves[method]) else "-"
        rows.append(row)
    return format_table(rows, list(rows[0]))


def _metrics(run: Path) -> list[dict]:
    return read_jsonl(run / "metrics.jsonl")


def _table8(methods, runs) -> str:
    rows = []
    for method in methods:
        ms = [m for run in runs[method].values() for m in _metrics(run)]
        row = {"method": method}
        for key, label in [("clip_frac", "clip frac"), ("kl_ref", "KL to ref")]:
            values = np.array([m[key] for m in ms if key in m])
            row[f"mean {label}"] = f"{values.mean():.2e}" if values.size else "-"
            row[f"max {label}"] = f"{values.max():.2e}" if values.size else "-"
        rows.append(row)
    return format_table(rows, list(rows[0]))


def _table7(methods, runs) -> str:
    rows = []
    for method in methods:
        if not method.startswith("gxpo"):
            continue
        ms = [(run, _metrics(run)) for run in runs[method].values()]
        active = [m for _, rows_ in ms for m in rows_ if m.get("gxpo/active") == 1]
        shutoffs = []
        for _, rows_ in ms:
            off = [m["step"] for m in rows_ if m.get("gxpo/active") == 0]
            shutoffs.append(str(off[0]) if off else "never")

        def med(key, active=active):
            values = [m[key] for m in active if key in m]
            return f"{np.median(values):.3f}" if values else "-"

        rows.append(
            {
                "K": method[4:],
                "median retention r": med("gxpo/retention_mean"),
                "scale mean": med("gxpo/scale_mean"),
                "inactive fraction": med("gxpo/inactive_fraction"),
                "cos(g_tilde, g0)": med("gxpo/cos_corrective_initial"),
                "gate shut off at step (per seed)": ", ".join(shutoffs),
            }
        )
    return format_table(rows, list(rows[0])) if rows else "(no GXPO runs)"


def _plot(methods, curves, means, out: Path) -> Path:
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


def analyze(out: str | Path, methods: Sequence[str] | None = None) -> str:
    """Builds every table and the plot from `<out>/runs`; returns the tables as Markdown."""
    out = Path(out)
    runs = _load(out)
    if not runs:
        raise FileNotFoundError(f"{out}/runs holds no run with an eval.jsonl")
    methods = [m for m in (methods or runs) if m in runs]
    curves = {m: [_curve(r) for _, r in sorted(runs[m].items())] for m in methods}
    means = {m: _mean_curve(curves[m]) for m in methods}
    plot = _plot(methods, curves, means, out)
    sections = [
        ("Peak accuracy and cost to reach GRPO's peak (cf. the paper's Table 2)", _table2),
        ("Final avg pass@1 (cf. Table 1)", None),
        ("Accuracy at matched backward-pass budgets (cf. Table 3)", "backward_passes"),
        ("Accuracy at matched wall-clock budgets (cf. Table 4)", "wall_seconds"),
        ("GXPO diagnostics over active steps (cf. Table 7)", None),
        ("Clip fraction and KL to the reference (cf. Table 8)", None),
    ]
    bodies = [
        _table2(methods, curves, means),
        _table1(methods, runs),
        _budget_table(methods, curves, means, "backward_passes", "passes"),
        _budget_table(methods, curves, means, "wall_seconds", "seconds"),
        _table7(methods, runs),
        _table8(methods, runs),
    ]
    seeds = sorted({s for m in methods for s in runs[m]})
    text = f"Runs: {', '.join(methods)}; seeds {seeds}. Plot: {plot.relative_to(out)}\n"
    for (title, _), body in zip(sections, bodies):
        text += f"\n### {title}\n\n```\n{body}\n```\n"
    (out / "tables.md").write_text(text)
    return text


def main(argv: Sequence[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    out = Path(_OUT.value)
    methods = list(_METHODS.value)
    for method in methods:
        method_overrides(method)  # fail on a typo before any training
    if not _ANALYZE_ONLY.value:
        if _CONFIG.value is None:
            sys.exit("--config is required unless --analyze_only")
        out.mkdir(parents=True, exist_ok=True)
        command = ["python -m gxpo.experiments.compare", *sys.argv[1:]]
        (out / "command.txt").write_text(" ".join(command) + "\n")
        (out / "base_config.json").write_text(_CONFIG.value.to_json(indent=2))
        run_all(_CONFIG.value, out, methods, [int(s) for s in _SEEDS.value])
    print(analyze(out, methods))


if __name__ == "__main__":
    app.run(main)
