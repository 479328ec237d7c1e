"""Per-device memory of a training config, estimated before anything compiles, and the advice
a config that does not fit gets.

`estimate_memory` prices one model on one mesh for one `Workload`: params and optimizer state
exactly (from the shardings `gxpo.train.mesh.RULES` give), activations, logits and the KV cache
by a model of XLA's buffers. `check_memory` prints that table before a run compiles and, over the
device's memory, raises or warns with the smallest change that would fit (`suggest`).

The estimator knows no policy update by name: the caller says how many buffers the size of the
trainable params one update holds beyond params and optimizer state (`Workload.step_buffers`).

Shapes: the key in `gxpo.models.config`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from gxpo.models.config import ModelConfig
from gxpo.train.mesh import mesh_sizes, param_infos, spec

GIB = 2**30
MEMORY_CHECKS = ("raise", "warn", "off")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one device must hold: the update's mini-batch and the sampler's batches."""

    update_rows: int  # rows whose activations one backward pass holds (one micro-batch)
    seq_len: int  # T: the longest prompt + response the update sees
    logits_len: int  # A + 1 positions with logits in the update: last prompt token, A answers
    sample_rows: int  # rows decoded together (the larger of a rollout chunk and an eval batch)
    sample_len: int  # S: KV-cache slots, prompt + max new tokens
    # Buffers the size of the trainable params alive inside one update besides params and
    # optimizer state: g0 and the update, and a policy update's probe points, probe gradients
    # and copies of the inner optimizer's moments (its registry entry gives the count).
    step_buffers: int
    reference_copy: bool = False  # full fine-tuning with KL keeps a copy of the initial params
    # G: rows come in groups of G responses to one prompt, whose prompt the update's forward
    # pass and the sampler's cache hold once per group (1: every row its own prompt).
    group_size: int = 1


