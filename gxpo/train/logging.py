"""A run's outputs: metrics.jsonl, eval.jsonl, TensorBoard scalars; a progress bar.

In the work directory (see docs/design.md, "What a run writes"):

- ``metrics.jsonl``: one JSON object per training step, ``step`` first, then ``reward_mean``,
  ``accuracy``, ``backward_passes`` and ``wall_seconds`` (both cumulative), the loss metrics and
  the ``gxpo/...`` diagnostics, as the trainer passes them (nested mappings are flattened with
  ``/``).
- ``eval.jsonl``: one object per evaluation and benchmark: ``step``, ``benchmark``, ``pass@1``,
  ``pass@k`` for each k, ``maj@n``, ``n`` (and whatever else the trainer adds).
- ``tensorboard/``: the same numbers as TensorBoard scalars (eval ones under
  ``eval/<benchmark>/``).
- ``samples.jsonl``: a few of each step's responses, one object each (``log_samples``):
  ``step``, ``prompt``, ``completion``, ``answer``, ``reward`` and each ``reward/<name>``,
  ``length`` (tokens) and ``truncated``: to read what the policy writes and what it is paid for.

Only process 0 writes (``is_main``); every process may call the same methods.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
SAMPLES_FILE = "samples.jsonl"
# The JSONL logs whose rows carry the training step they belong to; a resumed run truncates each
# to the steps its checkpoint holds, so every step and evaluation has exactly one row.
STEP_LOGS = (METRICS_FILE, EVAL_FILE, SAMPLES_FILE)
TENSORBOARD_DIR = "tensorboard"

Scalar = int | float | bool | str


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file ([] if it does not exist).

    A line that does not parse, the torn last line of a run killed mid-write, is skipped.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with path.open() as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _drop_rows_from(path: Path, step: int) -> list[dict[str, Any]]:
    """Rewrites ``path`` keeping only rows logged before ``step``; returns the kept rows.

    A row without an integer ``step`` (a torn line already is skipped by `read_jsonl`) is not
    one of this run's and goes too.
    """
    rows = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] < step]
    if path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)  # atomic: a crash here leaves the old file or the new one
    return rows


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"gxpo": {"active": x}}`` -> ``{"gxpo/active": x}``; NamedTuples and dataclasses
    (e.g. an optimizer's ``state.info``) count as mappings."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if hasattr(value, "_asdict"):
            value = value._asdict()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "/"))
        else:
            flat[name] = value
    return flat


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, Scalar]:
    """Flattens ``metrics`` and turns every value into a Python number.

    One ``jax.device_get`` of the whole dict: a single host transfer for all device values
    instead of one blocking sync per ``float(x)``.
    """
    flat = flatten_metrics(metrics)
    host = jax.device_get(flat)  # a new dict with sorted keys: keep the caller's order below
    scalars = {}
    for name in flat:
        value = host[name]
        if isinstance(value, str):
            scalars[name] = value
            continue
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError(
                f"metric {name!r} has shape {array.shape}; log scalars only (reduce it first)."
            )
        scalars[name] = array.reshape(()).item()
    return scalars


def _tag(name: str) -> str:
    # TensorBoard tags allow [-/\w.]; tensorboardX would rename others with a warning per call.
    return re.sub(r"[^-/\w.]", "_", name)


def _summary_writer(logdir: Path, purge_step: int):
    # tensorboardX.writer imports torch whenever it is installed (over a second, hundreds of MB)
    # only to accept torch tensors; we pass Python floats, so hide torch from that import.
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    # purge_step hides events >= purge_step left by a killed run (TensorBoard's own resume).
    return SummaryWriter(logdir=str(logdir), purge_step=purge_step, flush_secs=30)


class RunLogger:
    """Appends a run's metrics and evaluations to JSONL files and TensorBoard.

    Args:
      workdir: the run's work directory (created if missing).
      start_step: the first step this process will log. Rows with ``step >= start_step`` left
        by an earlier (killed) run are dropped from every file of `STEP_LOGS`, and TensorBoard
        hides its events from that step on, so a resumed run has each step once: a run resumed
        from the checkpoint of step s passes s + 1 (keeping the evaluation at s, which ran
        before that save); a fresh run passes 0, which clears every row a previous run left in
        the directory (a run killed before its first checkpoint included).
      is_main: whether this process writes; None (default): ``jax.process_index() == 0``.
      tensorboard: also write TensorBoard event files.

    ``last_metrics`` is the last kept metrics row (or None): a resumed run continues its
    cumulative ``backward_passes`` and ``wall_seconds`` from there.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        start_step: int = 0,
        is_main: bool | None = None,
        tensorboard: bool = True,
    ):
        self.workdir = Path(workdir)
        self.is_main = jax.process_index() == 0 if is_main is None else is_main
        self.last_metrics: dict[str, Any] | None = None
        self._files = {}
        self._tb = None
        if not self.is_main:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        kept = {name: _drop_rows_from(self.workdir / name, start_step) for name in STEP_LOGS}
        self.last_metrics = kept[METRICS_FILE][-1] if kept[METRICS_FILE] else None
        self._files = {n: (self.workdir / n).open("a") for n in (METRICS_FILE, EVAL_FILE)}
        if tensorboard:
            self._tb = _summary_writer(self.workdir / TENSORBOARD_DIR, start_step)

    def _write(self, file_name: str, row: dict[str, Scalar], tb_prefix: str) -> None:
        if not self.is_main:
            return
        f = self._files[file_name]
        f.write(json.dumps(row) + "\n")
        f.flush()  # a killed run loses at most the row being written
        if self._tb is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(_tag(tb_prefix + name), value, row["step"])

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Scalar]:
        """Writes one training step's metrics; returns the row as Python numbers."""
        row = {"step": int(step)}
        row.update((k, v) for k, v in to_scalars(metrics).items() if k != "step")
        self._write(METRICS_FILE, row, "")
        self.last_metrics = row
        return row

    def log_eval(self, step: int, benchmark: str, results: Mapping[str, Any]) -> dict[str, Scalar]:
        """Writes one benchmark's results (``pass@1``, ``pass@k``, ``maj@n``, ``n``, ...)."""
        row = {"step": int(step), "benchmark": benchmark}
        row.update((k, v) for k, v in to_scalars(results).items() if k not in row)
        self._write(EVAL_FILE, row, f"eval/{benchmark}/")
        return row

    def log_samples(self, step: int, rows: list[Mapping[str, Any]]) -> None:
        """Appends sampled responses of one step to samples.jsonl, each row with ``step`` first
        (JSON values: text, numbers, booleans, null)."""
        if not self.is_main or not rows:
            return
        if SAMPLES_FILE not in self._files:  # opened on first use: runs with samples off have none
            self._files[SAMPLES_FILE] = (self.workdir / SAMPLES_FILE).open("a")
        f = self._files[SAMPLES_FILE]
        f.write("".join(json.dumps({"step": int(step), **row}) + "\n" for row in rows))
        f.flush()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressBar:
    """A tqdm bar over training steps: rate, ETA, and the latest reward and accuracy."""

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        quiet: bool = False,
        is_main: bool | None = None,
    ):
        if is_main is None:
            is_main = jax.process_index() == 0
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=quiet or not is_main,
        )

    def update(self, metrics: Mapping[str, Any]) -> None:
        """Advances one step, showing ``reward_mean`` / ``accuracy`` from ``metrics`` if there."""
        shown = {"reward": "reward_mean", "acc": "accuracy"}
        postfix = {k: f"{float(metrics[m]):.3f}" for k, m in shown.items() if m in metrics}
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
