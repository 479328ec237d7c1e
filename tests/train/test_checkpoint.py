"""Checkpointer: exact round trips, retention, a save killed mid-write, sharded restore, errors,
checksums (corrupt steps caught, moved aside, the newest intact one restored), a full disk."""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gxpo
from gxpo.optim import GXPOState
from gxpo.optim import gxpo as gxpo_tx
from gxpo.train.checkpoint import CHECKPOINT_DIR, Checkpointer, CorruptCheckpointError


def _loss(params):
    q = params["layers"]["0"]["q"]
    h = q["lora_a"] @ q["lora_b"].astype(jnp.float32)
    return jnp.sum(h**2) + jnp.sum(params["norm"].astype(jnp.float32) ** 2)


@pytest.fixture(scope="module")
def state():
    """A trainer-like state: bf16/f32 params, a gxpo(adamw) state after one update, ints,
    bools, a typed and a raw PRNG key."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    trainable = {
        "layers": {
            "0": {
                "q": {
                    "lora_a": jax.random.normal(k1, (8, 4), jnp.float32),
                    "lora_b": jax.random.normal(k2, (4, 8), jnp.bfloat16),
                }
            }
        },
        "norm": jax.random.normal(k3, (8,), jnp.bfloat16),
    }
    tx = gxpo_tx(optax.adamw(1e-2), _loss)

    @jax.jit
    def one_update(params):
        opt_state = tx.init(params)
        updates, opt_state = tx.update(jax.grad(_loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    trainable, opt_state = one_update(trainable)
    assert int(opt_state.info.grad_evals) == 3  # the update really extrapolated
    return {
        "trainable": trainable,
        "opt_state": opt_state,
        "step": 7,
        "data": {"position": 123, "seen": np.array([True, False, True])},
        "rng": jax.random.key(42),
        "rng_raw": jax.random.PRNGKey(43),
        "counts": jnp.arange(5, dtype=jnp.int32),
    }


def assert_bitwise_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g, w in zip(
        (p for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]),
        jax.tree.leaves(got),
        jax.tree.leaves(want),
    ):
        name = jax.tree_util.keystr(path)
        if isinstance(w, int | float):
            assert type(g) is type(w) and g == w, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes(), name


def test_round_trip_is_exact_into_concrete_and_abstract_targets(tmp_path, state):
    saved = jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, state)
    config = {"policy_update": {"name": "gxpo", "virtual_depth": 5}, "lr": 1e-6}
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(7, saved, {"config": config})
        # The trainer's next step donates the state while the write is in flight.
        donated = jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t), donate_argnums=0)
        jax.block_until_ready(donated(saved["trainable"]))
        ckpt.wait()
        assert ckpt.latest_step() == 7

    ckpt = Checkpointer(tmp_path)
    restored = ckpt.restore(target=state)
    assert_bitwise_equal(restored, state)
    assert type(restored["opt_state"]) is GXPOState

    abstract = jax.eval_shape(lambda: state)
    restored = ckpt.restore(7, target=abstract)
    assert int(restored["step"]) == 7 and int(restored["data"]["position"]) == 123
    for key in ("trainable", "opt_state", "rng", "rng_raw", "counts"):
        assert_bitwise_equal(restored[key], state[key])
    assert ckpt.metadata(7) == {"config": config, "gxpo_version": gxpo.__version__}
    ckpt.close()


def test_retention_latest_step_and_skips(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        ckpt.restore(target={"w": 0})
    ckpt_dir = tmp_path / CHECKPOINT_DIR
    for step in range(1, 5):
        assert ckpt.save(step, {"w": jnp.full((256, 256), step, jnp.float32)})
        latest = ckpt.latest_step()  # an async save in flight is not a step yet
        assert latest is None or (ckpt_dir / str(latest)).is_dir()
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["3", "4"]
    assert not ckpt.save(4, {"w": jnp.zeros((256, 256))})  # never overwrites
    assert not ckpt.save(2, {"w": jnp.zeros((256, 256))})  # not after the latest
    with pytest.raises(FileNotFoundError, match=r"available steps: \[3, 4\]"):
        ckpt.metadata(1)
    ckpt.close()

    every_other = Checkpointer(tmp_path / "b", save_interval_steps=2, async_save=False)
    assert not every_other.save(3, {"w": 1.0})
    assert every_other.save(3, {"w": 1.0}, force=True)
    assert every_other.restore(target={"w": 0.0}) == {"w": 1.0}
    every_other.close()


def test_restore_into_a_different_structure_names_what_differs(tmp_path, state):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state)
    ckpt = Checkpointer(tmp_path)
    as_grpo = {**state, "opt_state": optax.adamw(1e-2).init(state["trainable"])}
    with pytest.raises(ValueError) as err:
        ckpt.restore(target=as_grpo)
    msg = str(err.value)
    assert str(tmp_path / CHECKPOINT_DIR / "7") in msg
    assert "only in the checkpoint: opt_state.gate.count" in msg
    assert "only in the target: opt_state.0.count" in msg
    assert "policy_update" in msg

    other_rank = jax.tree.map(lambda x: x, state)
    other_rank["trainable"]["layers"]["0"]["q"]["lora_a"] = jnp.zeros((8, 2))
    with pytest.raises(ValueError, match=r"shapes differ: trainable\.layers\.0\.q\.lora_a "):
        ckpt.restore(target=other_rank)
    ckpt.close()


def test_bad_input_is_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="`data.name` is a str"):
        ckpt.save(1, {"data": {"name": "gsm8k", "position": 3}})
    with pytest.raises(ValueError, match="JSON-serializable"):
        ckpt.save(1, {"w": 1.0}, {"config": object()})
    with pytest.raises(ValueError, match="`step` must be an int"):
        ckpt.save(-1, {"w": 1.0})
    ckpt.wait()
    assert ckpt.latest_step() is None
    assert list((tmp_path / CHECKPOINT_DIR).iterdir()) == []
    ckpt.close()


# Saves step 2 (eight 4 MB arrays) in a child process with orbax slowed down: array k
# starts its write k seconds in, and the commit never comes. The parent kills the child
# once the first array's bytes are on disk: mid-write, and before commit whatever the timing.
_KILLED_SAVE = """
import asyncio, itertools, sys
import jax, numpy as np
from orbax.checkpoint._src.path import atomicity
from orbax.checkpoint._src.serialization import serialization
from gxpo.train.checkpoint import Checkpointer