def workload(config: Any, step_buffers: int) -> Workload:
    """The workload of a training config (the longest prompt, the longest responses) whose
    policy update holds `step_buffers` param-sized buffers (see `Workload`)."""
    r, e, d = config.rollout, config.eval, config.data
    prompt = -(-d.max_prompt_tokens // r.prompt_bucket) * r.prompt_bucket
    rollout_rows = r.prompts_per_step * r.responses_per_prompt
    eval_rows = e.prompts_per_batch * e.n_samples if d.eval else 0
    update_rows = rollout_rows // (config.train.mini_batches * config.train.micro_batches)
    return Workload(
        update_rows=update_rows,
        seq_len=prompt + r.max_new_tokens,
        logits_len=r.max_new_tokens + 1,
        sample_rows=max(rollout_rows // r.sample_chunks, eval_rows),
        sample_len=prompt + max(r.max_new_tokens, e.max_new_tokens if d.eval else 0),
        # gradient accumulation carries one more: the sum of the micro-batches' gradients
        step_buffers=step_buffers + (1 if config.train.micro_batches > 1 else 0),
        reference_copy=config.model.lora_rank == 0 and config.loss.kl_coef > 0,
        group_size=r.responses_per_prompt,
    )


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (the most loaded one) of one model, mesh and workload."""

    base_params: int  # frozen weights (all of them with LoRA)
    trainable_params: int  # LoRA adapters, or every weight for full fine-tuning
    optimizer_state: int  # Adam's two moments of the trainable params
    reference: int  # the initial params, for the KL of full fine-tuning
    step_buffers: int  # gradients, probe points and moment copies inside one update
    activations: int  # what the backward pass of one micro-batch keeps across layers
    logits: int  # the output head's float32 logits, exponentials and gradient
    layer: int  # one layer's temporaries in the backward pass (not alive with the logits')
    logprob_pass: int  # the old / reference log-prob pass over one micro-batch (forward only)
    kv_cache: int  # the sampler's keys and values
    sampler: int  # the decoding loop's own copy of the layers' weights, its logits

    @property
    def resident(self) -> int:
        return self.base_params + self.trainable_params + self.optimizer_state + self.reference

    @property
    def update_peak(self) -> int:
        return self.resident + self.step_buffers + self.activations + max(self.logits, self.layer)

    @property
    def sample_peak(self) -> int:
        return self.resident + self.kv_cache + self.sampler

    @property
    def peak(self) -> int:
        return max(self.update_peak, self.sample_peak, self.resident + self.logprob_pass)

    def table(self, title: str, limit: int | None = None) -> str:
        rows = [
            ("base params", self.base_params),
            ("trainable params", self.trainable_params),
            ("optimizer state", self.optimizer_state),
            ("reference params", self.reference),
            ("update: step buffers", self.step_buffers),
            ("update: activations", self.activations),
            ("update: logits", self.logits),
            ("update: one layer", self.layer),
            ("log-prob pass", self.logprob_pass),
            ("sampler: KV cache", self.kv_cache),
            ("sampler: weights", self.sampler),
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

    Params and optimizer state are exact (from the shardings `RULES` give), and so are the KV
    cache's slots; the rest is a model of XLA's buffers, calibrated against XLA's own figures
    for the compiled programs (`benchmarks/memory_calibration.py`):

    - the forward pass runs each group's prompt once: a micro-batch of B rows in groups of G is
      B / G * X + B * U tokens (X prompt, U response window);
    - per layer and token the backward pass keeps about 4 D-wide activations, q/k/v/attention
      outputs, 4 F-wide MLP activations and N attention rows of T float32 scores +
      probabilities; with `remat` only each layer's input;
    - on top of that, at different times (never both): the output head's float32 logits, their
      exponentials and their gradient (with its compute-dtype copy), or one layer's
      temporaries (the per-layer figure above);
    - the trainer's log-prob pass runs in the update's micro-batches (forward only): their
      logits and exponentials, or one layer;
    - the sampler holds its KV cache (each prompt once per group, in two layouts while the
      prefill's is converted; each row's decoded slots) and its own compute-dtype copy of the
      layers' weights (LoRA folded in), which its loop reads, plus a few float32 [B, V].

    Checked against XLA:CPU in float32 (the calibration's small and SmolLM2-135M shapes), within
    10%: the update's activations and logits, the log-prob pass and the sampler; a policy
    update's step buffers are its registry entry's count (`gxpo.train.updates`). XLA:GPU
    assigns buffers its own way: `benchmarks/gpu_e2e.py` sets a GPU's peak beside the estimate.
    """
    lora = config.lora_rank > 0
    base = trainable = trainable_elems = layer_elems = 0
    for p in param_infos(config):
        n = _per_device(p.shape, p.axes, sizes)
        if p.lora or not lora:
            trainable += n * p.dtype.itemsize
            trainable_elems += n
        else:
            base += n * p.dtype.itemsize
        if p.path[0] == "layers" and not p.lora:
            layer_elems += n
    state_bytes = 4 if lora else np.dtype(config.param_dtype).itemsize
    b = np.dtype(config.dtype).itemsize
    split = sizes["data"] * sizes["fsdp"]
    t = sizes["tensor"]

    def heads(n: int) -> int:  # a sharded count of heads / features, whole where t divides not
        return n // t if n % t == 0 else n

    rows = -(-work.update_rows // split)
    T, D, H = work.seq_len, config.dim, config.head_dim

    def tokens(rows: int) -> int:  # the forward pass's tokens: each group's prompt once
        groups = -(-rows // work.group_size)
        return groups * (T - work.logits_len) + rows * work.logits_len

    V = heads(config.vocab_size)
    n_targets = len(config.lora_targets) if lora else 0
    per_token_layer = b * (
        4 * D
        + 3 * heads(config.num_heads) * H
        + 3 * heads(config.num_kv_heads) * H
        + 4 * heads(config.ffn_dim)
        + n_targets * config.lora_rank
    ) + heads(config.num_heads) * T * (4 + b)
    layer = tokens(rows) * per_token_layer
    saved = config.num_layers * tokens(rows) * (D * b if config.remat else per_token_layer)
    # float32 logits and exponentials (the entropy's), their gradient, its compute-dtype copy
    per_logit = 2 * 4 + (b if b < 4 else 0)
    kv_rows = -(-work.sample_rows // split)
    prompt = T - work.logits_len + 1
    # Each prompt's slots twice: the prefill's stacked cache and the decoding loop's layout.
    slots = 2 * -(-kv_rows // work.group_size) * prompt + kv_rows * (work.sample_len - prompt)
    kv = 2 * config.num_layers * slots * heads(config.num_kv_heads) * H * b
    return MemoryEstimate(
        base_params=base,
        trainable_params=trainable,
        optimizer_state=2 * trainable_elems * state_bytes,
        reference=trainable if work.reference_copy else 0,
        step_buffers=work.step_buffers * trainable_elems * state_bytes,
        activations=saved,
        logits=per_logit * rows * work.logits_len * V,
        layer=layer,
        logprob_pass=max(2 * 4 * rows * work.logits_len * V, layer),
        kv_cache=kv,
        # a draw's float32 [B, V]: logits, exponentials, their blocks, the step's next logits
        sampler=layer_elems * b + 4 * 4 * kv_rows * V,
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
    config: Any,
    model_config: ModelConfig,
    mesh: Mesh,
    *,
    step_buffers: int,
    verbose: bool = True,
) -> MemoryEstimate:
    """Prints the per-device memory estimate of a training config on `mesh` (process 0, when
    `verbose`) and, when it exceeds the device memory, raises or warns
    (`config.mesh.memory_check`) with the smallest change that would fit. `step_buffers`: the
    policy update's param-sized buffers (see `Workload`)."""
    check = config.mesh.memory_check
    if check not in MEMORY_CHECKS:
        raise ValueError(f"config.mesh.memory_check={check!r}: allowed values are {MEMORY_CHECKS}")
    sizes = mesh_sizes(mesh)
    work = workload(config, step_buffers)
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
