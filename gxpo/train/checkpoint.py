"""Atomic, asynchronous, checksummed training checkpoints on Orbax.

A run's checkpoints live in ``<workdir>/checkpoints/<step>/``, each holding three
Orbax items: ``state``, the training-state pytree (the trainer's
`gxpo.train.state.TrainState`: weights, optimizer state, step, data position,
counters), ``metadata``, a small JSON dict (the run's config, the gxpo version),
and ``checksums``, a JSON manifest with every state leaf's dtype, shape and
CRC32 of its bytes, computed from the host copy of the arrays being saved.

Atomicity comes from Orbax: a save writes into ``<step>.orbax-checkpoint-tmp``
and renames it to ``<step>`` only after every byte of all three items is
written, so a process killed mid-save leaves a temporary directory that no
reader counts as a step (and that the next `Checkpointer` on the directory
deletes), and a step never exists without its manifest. With ``async_save`` the
device-to-host copy happens inside `Checkpointer.save` and the file writes run
in a background thread while training continues; the next save, `wait` and
`close` wait for them.

Integrity: every read (`restore`, `read`, `verify`) first reads the step's
arrays back to the host and compares them with the manifest, so bytes changed on
disk (a disk or copy fault) are caught whatever Orbax's file layout; a step that
fails, or that Orbax cannot read, raises `CorruptCheckpointError`.
`restore_newest_intact` moves such a step aside to ``<step>.corrupt-<n>``
(renamed, never deleted) and falls back to the next older one. Each save is
also read back and verified once it has been written (at the next save, `wait`
or `close`), and retention (``max_to_keep``) is done here, not by Orbax: the
newest verified step is never deleted, however many unverified ones follow it.

Restoring goes into a caller-given target pytree (concrete arrays, or
``jax.ShapeDtypeStruct`` leaves from ``jax.eval_shape``) whose structure,
dtypes and shardings the result takes, so NamedTuple optimizer states come
back as NamedTuples and a sharded trainer restores straight into its
shardings. Array values come back bit for bit; a target dtype different from
the stored one is a cast.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import gxpo

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
METADATA_ITEM = "metadata"
CHECKSUM_ITEM = "checksums"
CORRUPT_SUFFIX = ".corrupt-"  # <step>.corrupt-<n>: a step moved aside; Orbax ignores the name

_MAX_LISTED = 8  # differing leaves named in a mismatch error


class CorruptCheckpointError(OSError):
    """A checkpoint whose arrays fail their checksums, or that Orbax cannot read."""


def _leaf_name(path: jax.tree_util.KeyPath) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".") or "<root>"


def _reason(error: BaseException) -> str:
    """A short, one-line account of `error`: the innermost OS error's text if there is one
    (Orbax wraps write failures), else the first line of its message."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:300]}"


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Creates the run's work directory if needed and checks that it is a writable directory.

    Raises:
      OSError: one line naming the directory and the fix: it is an existing file, it cannot
        be created or written (permissions), or the disk is full.
    """
    path = Path(workdir).expanduser()
    fix = "pass another --workdir (or config.train.workdir)"
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"Work directory {path} is an existing file, not a directory; {fix}."
        )
    probe = path / f".gxpo-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A few KB, synced: an unwritable directory or a full disk fails here, before any
        # model load or compile, not at the first checkpoint.
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as e:
        what = "the disk is full" if e.errno == errno.ENOSPC else _reason(e)
        raise OSError(
            f"Work directory {path} cannot be written ({what}); {fix}, or free space or fix "
            "its permissions."
        ) from e
    return path


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


def _host_array(leaf: Any) -> np.ndarray:
    """A leaf's bytes as the host array Orbax stores: a typed PRNG key as its key data, a
    Python number as NumPy makes it (int64 / float64 / bool), an array sharded over several
    processes gathered whole (every process calls this for the same leaves)."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(leaf)


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _checksums(state: Any) -> dict[str, dict[str, Any]]:
    """Leaf name -> its dtype, shape and CRC32: the manifest saved beside the state."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = _host_array(leaf)
        out[_leaf_name(path)] = {
            "dtype": str(array.dtype),
            "shape": list(array.shape),
            "crc32": _crc32(array),
        }
    return out


def _differences(manifest: dict[str, dict[str, Any]], arrays: dict[str, np.ndarray]) -> list[str]:
    """What in `arrays` (read back from disk) disagrees with the manifest written with them."""
    bad = [f"{name} (missing)" for name in sorted(manifest.keys() - arrays.keys())]
    bad += [f"{name} (not in the manifest)" for name in sorted(arrays.keys() - manifest.keys())]
    for name in sorted(manifest.keys() & arrays.keys()):
        want, array = manifest[name], arrays[name]
        if str(array.dtype) != want["dtype"] or list(array.shape) != want["shape"]:
            bad.append(f"{name} ({array.dtype}{list(array.shape)}, saved as ")
            bad[-1] += f"{want['dtype']}{want['shape']})"
        elif _crc32(array) != want["crc32"]:
            bad.append(f"{name} (checksum)")
    return bad


def _on_main(fn: Any, tag: str) -> None:
    """Runs a file operation on process 0 only; every process then waits for it."""
    if jax.process_index() == 0:
        fn()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(tag)


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        sys.stderr.write(f"warning: {message}\n")
        sys.stderr.flush()


class Checkpointer:
    """Saves, verifies and restores one training-state pytree per step under
    ``<workdir>/checkpoints``.

    Example::

      ckpt = Checkpointer(workdir, max_to_keep=3)
      state = {"trainable": params, "opt_state": opt_state, "step": step,
               "data": {"position": pos}, "rng": key}
      ckpt.save(step, state, {"config": config.to_dict()})
      ...
      step, state = ckpt.restore_newest_intact(target=jax.eval_shape(init_state))
      ckpt.close()  # or use the Checkpointer as a context manager

    State leaves may be jax/numpy arrays (any dtype, typed PRNG keys included)
    and Python numbers; a Python-number leaf comes back as a Python number from a
    concrete target and as a 0-d array from an abstract one.

    Args:
      workdir: the run's work directory; checkpoints go to its ``checkpoints/``.
      max_to_keep: how many of the latest steps to keep (None keeps all). Older
        steps are deleted once a newer one has been written and verified; the
        newest verified step is always kept.
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
                CHECKSUM_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None,  # retention is ours: Orbax would delete unverified steps' elders
                save_interval_steps=0 if read_only else 1,  # ours is `_save_interval_steps`
                create=not read_only,
                cleanup_tmp_directories=not read_only,  # leftovers of a killed save
                enable_async_checkpointing=async_save,
                read_only=read_only,
            ),
        )
        self._max_to_keep = max_to_keep
        self._save_interval_steps = save_interval_steps
        self._pending_step: int | None = None  # a save not yet waited for and verified
        self._verified: set[int] = set()  # steps read back intact by this process

    def save(
        self, step: int, state: Any, metadata: dict[str, Any] | None = None, *, force: bool = False
    ) -> bool:
        """Writes ``state``, ``metadata`` and their checksums as checkpoint ``step``; returns
        whether it wrote.

        Never overwrites: a step already saved is skipped (False). Unless
        ``force``, so is a step not after the latest one or off the save
        interval. Waits for the previous save first, verifies it and applies
        ``max_to_keep``. ``metadata`` must be JSON-serializable; ``gxpo_version``
        is added to it.

        Raises:
          OSError: this or the previous save could not be written (e.g. a full
            disk); the message names the step, and the steps before it stay
            usable.
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
        self._finish_pending()
        steps = self._manager.all_steps()
        if step in steps:
            return False
        due = step % self._save_interval_steps == 0 and (not steps or step > max(steps))
        if not (force or due):
            return False
        state = _own_host_arrays(state)
        checksums = _checksums(state)  # from the very arrays Orbax is about to write
        try:
            # The decision is ours (Orbax's default policy also saves any first step).
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE_ITEM: ocp.args.StandardSave(state),
                        METADATA_ITEM: ocp.args.JsonSave(meta),
                        CHECKSUM_ITEM: ocp.args.JsonSave(checksums),
                    }
                ),
                force=True,
            )
        except Exception as e:
            raise self._write_error(step, e) from e
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

    def moved_aside(self) -> list[Path]:
        """Directories of steps found corrupt and moved aside (``<step>.corrupt-<n>``)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if CORRUPT_SUFFIX in p.name)

    def read(self, step: int | None = None) -> dict[str, np.ndarray]:
        """Every array of checkpoint ``step`` (default: the latest) on the host, by leaf name
        (``trainable.layers.0.q.lora_a``; typed PRNG keys as key data), verified against
        the checksums saved with it.

        Raises:
          FileNotFoundError: no such committed step.
          CorruptCheckpointError: the arrays fail their checksums, or Orbax cannot read them.
        """
        step = self._committed_step(step)
        where = self.directory / str(step)
        # A checkpoint written before gxpo kept checksums has no such item at all: read it
        # unverified, with a warning (one whose manifest is there but unreadable is corrupt).
        legacy = not (where / CHECKSUM_ITEM).exists()
        try:
            if legacy:
                manifest = None
            else:
                manifest = self._manager.restore(
                    step, args=ocp.args.Composite(**{CHECKSUM_ITEM: ocp.args.JsonRestore()})
                )[CHECKSUM_ITEM]
                if not isinstance(manifest, dict):
                    raise ValueError(f"the `{CHECKSUM_ITEM}` item is missing")
        except Exception as e:
            raise CorruptCheckpointError(
                f"checkpoint {where} has no readable checksum manifest ({_reason(e)})"
            ) from e
        try:
            tree = self._manager.item_metadata(step)[STATE_ITEM]
            tree = getattr(tree, "tree", tree)
            target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
            )[STATE_ITEM]
        except Exception as e:
            raise CorruptCheckpointError(f"checkpoint {where} cannot be read ({_reason(e)})") from e
        arrays = {
            _leaf_name(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
        }
        if manifest is None:
            if step not in self._verified:
                _warn(f"checkpoint {where} predates checksums: restored without verifying it.")
            self._verified.add(step)
            return arrays
        bad = _differences(manifest, arrays)
        if bad:
            raise CorruptCheckpointError(f"checkpoint {where} fails its checksums: {_listed(bad)}")
        self._verified.add(step)
        return arrays

    def verify(self, step: int | None = None) -> None:
        """Raises `CorruptCheckpointError` unless checkpoint ``step`` (default: the latest)
        reads back bit for bit as saved."""
        self.read(step)

    def restore(self, step: int | None = None, *, target: Any) -> Any:
        """Reads checkpoint ``step`` (default: the latest) into ``target``'s structure,
        after verifying it (`read`).

        ``target`` is a pytree of the state's structure: concrete arrays or
        ``jax.ShapeDtypeStruct`` leaves (e.g. ``jax.eval_shape`` of the state
        init, with ``.sharding`` set for sharded restores). The result has its
        tree structure, dtypes and shardings.

        Raises:
          FileNotFoundError: no such committed step.
          CorruptCheckpointError: the step fails verification or cannot be read.
          ValueError: the target's leaves or shapes differ from the checkpoint's.
        """
        step = self._committed_step(step)
        self.verify(step)
        stored = self._manager.item_metadata(step)[STATE_ITEM]
        mismatch = _describe_mismatch(_stored_shapes(stored), _target_shapes(target))
        if mismatch:
            raise ValueError(
                f"Checkpoint {self.directory / str(step)} does not fit the restore target: "
                f"{mismatch}. The run that wrote it had a different model, LoRA or "
                "policy_update/optimizer config (see Checkpointer.metadata(step)); resume "
                "with that config, or start in a fresh workdir."
            )
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
            )
        except Exception as e:
            if "RESOURCE_EXHAUSTED" in str(e):  # out of device memory: not the files' fault
                raise
            raise CorruptCheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be read ({_reason(e)})"
            ) from e
        return restored[STATE_ITEM]

    def restore_newest_intact(self, *, target: Any) -> tuple[int, Any] | None:
        """Restores the newest checkpoint that verifies into ``target`` (see `restore`);
        returns ``(step, state)``, or None when the directory holds no checkpoint at all.

        A newer step that fails verification, or that Orbax cannot read, is named in one
        warning line on stderr and moved aside to ``<step>.corrupt-<n>`` (never deleted).

        Raises:
          CorruptCheckpointError: checkpoints exist (or were moved aside before) but none
            is intact.
          ValueError: the newest intact checkpoint does not fit ``target``.
        """
        failed = []
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, target=target)
            except CorruptCheckpointError as e:
                moved = self._move_aside(step)
                failed.append(step)
                _warn(f"{e}; moved it to {moved.name} and trying the previous checkpoint.")
        aside = self.moved_aside()
        if not aside:
            return None
        raise CorruptCheckpointError(
            f"No intact checkpoint in {self.directory}: "
            + (f"steps {failed} failed verification; " if failed else "")
            + f"{len(aside)} corrupt checkpoint(s) are kept there as <step>{CORRUPT_SUFFIX}<n>. "
            "To start over, run launch.py with --noresume (it deletes that directory) or "
            "use a fresh work directory."
        )

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata saved with ``step`` (default: the latest)."""
        step = self._committed_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        )
        return dict(restored[METADATA_ITEM])

    def wait(self) -> None:
        """Blocks until the last save has committed, then verifies it and applies
        ``max_to_keep``; raises an `OSError` naming the step if it could not be written."""
        self._finish_pending()

    def close(self) -> None:
        """`wait`, then releases Orbax's threads."""
        try:
            self._finish_pending()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _finish_pending(self) -> None:
        step, self._pending_step = self._pending_step, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(step, e) from e
        try:
            self.verify(step)
        except CorruptCheckpointError as e:  # written wrong: keep the older steps instead
            moved = self._move_aside(step)
            _warn(f"{e}; moved it to {moved.name}.")
        self._apply_retention()

    def _apply_retention(self) -> None:
        if self._max_to_keep is None:
            return
        steps = sorted(self._manager.all_steps())
        keep = set(steps[-self._max_to_keep :])
        verified = self._verified & set(steps)
        if verified:  # the newest known-intact step outlives any unverified ones after it
            keep.add(max(verified))
        for step in steps:
            if step not in keep:
                self._manager.delete(step)

    def _move_aside(self, step: int) -> Path:
        n = 1
        while (self.directory / f"{step}{CORRUPT_SUFFIX}{n}").exists():
            n += 1
        moved = self.directory / f"{step}{CORRUPT_SUFFIX}{n}"
        _on_main(lambda: os.rename(self.directory / str(step), moved), "gxpo_move_aside")
        self._verified.discard(step)
        self._manager.reload()
        return moved

    def _write_error(self, step: int, error: BaseException) -> OSError:
        previous = [s for s in self.all_steps() if s < step]
        kept = (
            f"checkpoint {previous[-1]} before it is intact and resumable"
            if previous
            else "no earlier checkpoint exists"
        )
        return OSError(
            f"Checkpoint step {step} could not be written to {self.directory} "
            f"({_reason(error)}); {kept}. Free disk space (or fix the directory's "
            "permissions) and run again."
        )

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