write, order = serialization.async_serialize_from_host, itertools.count()

async def throttled_write(*args, **kwargs):
    await asyncio.sleep(next(order))
    await write(*args, **kwargs)

async def stalled_finalize(self):
    await asyncio.sleep(3600)

serialization.async_serialize_from_host = throttled_write
atomicity.AtomicRenameTemporaryPath.finalize = stalled_finalize
rng = np.random.default_rng(0)  # incompressible
ckpt = Checkpointer(sys.argv[1])
ckpt.save(2, {"w": [jax.device_put(rng.random((1 << 20,), np.float32)) for _ in range(8)]})
ckpt.wait()
"""


def _env(**extra):
    return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


def _bytes_under(directory, prefix):
    """Bytes in files below entries of `directory` named `prefix*`; a writer may be
    renaming files meanwhile, so a file gone before its stat counts as empty."""
    total = 0
    for entry in directory.iterdir():
        for root, _, files in os.walk(entry) if entry.name.startswith(prefix) else ():
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(root, name)).st_size
    return total


def test_save_killed_mid_write_leaves_the_last_complete_step(tmp_path, state):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
    ckpt_dir = tmp_path / CHECKPOINT_DIR

    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    deadline = time.monotonic() + 120
    try:
        while _bytes_under(ckpt_dir, "2.") < 1 << 20:
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in ckpt_dir.iterdir())
    assert leftovers[0] == "1" and len(leftovers) == 2  # step 2 never committed ...
    assert leftovers[1].startswith("2.")  # ... its temporary directory remains
    assert _bytes_under(ckpt_dir, "2.") < 16 << 20  # half or more of the 32 MB unwritten

    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1
    assert_bitwise_equal(ckpt.restore(target=state), state)
    later = {**state, "step": 8}
    assert ckpt.save(2, later) and ckpt.save(3, state)
    ckpt.close()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2", "3"]
    with Checkpointer(tmp_path) as ckpt:
        assert_bitwise_equal(ckpt.restore(2, target=state), later)


# Saves on an 8-way mesh, restores into a 4x2 mesh through jax.eval_shape of a jitted
# init with out_shardings, as a resharded trainer does.
_SHARDED = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gxpo.train.checkpoint import Checkpointer

devices = np.array(jax.devices())
assert devices.size == 8, devices
rows = NamedSharding(Mesh(devices, ("x",)), P("x", None))
mesh = Mesh(devices.reshape(4, 2), ("d", "m"))
cols, rep = NamedSharding(mesh, P("m", "d")), NamedSharding(mesh, P())

def init():
    w = jax.numpy.arange(64 * 16, dtype=jax.numpy.float32).reshape(64, 16) / 7
    return {"w": w, "rng": jax.random.key(5), "step": jax.numpy.int32(3)}

state = jax.jit(init, out_shardings={"w": rows, "rng": NamedSharding(rows.mesh, P()),
                                     "step": NamedSharding(rows.mesh, P())})()
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(3, state)
abstract = jax.eval_shape(jax.jit(init, out_shardings={"w": cols, "rng": rep, "step": rep}))
with Checkpointer(sys.argv[1]) as ckpt:
    got = ckpt.restore(target=abstract)
for name, sharding in (("w", cols), ("rng", rep), ("step", rep)):
    assert got[name].sharding == sharding, (name, got[name].sharding)
assert np.asarray(got["w"]).tobytes() == np.asarray(state["w"]).tobytes()
assert (np.asarray(jax.random.key_data(got["rng"])) == jax.random.key_data(state["rng"])).all()
print("restored into", tuple(got["w"].sharding.spec))
"""


