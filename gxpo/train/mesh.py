"""Device mesh, sharding rules and multi-host start-up.

Training runs on JAX's own SPMD engine: one `jax.sharding.Mesh` with axes `MESH_AXES`, sized by
`config.mesh` (-1 = the devices the other axes leave), Auto axis types, so XLA propagates
shardings from the jitted functions' in/out shardings and the model's constraints.

- "data": batch rows are split over it, parameters are replicated (data parallelism).
- "fsdp": rows are split over it too, and every parameter's model-width ("embed") axis, so a
  device stores 1/fsdp of the weights and XLA gathers a layer's weights when it runs (FSDP).
- "tensor": attention heads, the MLP width and the vocabulary are split (tensor parallelism);
  the residual stream stays whole on it.

`RULES` is the one table from logical axis names to mesh axes. The names come from the model
(`LOGICAL_AXES`, stored on every parameter as `out_sharding` metadata, and the activation axes
the model pins through `gxpo.models.sharding.constrain`); parameter, LoRA, optimizer-state,
row and KV-cache shardings all derive from it. A dimension its mesh axes do not divide stays whole.

Multi-host: `initialize_distributed` starts `jax.distributed` from the environment; then every
process runs the same program on global arrays. Rows are split over "data" and "fsdp" with each
process's devices contiguous, so a process holds whole rows (`gxpo.train.rows` moves them
between a process and the global arrays); the update is global.

Shapes: the key in `gxpo.models.config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gxpo.models.config import ModelConfig
from gxpo.models.sharding import KV_CACHE_AXES, LOGICAL_AXES, logical_spec
from gxpo.models.transformer import Transformer

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXIS = LOGICAL_AXES["B"]  # the logical name of rows

# Logical axis -> mesh axes; the one place that decides how everything is split.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH_AXIS, ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("lora_rank", None),
)


# ----------------------------------------------------------------------------- the mesh


def initialize_distributed(mesh_config: Any) -> None:
    """`jax.distributed.initialize()` when `mesh_config.multihost` is set; call it first.

    The coordinator address, process count and process id come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID where set; otherwise JAX detects them (Slurm,
    Open MPI, TPU pods). Calling it again in an initialised process does nothing.
    """
    if not mesh_config.multihost or jax.distributed.is_initialized():
        return
    env = os.environ
    jax.distributed.initialize(
        coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or None,
        num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
        process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None,
    )


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from `config.mesh`, with one -1 filled by the devices left."""
    sizes = [mesh_config[axis] for axis in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"config.mesh.{axis}={size!r}: must be an int >= 1, or -1 (the rest)")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) "
                f"do not divide the {num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))}: data * fsdp * tensor = "
            f"{math.prod(sizes)} must equal the {num_devices} devices (set one axis to -1)"
        )
    return tuple(sizes)


def make_mesh(mesh_config: Any, devices: list | None = None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh over `devices` (default: all, of every process)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.shape)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
    """The mesh and `RULES` as the context of a call, so the model's constraints apply."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        yield


def on_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` called under `use_mesh(mesh)`; the jitted `fn` stays `.__wrapped__`."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with use_mesh(mesh):
            return fn(*args, **kwargs)

    return call


# ----------------------------------------------------------------------------- shardings


def spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], sizes: dict[str, int]
) -> PartitionSpec:
    """The PartitionSpec `RULES` give an array of logical `axes` on a mesh of `sizes`."""
    return logical_spec(axes, shape, RULES, sizes)


def _named(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec(axes, shape, mesh_sizes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter of the weights dict: where it is, its shape, dtype and logical axes."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    axes: tuple[str, ...]
    lora: bool


@functools.lru_cache(maxsize=16)
def param_infos(config: ModelConfig) -> tuple[ParamInfo, ...]:
    """Every parameter of a model of `config`, read from an abstract model (no allocation)."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        out.append(
            ParamInfo(
                tuple(str(p) for p in path),
                tuple(value.shape),
                np.dtype(value.dtype),
                tuple(var.get_metadata()["out_sharding"]),
                isinstance(var, nnx.LoRAParam),
            )
        )
    return tuple(out)


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict:
    out: dict = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def weight_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    """A NamedSharding per parameter, in the `Transformer.weights()` layout (LoRA included:
    lora_a [L, *in, R] splits like its kernel's input axes, lora_b [L, R, *out] like its output
    axes)."""
    return _nest([(p.path, _named(mesh, p.axes, p.shape)) for p in param_infos(config)])


def like(shardings: dict, tree: dict) -> dict:
    """The part of a nested `shardings` dict with the keys of `tree` (e.g. the trainable part)."""
    return {
        k: like(shardings[k], v) if isinstance(v, dict) else shardings[k] for k, v in tree.items()
    }


def opt_state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
    """Shardings of `tx.init(params)`: every leaf that mirrors a parameter (Adam's moments,
    also inside GXPO / SFPO's wrapped state) shards like it; counters, the gate and the
    diagnostics are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def row_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Rows (axis 0) over the batch axes; whole when they do not divide the rows."""
    return _named(mesh, (BATCH_AXIS,) + (None,) * (len(shape) - 1), shape)


def row_shardings(mesh: Mesh, rows: int, ranks: Any) -> Any:
    """A row sharding for every leaf of `ranks`, a pytree of array ranks (e.g. an update's
    batch with 2 for a [B, T] field and 1 for a [B] one): the shardings of arrays of `rows`
    rows whatever their other dimensions."""
    return jax.tree.map(lambda n: row_sharding(mesh, (rows,) + (1,) * (n - 1)), ranks)


def kv_cache_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Of the KV cache's k and v [L, B, S, K, H]: rows over the batch axes, heads over tensor."""
    return _named(mesh, KV_CACHE_AXES, shape)


# ----------------------------------------------------------------------------- placement


def init_sharded(init: Callable[[], Any], shardings: dict) -> Any:
    """`init()`, a tuple of weight dicts (e.g. trainable and frozen), computed by one jit whose
    out_shardings give each weight its entry of `shardings` (the full weights layout). Each
    device only ever holds its own shards: a 7B model is never whole on one device."""
    abstract = jax.eval_shape(init)
    return jax.jit(init, out_shardings=tuple(like(shardings, t) for t in abstract))()


def place(tree: Any, shardings: Any) -> Any:
    """Arrays every process holds whole moved to `shardings` (a checkpoint needs none of this:
    `load_pretrained(..., shardings=)` creates its weights in place)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)
