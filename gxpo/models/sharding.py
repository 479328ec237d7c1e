"""The model's logical axes: the one table a mesh module maps to mesh axes, and its resolver.

Every parameter's shape is a string of shape letters (the key in `gxpo.models.config`), and
`LOGICAL_AXES` maps each letter to the logical axis name stored as the parameter's
`out_sharding` metadata (`nnx.get_partition_spec` under `nnx.logical_axis_rules`). The pure
functions pin their activations through the same names (`constrain`, with the `*_AXES` below):
rows over "batch", logits over "vocab", the KV cache over "batch" and "kv_heads". No mesh is
needed on one device, where `constrain` is a no-op.
"""

from __future__ import annotations

import math

import jax
from flax.core.spmd import get_logical_axis_rules
from jax.sharding import PartitionSpec

LOGICAL_AXES: dict[str, str] = {
    "B": "batch",  # activations only (rows of a batch or of the KV cache)
    "L": "layers",
    "V": "vocab",
    "D": "embed",
    "N": "q_heads",
    "K": "kv_heads",
    "H": "head_dim",
    "F": "mlp",
    "R": "lora_rank",
}

# Logical axes of the pinned activations: the residual stream, logits, and KV cache k / v.
ACTIVATION_AXES = ("batch", None, None)
LOGITS_AXES = ("batch", None, "vocab")
KV_CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")
# A DecodeCache's per-layer keys [B, K, H, S] and values [B, K, S, H].
DECODE_KEYS_AXES = ("batch", "kv_heads", "head_dim", None)
DECODE_VALUES_AXES = ("batch", "kv_heads", None, "head_dim")


def logical_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...],
    mesh_sizes: dict[str, int],
) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions carry the logical names `axes`.

    `rules` maps a logical name to mesh axes (a name, a tuple of names, or None). A mesh axis is
    used once per array, and a dimension that its mesh axes do not divide stays whole (e.g. 2 KV
    heads on a tensor axis of 4), so every array of every model fits every mesh.
    """
    table, used, spec = dict(rules), set(), []
    for name, size in zip(axes, shape):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a in mesh_sizes and a not in used)
        if not mesh_axes or size % math.prod(mesh_sizes[a] for a in mesh_axes):
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`x` pinned to the layout its logical `axes` name, under the mesh (`jax.set_mesh`) and
    logical rules (`nnx.logical_axis_rules`) a caller set, e.g. `gxpo.train.mesh.use_mesh`;
    `x` itself otherwise. The mesh is part of jit's cache key, so a function traced without one
    is traced again under one (the rules are read at trace time: keep them fixed per mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    spec = logical_spec(axes, x.shape, rules, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)