def test_restore_reshards_into_the_targets_shardings(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(XLA_FLAGS=flags),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "restored into ('m', 'd')" in out.stdout


def corrupt(step_dir, seed=0, *, whole=False):
    """Random bytes into the array files of a step: 16 in the middle of the largest, inside the
    raw bytes of an incompressible array (Orbax reads them without a word: only the checksums
    notice), or over every whole file (Orbax cannot decode them)."""
    rng = np.random.default_rng(seed)
    files = sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())
    assert files
    if not whole:
        files = [max(files, key=lambda p: p.stat().st_size)]
    for path in files:
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.seek(0 if whole else size // 2)
            f.write(rng.bytes(size if whole else 16))


def test_corrupt_steps_are_named_moved_aside_and_the_newest_intact_one_restored(
    tmp_path, state, capsys
):
    noise = np.random.default_rng(0).random((64, 64), np.float32)  # 16 KB, incompressible
    state = {**state, "noise": noise}
    states = {s: {**state, "step": s} for s in (1, 2, 3)}
    with Checkpointer(tmp_path, max_to_keep=None, async_save=False) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st)
    ckpt_dir = tmp_path / CHECKPOINT_DIR
    corrupt(ckpt_dir / "3")  # silently different values
    corrupt(ckpt_dir / "2", whole=True)  # undecodable

    ckpt = Checkpointer(tmp_path, max_to_keep=None)
    with pytest.raises(
        CorruptCheckpointError, match=r"checkpoints/3 fails its checksums: noise \(checksum\)$"
    ):
        ckpt.verify(3)
    capsys.readouterr()
    step, restored = ckpt.restore_newest_intact(target=state)
    assert step == 1
    assert_bitwise_equal(restored, states[1])
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2, warnings  # one line per corrupt step, newest first
    assert "checkpoints/3 fails its checksums" in warnings[0] and "3.corrupt-1" in warnings[0]
    assert "checkpoints/2 cannot be read" in warnings[1] and "2.corrupt-1" in warnings[1]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2.corrupt-1", "3.corrupt-1"]
    assert ckpt.all_steps() == [1]
    # The run goes on from step 1 and writes step 2 again; a second corrupt 2 gets its own name.
    assert ckpt.save(2, states[2])
    ckpt.wait()
    corrupt(ckpt_dir / "2", seed=1)
    corrupt(ckpt_dir / "1", seed=2)
    ckpt.close()

    ckpt = Checkpointer(tmp_path, max_to_keep=None)
    with pytest.raises(CorruptCheckpointError, match=r"No intact checkpoint .*--noresume"):
        ckpt.restore_newest_intact(target=state)
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["1.corrupt-1", "2.corrupt-1", "2.corrupt-2", "3.corrupt-1"]
    # Nothing left to restore is still not a fresh start.
    with pytest.raises(CorruptCheckpointError, match="No intact checkpoint"):
        ckpt.restore_newest_intact(target=state)
    ckpt.close()
    with Checkpointer(tmp_path / "fresh") as ckpt:
        assert ckpt.restore_newest_intact(target=state) is None


