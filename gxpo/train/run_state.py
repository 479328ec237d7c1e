"""A run read back from its work directory: its config, its checkpoints, its policy at a step.

`python -m gxpo.export` and `python -m gxpo.evaluate` (and `Trainer.for_evaluation`) read runs
through this module, and only read: a run may still be training in the same directory.

    config = load_config("runs/NAME")             # config.json, on top of today's defaults
    policy = load_policy("runs/NAME", step=None)  # the latest checkpoint's model and tokenizer

A checkpoint is restored into a train state built the way the Trainer builds its own
(`gxpo.train.builders`), so a checkpoint that the Trainer resumes from is one this module reads.

This file is also an `ml_collections` config file: `--config=gxpo/train/run_state.py:runs/NAME`
is that run's config, which `--config.<field>=...` flags then override.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import ml_collections
from flax import nnx

from gxpo.models.config import ModelConfig
from gxpo.models.transformer import Transformer
from gxpo.rl.data import ArithTask, BatchIterator
from gxpo.train import builders
from gxpo.train import mesh as mesh_lib
from gxpo.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from gxpo.train.defaults import base_config
from gxpo.train.loss import merge_weights
from gxpo.train.state import TrainState

CONFIG_FILE = "config.json"  # what the Trainer writes in its work directory


class Policy(NamedTuple):
    """A run's policy at one checkpoint."""

    config: ml_collections.ConfigDict  # the run's config
    model: Transformer  # base weights and the trained ones (adapters, or every weight)
    tokenizer: Any  # what the run trained with (the character tokenizer for a random init)
    step: int  # training steps done at the checkpoint


def _workdir(workdir: str | Path) -> Path:
    path = Path(workdir)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"work directory {path} {what}: pass the directory a training run wrote "
            "(launch.py --workdir=..., default runs/<config name>)"
        )
    return path


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the config fields hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _merge(config: ml_collections.ConfigDict, values: dict, source: Path, prefix: str) -> None:
    for key, value in values.items():
        field = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
            _merge(config[key], value, source, f"{field}.")
            continue
        try:
            config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
        except TypeError as e:  # a field whose type changed since the run
            raise ValueError(f"{source}: field {field}={value!r} does not fit ({e})") from None


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run trained with: `<workdir>/config.json` over `base_config()`, so a
    field added since the run has its default. Raises FileNotFoundError for a directory that
    is not a run's."""
    path = _workdir(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not the work directory of a training run "
            "(the Trainer writes config.json there when it starts)"
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    # A run from before the format bonus became a reward function: the same reward, new fields.
    bonus = values.get("loss", {}).pop("format_reward", None)
    if bonus:
        values["reward"] = dict(values.get("reward", {}), functions=["correct", "boxed_format"])
        values["reward"]["weights"] = [1.0, bonus]
    config = base_config()
    _merge(config, _tuples(values), path, "")
    return config


def get_config(workdir: str) -> ml_collections.ConfigDict:
    """`--config=gxpo/train/run_state.py:<workdir>`: the run's config (`load_config`)."""
    return load_config(workdir)


def checkpoint_step(workdir: str | Path, step: int | None = None) -> int:
    """`step` if the run has a complete checkpoint of it, else raises naming the steps there
    are; `step=None`: the latest one."""
    path = _workdir(workdir)
    steps = []
    if (path / CHECKPOINT_DIR).is_dir():
        with Checkpointer(path, read_only=True, async_save=False) as checkpointer:
            steps = checkpointer.all_steps()
    if not steps:
        raise FileNotFoundError(
            f"{path} has no complete checkpoint ({CHECKPOINT_DIR}/<step>/) yet: a run saves "
            "one every train.checkpoint_every steps and at its last step"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(f"{path} has no checkpoint of step {step} (--step); its steps: {steps}")
    return step


def restore(workdir: str | Path, target: TrainState, step: int | None = None) -> TrainState:
    """The run's train state at checkpoint `step` (default: the latest), restored into
    `target`'s structure, dtypes and shardings (a state from `builders.initial_state` of the
    run's config)."""
    step = checkpoint_step(workdir, step)
    with Checkpointer(workdir, read_only=True, async_save=False) as checkpointer:
        return TrainState(*checkpointer.restore(step, target=target))


def _model(model_config: ModelConfig, weights: dict) -> Transformer:
    """A Transformer holding `weights` (a pure dict of `Transformer.weights()`'s layout); no
    random initialisation is materialised."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, weights)
    return nnx.merge(graphdef, state)


def load_policy(workdir: str | Path, step: int | None = None) -> Policy:
    """The run's policy at checkpoint `step` (default: the latest): its base model (the
    config's `model.path`, or the random init of `model.preset` from `train.seed`) with the
    checkpoint's trained weights, on the run's mesh (`config.mesh`)."""
    config = load_config(workdir)
    step = checkpoint_step(workdir, step)  # before any loading
    builders.check(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    tx = builders.policy_update(config)
    model_config, trainable, frozen, tokenizer = builders.model(
        config.model, config.train.seed, mesh
    )
    # The data position's structure is the iterator's, whatever its source: an ArithTask
    # gives it without reading the run's training set.
    data = BatchIterator(ArithTask(), 1).state()
    target, _ = builders.initial_state(tx, model_config, trainable, data, mesh)
    state = restore(workdir, target, step)
    model = _model(model_config, merge_weights(state.trainable, frozen))
    return Policy(config, model, tokenizer, int(state.step))
