"""Atomic, asynchronous training checkpoints on Orbax.

A run's checkpoints live in ``<workdir>/checkpoints/<step>/``, each holding two
Orbax items: ``state``, the training-state pytree (the trainer's
`gxpo.train.state.TrainState`: weights, optimizer state, step, data position,
counters), and ``metadata``, a small JSON dict (the run's config, the gxpo
version).

Atomicity comes from Orbax: a save writes into ``<step>.orbax-checkpoint-tmp``
and renames it to ``<step>`` only after every byte is written, so a process
killed mid-save leaves a temporary directory that no reader counts as a step
(and that the next `Checkpointer` on the directory deletes). With
``async_save`` the device-to-host copy happens inside `Checkpointer.save` and
the file writes run in a background thread while training continues; the
next save, `wait` and `close` wait for them.

Restoring goes into a caller-given target pytree (concrete arrays, or
``jax.ShapeDtypeStruct`` leaves from ``jax.eval_shape``) whose structure,
dtypes and shardings the result takes, so NamedTuple optimizer states come
back as NamedTuples and a sharded trainer restores straight into its
shardings. Array values come back bit for bit; a target dtype different from
the stored one is a cast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import gxpo

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
METADATA_ITEM = "metadata"

_MAX_LISTED = 8  # differing leaves named in a mismatch error


def _leaf_name(path: jax.tree_util.KeyPath) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".") or "<root>"


def _check_leaves(state: Any) -> None:
    """Rejects leaves Orbax cannot store, naming the first, before anything is written."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        ok = isinstance(leaf, (jax.Array, bool, int, float, np.number, np.bool_)) or (
            isinstance(leaf, np.ndarray) and leaf.dtype.kind not in "OSUMm"
        )
        if not ok:
            raise ValueError(
                f"Checkpointer.save: leaf `{_leaf_name(path)}` is a {type(leaf).__name__}; "
                "the state may hold only arrays and Python numbers. Put strings and other "
                "objects in `metadata` (JSON) instead."
            )


def _own_host_arrays(state: Any) -> Any:
    # An async save writes numpy leaves after `save` returns; a copy keeps a
    # caller's later in-place edit out of the checkpoint. jax.Arrays are immutable.
    return jax.tree.map(lambda x: np.array(x) if isinstance(x, np.ndarray) else x, state)


def _target_shapes(target: Any) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Leaf name -> (shape, is a typed PRNG key) for a concrete or abstract pytree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        dtype = getattr(leaf, "dtype", None)
        is_key = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        out[_leaf_name(path)] = (tuple(np.shape(leaf)), is_key)
    return out