def test_retention_never_deletes_the_newest_verified_step_for_an_unverified_one(tmp_path):
    ckpt_dir = tmp_path / CHECKPOINT_DIR
    ckpt = Checkpointer(tmp_path, max_to_keep=1)
    noise = np.random.default_rng(0).random((64, 64), np.float32)
    w = lambda s: {"w": noise + s}
    ckpt.save(1, w(1))
    ckpt.wait()  # step 1 written and read back intact
    ckpt.save(2, w(2))
    ckpt._manager.wait_until_finished()  # step 2 committed, not yet verified
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2"]
    corrupt(ckpt_dir / "2")  # e.g. a faulty write
    ckpt.wait()  # verification fails: 2 is moved aside, 1 stays
    assert ckpt.all_steps() == [1]
    ckpt.save(3, w(3))
    ckpt.wait()  # 3 verifies: now 1 may go
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2.corrupt-1", "3"]
    ckpt.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_during_a_save_leaves_the_previous_checkpoint_usable(
    tmp_path, state, monkeypatch, async_save
):
    from orbax.checkpoint._src.serialization import serialization

    ckpt = Checkpointer(tmp_path, async_save=async_save)
    ckpt.save(1, state)
    ckpt.wait()

    async def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(serialization, "async_serialize_from_host", disk_full)
    with pytest.raises(OSError) as err:
        ckpt.save(2, {**state, "step": 2})
        ckpt.wait()  # an asynchronous save fails here
    msg = str(err.value)
    assert "\n" not in msg and "Checkpoint step 2 could not be written" in msg
    assert "No space left on device" in msg and "checkpoint 1 before it is intact" in msg
    monkeypatch.undo()
    with contextlib.suppress(Exception):
        ckpt.close()

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        step, restored = ckpt.restore_newest_intact(target=state)
        assert step == 1
        assert_bitwise_equal(restored, state)


def test_a_checkpoint_from_before_checksums_restores_with_a_warning(tmp_path, state, capsys):
    import shutil  # noqa: PLC0415

    with Checkpointer(tmp_path, max_to_keep=None, async_save=False) as ckpt:
        ckpt.save(1, state)
    shutil.rmtree(tmp_path / CHECKPOINT_DIR / "1" / "checksums")  # as gxpo wrote it before
    capsys.readouterr()
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        step, restored = ckpt.restore_newest_intact(target=state)
    assert step == 1
    assert_bitwise_equal(restored, state)
    assert "predates checksums" in capsys.readouterr().err
