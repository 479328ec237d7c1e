"""Device mesh, sharding rules, multi-host start-up and a per-device memory estimate.

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
the model pins through `transformer.constrain`); parameter, LoRA, optimizer-state, batch and
KV-cache shardings all derive from it. A dimension its mesh axes do not divide stays whole.

Multi-host: `initialize_distributed` starts `jax.distributed` from the environment; then every
process runs the same program on global arrays. Rows are split over "data" and "fsdp" with each
process's devices contiguous, so a process holds whole rows: it decodes and scores its own rows
(`host_rows`) and contributes them back (`rows_from_hosts`); the update is global.

Shape key: B batch rows, T tokens per row, L layers, D width, N query heads, K key/value heads,
H head dim, F MLP width, V vocabulary, R LoRA rank, S KV-cache slots.
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
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gxpo.models.transformer import (
    KV_CACHE_AXES,
    LOGICAL_AXES,
    ModelConfig,
    Transformer,
    logical_spec,
)
from gxpo.train.loss import Batch

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

GIB = 2**30
MEMORY_CHECKS = ("raise", "warn", "off")
# Buffers the size of the trainable params alive inside one update besides params and state:
# g0 and the update (GRPO); probe points, probe gradients and copies of the inner optimizer's
# moments (SFPO's fast loop, GXPO's two probes and corrective step).
_STEP_BUFFERS = {"grpo": 4, "sfpo": 8, "gxpo": 12}


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


def spec(axes: tuple[str | None, ...], shape: tuple[int, ...], sizes: dict[str, int]):
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
    A [L, *in, R] splits like its kernel's input axes, B [L, R, *out] like its output axes)."""
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


def batch_sharding(mesh: Mesh, rows: int) -> Batch:
    """The shardings of an update's `Batch` of `rows` rows: every field split by rows."""
    per_token, per_row = row_sharding(mesh, (rows, 1)), row_sharding(mesh, (rows,))
    return Batch(*(per_row if f == "advantages" else per_token for f in Batch._fields))


def kv_cache_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Of the KV cache's k and v [L, B, S, K, H]: rows over the batch axes, heads over tensor."""
    return _named(mesh, KV_CACHE_AXES, shape)


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


# ----------------------------------------------------------------------------- placement


def init_sharded(init: Callable[[], Any], shardings: dict) -> Any:
    """`init()`, a tuple of weight dicts (e.g. trainable and frozen), computed by one jit whose
    out_shardings give each weight its entry of `shardings` (the full weights layout). Each
    device only ever holds its own shards: a 7B model is never whole on one device."""
    abstract = jax.eval_shape(init)
    return jax.jit(init, out_shardings=tuple(like(shardings, t) for t in abstract))()


def place(tree: Any, shardings: Any) -> Any:
    """Arrays every process holds whole (e.g. loaded from a checkpoint) moved to `shardings`."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


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
    if jax.process_count() == 1:
        return value
    return int(np.sum(multihost_utils.process_allgather(np.asarray(value))))


# ----------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one device must hold: the update's mini-batch and the sampler's batches."""

    update_rows: int  # rows whose activations one backward pass holds (one micro-batch)
    seq_len: int  # T: the longest prompt + response the update sees
    logits_len: int  # W: positions the update computes logits at (the response window)
    sample_rows: int  # rows decoded together (the larger of a rollout chunk and an eval batch)
    sample_len: int  # KV-cache slots: prompt + max new tokens
    policy_update: str = "gxpo"
    reference_copy: bool = False  # full fine-tuning with KL keeps a copy of the initial params


