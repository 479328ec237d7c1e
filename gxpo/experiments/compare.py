"""GRPO vs SFPO vs GXPO (and baselines) from the same initial model, data order and seeds.

    python -m gxpo.experiments.compare --config=configs/smollm2_arith.py --out=results/cpu_arith
    python -m gxpo.experiments.compare --config=... --out=... --methods=grpo,gxpo5 --seeds=0,1
    python -m gxpo.experiments.compare --out=results/cpu_arith --analyze_only
    python -m gxpo.experiments.compare --config=configs/smollm2_study.py --out=results/cpu_study \
        --methods=grpo,grpo_lr3x,grpo_epochs3,sfpo3,gxpo5,gxpo5_authors --seeds=0,1,2 \
        --surrogate_every=5 --commit

A method is a policy update, `<name>` or `<name><K>` (gxpo5: GXPO at virtual depth 5), then any
of the modifiers `_lr<F>x` (F times the learning rate), `_epochs<N>` (N passes over each rollout
batch) and `_authors` (the GXPO authors' recipe, `gxpo.train.defaults.authors_recipe`, evaluated
as the other methods are): grpo_lr3x, grpo_epochs3, gxpo5_authors.

Each (method, seed) trains in `<out>/runs/<method>_s<seed>`, seed-major, with the same initial
adapters, data order and sampling seed for every method of a seed. A complete run is skipped
and an interrupted one resumes from its last checkpoint, so the command can be stopped and
started again at will; `--commit` commits `<out>` after each run (checkpoints and TensorBoard
events are git-ignored under results/). Each run's `harness.jsonl` records the machine's load
at each (re)start and the process's CPU time against its elapsed time. `--surrogate_every=N`
adds the surrogate check to the GXPO methods (`gxpo.train.surrogate`; off the clock). Then
`gxpo.experiments.analysis.analyze` writes `<out>/tables.md` and `<out>/plots/*.png` from the
runs' logs (`--analyze_only`: only that).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from gxpo import cli
from gxpo.experiments.analysis import RUN_LOG, analyze, is_complete
from gxpo.train import updates
from gxpo.train.defaults import authors_recipe

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=False)
_OUT = flags.DEFINE_string("out", None, "Results directory.", required=True)
_METHODS = flags.DEFINE_list(
    "methods",
    ["grpo", "sfpo3", "gxpo3", "gxpo5"],
    "<name> or <name><K> (a policy update), then any of _lr<F>x, _epochs<N>, _authors",
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (LoRA init, data order, sampling).")
_ANALYZE_ONLY = flags.DEFINE_bool("analyze_only", False, "Only rebuild tables and plots.")
_SURROGATE_EVERY = flags.DEFINE_integer(
    "surrogate_every",
    0,
    "GXPO methods: the surrogate check every this many steps while the gate is on "
    "(config.logging.surrogate_every; diagnostic only, off the clock); 0 = off.",
)
_COMMIT = flags.DEFINE_bool(
    "commit", False, "git-commit --out after each finished run and after the analysis."
)


def method_overrides(method: str) -> dict[str, object]:
    """Config overrides of a policy update's part of a method name: a registered policy update
    `<name>`, or `<name><K>` for one with a depth field (K = its value: gxpo5 is GXPO at
    virtual_depth 5). ValueError, listing every form, for anything else."""
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
    raise ValueError(_method_error(method))


# What a method name may add after its policy update, each after an underscore (issue 14: GRPO
# given GXPO's budget in its own currency, and the GXPO authors' variant). Pattern -> (form,
# what it does); `_modify` applies them.
MODIFIERS = {
    r"lr(\d+(?:\.\d+)?)x": ("_lr<F>x", "F times optimizer.lr"),
    r"epochs(\d+)": ("_epochs<N>", "train.epochs = N: N passes over each rollout batch"),
    r"authors": ("_authors", "the GXPO authors' recipe, defaults.authors_recipe"),
}


def _method_error(method: str) -> str:
    forms = ", ".join(f"{n}<K>" if updates.get(n).depth_field else n for n in updates.names())
    mods = "; ".join(f"{form} ({what})" for form, what in MODIFIERS.values())
    return (
        f"--methods: {method!r} is not one of {forms}, each optionally followed by {mods} "
        "(e.g. gxpo5, grpo_lr3x, grpo_epochs3, gxpo5_authors)"
    )


def _split_method(method: str) -> tuple[dict[str, object], list[re.Match]]:
    """(the policy update's overrides, the modifiers' matches) of a method name; the policy
    update's name may itself hold underscores, so every split point is tried, longest first."""
    parts = method.split("_")
    for i in range(len(parts), 0, -1):
        try:
            overrides = method_overrides("_".join(parts[:i]))
        except ValueError:
            continue
        found = [next((m for p in MODIFIERS if (m := re.fullmatch(p, s))), None) for s in parts[i:]]
        if all(found) and len({m.re.pattern for m in found}) == len(found):
            return overrides, found
    raise ValueError(_method_error(method))


def check_method(method: str) -> None:
    """Raises ValueError (one line, every allowed form) unless `method` is a method name."""
    _split_method(method)


def _set(config, dotted: str, value) -> None:
    *groups, key = dotted.split(".")
    node = config
    for g in groups:
        node = node[g]
    node[key] = value


def _modify(c, match: re.Match) -> None:
    if match.re.pattern == "authors":
        evaluation = c.eval.copy_and_resolve_references()
        authors_recipe(c)
        c.eval = evaluation  # every method of a comparison is evaluated alike
    elif match.re.pattern.startswith("lr"):
        c.optimizer.lr = float(f"{c.optimizer.lr * float(match[1]):.12g}")  # 6e-4, not 6.0...01e-4
    else:
        c.train.epochs = int(match[1])


