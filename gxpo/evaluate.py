"""Evaluates a run's checkpoint, or a model with no training, on a config's benchmarks.

    python -m gxpo.evaluate --workdir=runs/NAME [--step=N] [--out=DIR] [--config.<field>=...]
    python -m gxpo.evaluate --config=configs/X.py [--config.model.path=...] [--out=DIR]

With --workdir, the policy is the run's checkpoint --step (default: the latest) on the run's
own config (`<workdir>/config.json`); `--config.<field>=value` flags override that config, e.g.
`--config.data.eval=math500,gsm8k --config.eval.n_samples=8 --config.eval.max_problems=100`.
The run's directory is only read (the run may still be training); the results go to --out,
default `<workdir>/evaluations/step_<N>/`, never to the run's own eval.jsonl.

With --config, the policy is the config's initial model (`model.path`, or a random init),
evaluated as a run's step-0 evaluation; --out defaults to `runs/<config name>_eval/`.

Prints the table of avg pass@1 / pass@k / maj@n per benchmark and writes the same numbers to
`<out>/eval.jsonl` (rows of an earlier evaluation of the same step there are replaced). The
evaluation is the Trainer's own (`Trainer.evaluate`): the same prompts, sampling, seeds and
scoring as a run's evaluations. A user's error is one line and exit status 2; --verbose shows
its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from gxpo import cli
from gxpo.rl.evaluate import benchmark_table
from gxpo.train import run_state
from gxpo.train.builders import check
from gxpo.train.logging import EVAL_FILE, METRICS_FILE, read_jsonl
from gxpo.train.trainer import Trainer

# --workdir alone: the run's config, read by this config file (`run_state.get_config`), is
# the --config value, so that --config.<field> overrides apply to it (`_with_run_config`).
RUN_CONFIG_FILE = str(Path(run_state.__file__).resolve())


def _define_flags() -> None:
    """The command's flags; defined only when it runs, so that importing `evaluate` (tests,
    notebooks, `gxpo.export` in the same process) defines none."""
    config_flags.DEFINE_config_file(
        "config", None, "A config file (evaluates its initial model).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "A run's work directory (evaluates a checkpoint).")
    flags.DEFINE_integer("step", None, "The run's checkpoint step (default: the latest).")
    flags.DEFINE_string(
        "out",
        None,
        "Output directory (default: <workdir>/evaluations/step_<N>/, or runs/<config name>_eval/).",
    )


def _with_run_config(argv: list[str]) -> list[str]:
    """`argv` with `--config=<run_state.py>:<workdir>` first when it has --workdir and no
    --config, so config_flags reads the run's config and applies --config.<field> to it."""
    workdir, has_config = None, False
    for i, arg in enumerate(argv[1:], start=1):
        name, eq, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-"):
            continue
        if name == "config":
            has_config = True
        elif name == "workdir":
            workdir = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    if workdir is None or has_config:
        return argv
    return [argv[0], f"--config={RUN_CONFIG_FILE}:{workdir}", *argv[1:]]


def _check_out(out: Path, run: Path | None) -> None:
    """An evaluation's output directory must not be a training run's: its logger would drop
    that run's metrics and evaluations."""
    if run is not None and out.resolve() == run.resolve():
        raise ValueError(f"--out={out} is the run's own work directory; pick another")
    if (out / "checkpoints").exists() or read_jsonl(out / METRICS_FILE):
        raise ValueError(
            f"--out={out} holds a training run (checkpoints/ or metrics.jsonl); "
            "pick another directory"
        )


def evaluate(
    config: ml_collections.ConfigDict,
    out: str | Path,
    *,
    run: str | Path | None = None,
    step: int | None = None,
) -> tuple[dict[str, dict[str, float]], int]:
    """Evaluates on `config`'s benchmarks (`data.eval`, `eval.*`) the checkpoint `step`
    (default: the latest) of the run in work directory `run`, or with `run=None` the config's
    initial model; writes `out`/eval.jsonl. Returns (results per benchmark, the step)."""
    out = Path(out)
    run = None if run is None else Path(run)
    if run is not None:
        run_state.checkpoint_step(run, step)  # a missing run or step fails first
    elif step is not None:
        raise ValueError("--step needs --workdir: a config alone has no checkpoints")
    _check_out(out, run)
    check(config)
    if not config.data.eval:
        raise ValueError(
            "config.data.eval is empty: nothing to evaluate; name benchmarks with "
            "--config.data.eval=NAME[,NAME...]"
        )
    config = ml_collections.ConfigDict(config.to_dict())  # the caller's stays as it is
    config.train.quiet = True  # this module prints the table
    trainer = Trainer.for_evaluation(config, out, run=run, step=step)
    try:
        return trainer.evaluate(), trainer.step
    finally:
        trainer.close()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; flags only (--helpshort)")
    f = flags.FLAGS
    workdir, step = f.workdir, f.step
    config_flag = f["config"]
    config_file = config_flags.get_config_filename(config_flag) if config_flag.present else None
    if workdir is None and config_file is None:
        raise cli.UserError("give --workdir=runs/NAME (a run's checkpoint) or --config=FILE")
    if workdir is not None and config_file != f"{RUN_CONFIG_FILE}:{workdir}":
        raise cli.UserError(
            "give --workdir (a run, on its own config) or --config (a model with no "
            "training), not both; override the run's config with --config.<field>=..."
        )
    logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only directory is read only
    if workdir is not None:
        run_state.load_config(workdir)  # its own error before config_flags' wrapped one
        step = run_state.checkpoint_step(workdir, step)
        out = Path(f.out or Path(workdir) / "evaluations" / f"step_{step}")
        what = workdir
    else:
        name = Path(config_file.split(":", 1)[0]).stem
        out = Path(f.out or f"runs/{name}_eval")
        path = f.config.model.path
        what = f"{config_file} (model.path={path!r})" if path else f"{config_file} (random init)"
    results, step = evaluate(f.config, out, run=workdir, step=step)
    print(f"Evaluation of {what} at step {step}:\n{benchmark_table(results)}")
    print(f"Wrote {out / EVAL_FILE}.")


if __name__ == "__main__":
    _define_flags()
    sys.argv = _with_run_config(sys.argv)
    cli.run(main)