def workload(config: Any) -> Workload:
    """The workload of a training config (the longest prompt, the longest responses)."""
    r, e, d = config.rollout, config.eval, config.data
    prompt = -(-d.max_prompt_tokens // r.prompt_bucket) * r.prompt_bucket
    rollout_rows = r.prompts_per_step * r.responses_per_prompt
    eval_rows = e.prompts_per_batch * e.n_samples if d.eval else 0
    return Workload(
        update_rows=rollout_rows // (config.train.mini_batches * config.train.micro_batches),
        seq_len=prompt + r.max_new_tokens,
        logits_len=r.max_new_tokens + 1,
        sample_rows=max(rollout_rows // r.sample_chunks, eval_rows),
        sample_len=prompt + max(r.max_new_tokens, e.max_new_tokens if d.eval else 0),
        policy_update=config.policy_update.name,
        reference_copy=config.model.lora_rank == 0 and config.loss.kl_coef > 0,
    )


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (the most loaded one) of one model, mesh and workload."""

    base_params: int  # frozen weights (all of them with LoRA)
    trainable_params: int  # LoRA adapters, or every weight for full fine-tuning
    optimizer_state: int  # Adam's two moments of the trainable params
    reference: int  # the initial params, for the KL of full fine-tuning
    step_buffers: int  # gradients, probe points and moment copies inside one update
    activations: int  # what the backward pass of one mini-batch keeps
    logits: int  # float32 logits, their exponentials and their gradient
    kv_cache: int  # the sampler's keys and values

    @property
    def resident(self) -> int:
        return self.base_params + self.trainable_params + self.optimizer_state + self.reference

    @property
    def update_peak(self) -> int:
        return self.resident + self.step_buffers + self.activations + self.logits

    @property
    def sample_peak(self) -> int:
        return self.resident + self.kv_cache

    @property
    def peak(self) -> int:
        return max(self.update_peak, self.sample_peak)

    def table(self, title: str, limit: int | None = None) -> str:
        rows = [
            ("base params", self.base_params),
            ("trainable params", self.trainable_params),
            ("optimizer state", self.optimizer_state),
            ("reference params", self.reference),
            ("update: step buffers", self.step_buffers),
            ("update: activations", self.activations),
            ("update: logits", self.logits),
            ("sampler: KV cache", self.kv_cache),
            ("peak (update)", self.update_peak),
            ("peak (sampler)", self.sample_peak),
        ]
        lines = [title] + [f"  {name:<22}{n / GIB:9.2f} GiB" for name, n in rows]
        if limit is not None:
            lines.append(f"  {'device memory':<22}{limit / GIB:9.2f} GiB")
        return "\n".join(lines)


def _per_device(shape: tuple[int, ...], axes: tuple[str, ...], sizes: dict[str, int]) -> int:
    """Elements of one device's shard of an array of `shape` split by `RULES`."""
    n = math.prod(shape)
    for entry in spec(axes, shape, sizes):
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            n //= sizes[axis]
    return n


def estimate_memory(config: ModelConfig, sizes: dict[str, int], work: Workload) -> MemoryEstimate:
    """Estimated bytes per device of training `config` on a mesh of `sizes` (no device needed).

    Params and optimizer state are exact (from the shardings `RULES` give); the rest is a
    model of XLA's buffers: per layer and token the backward pass keeps about 4 D-wide
    activations, q/k/v/attention outputs, 4 F-wide MLP activations and N attention rows of T
    float32 scores + probabilities; with `remat` only each layer's input, plus one layer.
    """
    lora = config.lora_rank > 0
    base = trainable = trainable_elems = 0
    for p in param_infos(config):
        n = _per_device(p.shape, p.axes, sizes)
        if p.lora or not lora:
            trainable += n * p.dtype.itemsize
            trainable_elems += n
        else:
            base += n * p.dtype.itemsize
    state_bytes = 4 if lora else np.dtype(config.param_dtype).itemsize
    b = np.dtype(config.dtype).itemsize
    split = sizes["data"] * sizes["fsdp"]
    t = sizes["tensor"]

    def heads(n: int) -> int:  # a sharded count of heads / features, whole where t divides not
        return n // t if n % t == 0 else n

    rows = -(-work.update_rows // split)
    T, D, H = work.seq_len, config.dim, config.head_dim
    n_targets = len(config.lora_targets) if lora else 0
    per_token_layer = b * (
        4 * D
        + 3 * heads(config.num_heads) * H
        + 3 * heads(config.num_kv_heads) * H
        + 4 * heads(config.ffn_dim)
        + n_targets * config.lora_rank
    ) + heads(config.num_heads) * T * (4 + b)
    layer = rows * T * per_token_layer
    saved = config.num_layers * rows * T * D * b if config.remat else config.num_layers * layer
    kv_rows = -(-work.sample_rows // split)
    kv = 2 * config.num_layers * kv_rows * work.sample_len * heads(config.num_kv_heads) * H * b
    return MemoryEstimate(
        base_params=base,
        trainable_params=trainable,
        optimizer_state=2 * trainable_elems * state_bytes,
        reference=trainable if work.reference_copy else 0,
        step_buffers=_STEP_BUFFERS[work.policy_update] * trainable_elems * state_bytes,
        activations=saved + layer,  # one layer's backward temporaries on top
        logits=3 * rows * work.logits_len * heads(config.vocab_size) * 4,
        kv_cache=kv,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest(
    config: ModelConfig,
    sizes: dict[str, int],
    work: Workload,
    limit: int,
    prompts_per_step: int,
    responses_per_prompt: int,
    mini_batches: int,
    micro_batches: int,
    sample_chunks: int = 1,
    eval_rows: int = 0,
) -> str:
    """The smallest change that fits `limit` by the estimate: remat, more micro-batches
    (gradient accumulation: the same optimizer updates), more sampling chunks (a smaller KV
    cache: the same rollout), or the same devices regrouped (fsdp over all, then tensor
    parallelism)."""
    rollout_rows, split = prompts_per_step * responses_per_prompt, sizes["data"] * sizes["fsdp"]
    chunk_flag = []
    for c in _divisors(prompts_per_step):  # the fewest sampling chunks whose KV cache fits
        if c < sample_chunks or (prompts_per_step // c) % split:
            continue
        w = dataclasses.replace(work, sample_rows=max(rollout_rows // c, eval_rows))
        if estimate_memory(config, sizes, w).sample_peak <= limit:
            if c != sample_chunks:
                work, chunk_flag = w, [f"--config.rollout.sample_chunks={c}"]
            break
    n = math.prod(sizes.values())
    meshes = [sizes] + [
        {"data": 1, "fsdp": n // t, "tensor": t} for t in _divisors(n) if t <= 8 and t != n
    ]
    meshes = list({tuple(m.values()): m for m in meshes}.values())
    remats = [config.remat] if config.remat else [False, True]
    for mesh in meshes:
        split = mesh["data"] * mesh["fsdp"]
        for remat in remats:
            cfg = dataclasses.replace(config, remat=remat)
            for m in _divisors(prompts_per_step):
                rows = prompts_per_step * responses_per_prompt // m
                if m < mini_batches * micro_batches or m % mini_batches or rows % split:
                    continue
                w = dataclasses.replace(work, update_rows=rows)
                est = estimate_memory(cfg, mesh, w)
                if est.peak <= limit:
                    flags = [f"--config.mesh.{k}={v}" for k, v in mesh.items() if v != sizes[k]]
                    if remat != config.remat:
                        flags.append("--config.model.remat=True")
                    if m != mini_batches * micro_batches:
                        flags.append(f"--config.train.micro_batches={m // mini_batches}")
                    flags += chunk_flag
                    return (
                        f"{' '.join(flags) or 'no change'} would fit "
                        f"(estimated {est.peak / GIB:.1f} GiB per device)"
                    )
                if est.sample_peak > limit:
                    break  # more micro-batches do not shrink the sampler's KV cache
    return (
        "no regrouping of these devices fits; use more devices (config.mesh with a larger "
        "fsdp), fewer rollout.prompts_per_step, or shorter rollout.max_new_tokens"
    )


def device_memory(mesh: Mesh, fallback_gb: float) -> int | None:
    """Bytes a device may use: what the backend reports (GPU/TPU), else `fallback_gb` (a
    config value, for CPU), or None when neither is known."""
    stats = [d.memory_stats() for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limits = [s["bytes_limit"] for s in stats if s and "bytes_limit" in s]
    if limits:
        return min(limits)
    return int(fallback_gb * GIB) if fallback_gb > 0 else None


def check_memory(
    config: Any, model_config: ModelConfig, mesh: Mesh, *, verbose: bool = True
) -> MemoryEstimate:
    """Prints the per-device memory estimate of a training config on `mesh` (process 0, when
    `verbose`) and, when it exceeds the device memory, raises or warns
    (`config.mesh.memory_check`) with the smallest change that would fit."""
    check = config.mesh.memory_check
    if check not in MEMORY_CHECKS:
        raise ValueError(f"config.mesh.memory_check={check!r}: allowed values are {MEMORY_CHECKS}")
    sizes = mesh_sizes(mesh)
    work = workload(config)
    estimate = estimate_memory(model_config, sizes, work)
    limit = device_memory(mesh, config.mesh.device_memory_gb)
    title = (
        f"Memory per device (estimate) on mesh {sizes}, {work.update_rows} rows x "
        f"{work.seq_len} tokens per update, remat={model_config.remat}:"
    )
    main = jax.process_index() == 0
    if verbose and main:
        print(estimate.table(title, limit), flush=True)
    if check == "off" or limit is None or estimate.peak <= limit:
        return estimate
    r = config.rollout
    hint = suggest(
        model_config,
        sizes,
        work,
        limit,
        r.prompts_per_step,
        r.responses_per_prompt,
        config.train.mini_batches,
        config.train.micro_batches,
        r.sample_chunks,
        config.eval.prompts_per_batch * config.eval.n_samples if config.data.eval else 0,
    )
    if mesh.devices.flat[0].platform == "gpu":
        hint += " (JAX takes 75% of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION says more)"
    message = (
        f"the estimated peak of {estimate.peak / GIB:.1f} GiB per device exceeds the "
        f"{limit / GIB:.1f} GiB available: {hint}. (config.mesh.memory_check='warn' runs anyway.)"
    )
    if check == "raise":
        raise ValueError(f"{estimate.table(title, limit)}\n{message}")
    if main:
        print(f"Warning: {message}", flush=True)
    return estimate