def method_config(config, method: str, seed: int, *, surrogate_every: int = 0):
    """`config` for one run of a comparison: the method's policy update, its modifiers (the
    authors' recipe first, the others on top of it), `train.seed = seed`, and for a GXPO method
    the surrogate check every `surrogate_every` steps (`logging.surrogate_every`; 0 = off)."""
    overrides, modifiers = _split_method(method)
    c = config.copy_and_resolve_references()
    for key, value in overrides.items():
        _set(c, key, value)
    for match in sorted(modifiers, key=lambda m: m.re.pattern != "authors"):
        _modify(c, match)
    c.train.seed = seed
    if c.policy_update.name == "gxpo":
        c.logging.surrogate_every = surrogate_every
    return c


def _log_run(workdir: Path, row: dict) -> None:
    """Appends `row` to the run's `harness.jsonl` with the time and the machine's load average
    (1, 5, 15 min): a reader sees whether something else ran beside the run."""
    row = dict(row, time=time.strftime("%Y-%m-%dT%H:%M:%S"), loadavg=list(os.getloadavg()))
    with (workdir / RUN_LOG).open("a") as f:
        f.write(json.dumps(row) + "\n")


def commit(out: Path, message: str) -> None:
    """`git add` and `git commit` of `out` alone (ignored files stay out: checkpoints and
    TensorBoard events under results/, see .gitignore); nothing to commit is not an error."""
    git = ["git", "-C", str(out)]
    subprocess.run([*git, "add", "--", "."], check=True)
    if subprocess.run([*git, "diff", "--cached", "--quiet", "--", "."]).returncode == 0:
        print(f"commit: nothing new in {out}", flush=True)
        return
    subprocess.run([*git, "commit", "-q", "-m", message, "--", "."], check=True)
    print(f"commit: {message}", flush=True)


def _check_git(out: Path) -> None:
    found = subprocess.run(
        ["git", "-C", str(out), "rev-parse", "--is-inside-work-tree"], capture_output=True
    )
    if found.returncode != 0:
        raise ValueError(f"--commit: --out={out} is not inside a git work tree; drop --commit")


def run_all(
    config,
    out: Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    surrogate_every: int = 0,
    commit_runs: bool = False,
) -> None:
    """Trains every (method, seed) run that is not complete, seed-major, in
    `<out>/runs/<method>_s<seed>`: a finished run is skipped, an interrupted one resumes from
    its last checkpoint (the Trainer's own resume). Each run's `harness.jsonl` records the load
    average at its (re)start and end and, at the end, the process's CPU seconds against its
    elapsed seconds; `commit_runs` commits `out` after each run (`commit`)."""
    from gxpo.train.builders import check  # heavy imports only when training
    from gxpo.train.trainer import Trainer

    for method in methods:  # every run's config is checked before the first one trains
        check(method_config(config, method, seeds[0], surrogate_every=surrogate_every))
    out.mkdir(parents=True, exist_ok=True)
    if commit_runs:
        _check_git(out)
    for seed in seeds:  # seed-major: an interrupted comparison has every method at some seeds
        for method in methods:
            workdir = out / "runs" / f"{method}_s{seed}"
            c = method_config(config, method, seed, surrogate_every=surrogate_every)
            if is_complete(workdir, c.train.steps):
                print(f"{workdir.name}: complete, skipped", flush=True)
                continue
            print(f"\n=== {workdir.name} ===", flush=True)
            workdir.mkdir(parents=True, exist_ok=True)
            _log_run(workdir, {"event": "start"})  # before the load: what ran before us
            cpu, elapsed = time.process_time(), time.perf_counter()
            trainer = Trainer(c, workdir, checked=True)
            start_step = trainer.step
            trainer.run()
            _log_run(
                workdir,
                {
                    "event": "end",
                    "step": trainer.step,
                    "from_step": start_step,
                    "wall_seconds": float(trainer.state.wall_seconds),
                    "elapsed_seconds": time.perf_counter() - elapsed,
                    "cpu_seconds": time.process_time() - cpu,  # every thread of this process
                },
            )
            if commit_runs:
                commit(out, f"study: {workdir.name} done")


def main(argv: Sequence[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    out = Path(_OUT.value)
    methods = list(_METHODS.value)
    for method in methods:
        check_method(method)  # fail on a typo before any training
    if _SURROGATE_EVERY.value < 0:
        raise ValueError(f"--surrogate_every={_SURROGATE_EVERY.value}: must be >= 0 (0 = off)")
    if not _ANALYZE_ONLY.value:
        if _CONFIG.value is None:
            raise ValueError("--config is required unless --analyze_only")
        out.mkdir(parents=True, exist_ok=True)
        command = ["python -m gxpo.experiments.compare", *sys.argv[1:]]
        (out / "command.txt").write_text(" ".join(command) + "\n")
        (out / "base_config.json").write_text(_CONFIG.value.to_json(indent=2))
        run_all(
            _CONFIG.value,
            out,
            methods,
            [int(s) for s in _SEEDS.value],
            surrogate_every=_SURROGATE_EVERY.value,
            commit_runs=_COMMIT.value,
        )
    print(analyze(out, methods))
    if _COMMIT.value:
        commit(out, f"study: {out.name} tables and plots")


if __name__ == "__main__":
    cli.run(main)
