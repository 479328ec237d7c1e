"""Rows between the processes and the global arrays of a multi-host run.

Rows (axis 0) are split over the mesh's "data" and "fsdp" axes with each process's devices
contiguous, so a process holds whole rows: it decodes and scores its own rows (`host_rows`)
and contributes them back (`rows_from_hosts`). On a single process every function here is the
plain host <-> device copy.

Shapes: the key in `gxpo.models.config`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gxpo.train.mesh import mesh_sizes, row_sharding


def check_rows(rows: int, mesh: Mesh, what: str) -> None:
    """Raises unless `rows` split evenly over the batch axes (else every device would compute
    every row)."""
    sizes = mesh_sizes(mesh)
    split = sizes["data"] * sizes["fsdp"]
    if rows % split:
        raise ValueError(
            f"{what} = {rows} rows do not split evenly over config.mesh.data * config.mesh.fsdp "
            f"= {split} devices; make it a multiple of {split}"
        )


def put_rows(mesh: Mesh, x: np.ndarray) -> jax.Array:
    """A host array that every process holds whole, as a global array split by rows."""
    return jax.device_put(x, row_sharding(mesh, x.shape))


def host_rows(mesh: Mesh, x: jax.Array) -> tuple[np.ndarray, slice]:
    """This process's rows of the global array `x` and where they sit in it (all rows on a
    single process, or where the rows are not split)."""
    if jax.process_count() == 1:
        return np.asarray(x), slice(0, x.shape[0])
    x = jax.device_put(x, row_sharding(mesh, x.shape))
    spans = {s.index[0].indices(x.shape[0])[:2]: s.data for s in x.addressable_shards}
    order = sorted(spans)
    if any(a[1] != b[0] for a, b in zip(order, order[1:])):
        raise ValueError(f"this process's rows {order} are not contiguous; check the mesh order")
    rows = np.concatenate([np.asarray(spans[span]) for span in order])
    return rows, slice(order[0][0], order[-1][1])


def rows_from_hosts(mesh: Mesh, local: np.ndarray, rows: slice, total: int) -> jax.Array:
    """The global array of `total` rows whose rows `rows` this process holds as `local`."""
    shape = (total,) + local.shape[1:]
    sharding = row_sharding(mesh, shape)
    if jax.process_count() == 1 or rows.stop - rows.start == total:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, shape)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a global array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sum_over_hosts(value: int) -> int:
    """The sum of `value` over the processes (e.g. what each counted of its own rows)."""
    if jax.process_count() == 1:
        return value
    return int(np.sum(multihost_utils.process_allgather(np.asarray(value))))