def _stored_shapes(tree_metadata: Any) -> dict[str, tuple[int, ...]]:
    tree = getattr(tree_metadata, "tree", tree_metadata)
    return {
        _leaf_name(path): tuple(getattr(leaf, "shape", ()))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _describe_mismatch(
    stored: dict[str, tuple[int, ...]], target: dict[str, tuple[tuple[int, ...], bool]]
) -> str | None:
    """What differs between a checkpoint's leaves and a target's, or None if they fit.

    A typed PRNG key is stored as its raw key data, so its stored shape only has
    to start with the key array's shape.
    """
    only_stored = sorted(stored.keys() - target.keys())
    only_target = sorted(target.keys() - stored.keys())
    reshaped = []
    for name in sorted(stored.keys() & target.keys()):
        (shape, is_key), saved = target[name], stored[name]
        fits = saved[: len(shape)] == shape if is_key else saved == shape
        if not fits:
            reshaped.append(f"{name} (checkpoint {saved}, target {shape})")
    parts = []
    if only_stored:
        parts.append(f"leaves only in the checkpoint: {_listed(only_stored)}")
    if only_target:
        parts.append(f"leaves only in the target: {_listed(only_target)}")
    if reshaped:
        parts.append(f"shapes differ: {_listed(reshaped)}")
    return "; ".join(parts) or None


class Checkpointer:
    """Saves and restores one training-state pytree per step under ``<workdir>/checkpoints``.

    Example::

      ckpt = Checkpointer(workdir, max_to_keep=3)
      state = {"trainable": params, "opt_state": opt_state, "step": step,
               "data": {"position": pos}, "rng": key}
      ckpt.save(step, state, {"config": config.to_dict()})
      ...
      state = ckpt.restore(target=jax.eval_shape(init_state))  # the latest step
      ckpt.close()  # or use the Checkpointer as a context manager

    State leaves may be jax/numpy arrays (any dtype, typed PRNG keys included)
    and Python numbers; a Python-number leaf comes back as a Python number from a
    concrete target and as a 0-d array from an abstract one.

    Args:
      workdir: the run's work directory; checkpoints go to its ``checkpoints/``.
      max_to_keep: how many of the latest steps to keep (None keeps all). Older
        steps are deleted after the newer one has been written.
      save_interval_steps: `save` writes only steps divisible by this, unless forced.
      async_save: write files in a background thread; `save` returns once the
        state is on the host.
      read_only: only read (export, evaluation): creates nothing, deletes nothing, and
        leaves the temporary directory of a save in flight alone, so a running trainer's
        checkpoints can be read while it writes them.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        read_only: bool = False,
    ) -> None:
        if max_to_keep is not None and not (isinstance(max_to_keep, int) and max_to_keep >= 1):
            raise ValueError(
                f"Checkpointer: `max_to_keep` must be None or >= 1, got {max_to_keep!r}."
            )
        if not (isinstance(save_interval_steps, int) and save_interval_steps >= 1):
            raise ValueError(
                "Checkpointer: `save_interval_steps` must be an int >= 1, "
                f"got {save_interval_steps!r}."
            )
        self.directory = Path(workdir).expanduser().resolve() / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                METADATA_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else max_to_keep,
                save_interval_steps=0 if read_only else 1,  # ours is `_save_interval_steps`
                create=not read_only,
                cleanup_tmp_directories=not read_only,  # leftovers of a killed save
                enable_async_checkpointing=async_save,
                read_only=read_only,
            ),
        )
        self._save_interval_steps = save_interval_steps
        self._pending_step: int | None = None  # an async save that may not have committed

    def save(
        self, step: int, state: Any, metadata: dict[str, Any] | None = None, *, force: bool = False
    ) -> bool:
        """Writes ``state`` and ``metadata`` as checkpoint ``step``; returns whether it wrote.

        Never overwrites: a step already saved is skipped (False). Unless
        ``force``, so is a step not after the latest one or off the save
        interval. Waits for the previous async save first. ``metadata`` must be
        JSON-serializable; ``gxpo_version`` is added to it.
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"Checkpointer.save: `step` must be an int >= 0, got {step!r}.")
        step = int(step)
        _check_leaves(state)
        meta = {**(metadata or {}), "gxpo_version": gxpo.__version__}
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"Checkpointer.save: `metadata` must be JSON-serializable ({e}); pass a "
                "ConfigDict as config.to_dict()."
            ) from None
        steps = self._manager.all_steps()  # the in-flight step included
        if step in steps:
            return False
        due = step % self._save_interval_steps == 0 and (not steps or step > max(steps))
        if not (force or due):
            return False
        # The decision is ours (Orbax's default policy also saves any first step).
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(_own_host_arrays(state)),
                    METADATA_ITEM: ocp.args.JsonSave(meta),
                }
            ),
            force=True,
        )
        if saved:
            self._pending_step = step
        return saved

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first; a save still being written is not one."""
        steps = sorted(self._manager.all_steps())
        if self._pending_step is not None and self._manager.is_saving_in_progress():
            steps = [s for s in steps if s != self._pending_step]
        return steps

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int | None = None, *, target: Any) -> Any:
        """Reads checkpoint ``step`` (default: the latest) into ``target``'s structure.

        ``target`` is a pytree of the state's structure: concrete arrays or
        ``jax.ShapeDtypeStruct`` leaves (e.g. ``jax.eval_shape`` of the state
        init, with ``.sharding`` set for sharded restores). The result has its
        tree structure, dtypes and shardings.

        Raises:
          FileNotFoundError: no such committed step.
          ValueError: the target's leaves or shapes differ from the checkpoint's.
        """
        step = self._committed_step(step)
        stored = self._manager.item_metadata(step)[STATE_ITEM]
        if stored is None:
            raise FileNotFoundError(
                f"Checkpoint {self.directory / str(step)} has no `{STATE_ITEM}` item; "
                "it was not written by gxpo's Checkpointer."
            )
        mismatch = _describe_mismatch(_stored_shapes(stored), _target_shapes(target))
        if mismatch:
            raise ValueError(
                f"Checkpoint {self.directory / str(step)} does not fit the restore target: "
                f"{mismatch}. The run that wrote it had a different model, LoRA or "
                "policy_update/optimizer config (see Checkpointer.metadata(step)); resume "
                "with that config, or start in a fresh workdir."
            )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
        )
        return restored[STATE_ITEM]

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata saved with ``step`` (default: the latest)."""
        step = self._committed_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        )
        return dict(restored[METADATA_ITEM])

    def wait(self) -> None:
        """Blocks until the last save has committed; raises its error if it failed."""
        self._manager.wait_until_finished()
        self._pending_step = None

    def close(self) -> None:
        """Waits for the last save, then releases Orbax's threads."""
        self._manager.close()
        self._pending_step = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _committed_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
            return step
        if step == self._pending_step:
            self.wait()
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"No complete checkpoint for step {step} in {self.directory}; "
                f"available steps: {self.all_steps()}."
            )
        return step
