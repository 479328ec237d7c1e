"""The jitted update step: the gradient of a mini-batch (whole, or accumulated over
micro-batches) and one policy update, `update(state, frozen, batch) -> (state, metrics)`.

Shapes: the key in `gxpo.models.config`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gxpo.train.loss import Batch
from gxpo.train.state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]  # (params, *, batch, frozen)


def split_micro_batches(batch: Batch, count: int, group_size: int) -> Batch:
    """[count, B / count, ...] micro-batches of whole prompt groups, prompt q going to micro-batch
    q % count: rows of every device (rows are split over devices in contiguous blocks) land in
    every micro-batch, so each one keeps all devices busy."""

    def split(x):
        x = x.reshape(-1, count, group_size, *x.shape[1:])  # [Q / count, count, G, ...]
        return jnp.swapaxes(x, 0, 1).reshape(count, -1, *x.shape[3:])

    return jax.tree.map(split, batch)


def _micro_weight(batch: Batch, aggregation: str, dtype: Any) -> jax.Array:
    """How much a micro-batch's loss counts in the mini-batch's: its share of the aggregation's
    denominator (response tokens, or non-empty responses), so that the weighted sum of
    micro-batch losses is exactly the loss of the whole mini-batch."""
    if aggregation == "token-mean":
        return jnp.sum(batch.response_mask).astype(dtype)
    if aggregation == "seq-mean-token-mean":
        return jnp.sum(jnp.any(batch.response_mask, axis=1)).astype(dtype)
    return jnp.ones((), dtype)  # seq-mean-token-sum-norm: a sum over the batch's rows


def accumulated_value_and_grad(
    loss_fn: LossFn,
    params: dict,
    batch: Batch,
    frozen: dict,
    *,
    micro_batches: int,
    group_size: int,
    aggregation: str,
) -> tuple[dict, dict]:
    """(metrics, grads) of `loss_fn` over `batch`, one micro-batch at a time under `lax.scan`
    (activations of one micro-batch alive at once); equal to the whole batch's up to float
    rounding. Metrics are the same weighted averages. The weights are in the params' float
    precision (float32 in training), so the sum is as exact as the gradients."""
    micro = split_micro_batches(batch, micro_batches, group_size)
    dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(params))
    weights = jax.vmap(functools.partial(_micro_weight, aggregation=aggregation, dtype=dtype))(
        micro
    )
    if aggregation != "seq-mean-token-sum-norm":
        weights = weights / jnp.maximum(jnp.sum(weights), 1.0)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def body(acc, xs):
        mb, w = xs
        (_, metrics), grads = value_and_grad(params, batch=mb, frozen=frozen)
        return jax.tree.map(lambda a, b: a + w * b, acc, (metrics, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: value_and_grad(params, batch=first, frozen=frozen))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1], shapes[1]))
    (metrics, grads), _ = jax.lax.scan(body, zeros, (micro, weights))
    return metrics, grads


def _accepts_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` takes the keyword `name` by name (a policy update registered by a user may
    take only `grad_fn`; passing it more would break it)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters


def make_update_step(
    tx: optax.GradientTransformationExtraArgs,
    loss_fn: LossFn,
    *,
    info_prefix: str = "policy",
    micro_batches: int = 1,
    group_size: int = 1,
    aggregation: str = "token-mean",
    **jit_kwargs,
) -> Callable[[TrainState, dict, Batch], tuple[TrainState, dict]]:
    """`update(state, frozen, batch) -> (state, metrics)`, jitted, donating `state`.

    g0 = grad(loss_fn) at `state.trainable` (the one backward pass GRPO has), then
    `tx.update(g0, ..., grad_fn=...)`: a policy update that evaluates more gradients (GXPO,
    SFPO) gets them from `grad_fn`, on the same batch; one whose `update` names an
    `aux_grad_fn` keyword also gets `aux_grad_fn` (params -> (grads, the loss's metrics)), which
    a gate watching e.g. the entropy reads. With `micro_batches > 1` every gradient,
    g0 and the probes', is accumulated over that many micro-batches of whole groups of
    `group_size` rows (the memory of one micro-batch, the update of the whole batch). The
    policy update's diagnostics (`optax.tree.get(opt_state, "info")`, a NamedTuple) come back
    as `<info_prefix>/<field>`; `grad_evals` (its count, else 1) is added to
    `state.backward_passes`. `jit_kwargs` (e.g. in/out shardings) go to `jax.jit`.
    """

    takes_aux = _accepts_keyword(tx.update, "aux_grad_fn")

    def value_and_grad(params, batch, frozen):
        if micro_batches == 1:
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, batch=batch, frozen=frozen
            )
            return metrics, grads
        return accumulated_value_and_grad(
            loss_fn,
            params,
            batch,
            frozen,
            micro_batches=micro_batches,
            group_size=group_size,
            aggregation=aggregation,
        )

    def update(state, frozen, batch):
        metrics, g0 = value_and_grad(state.trainable, batch, frozen)
        if micro_batches == 1:  # a gradient only: the loss's value is left out of the program
            grad = jax.grad(loss_fn, has_aux=True)
            grad_fn = lambda p: grad(p, batch=batch, frozen=frozen)[0]
            aux_grad_fn = lambda p: grad(p, batch=batch, frozen=frozen)
        else:
            grad_fn = lambda p: value_and_grad(p, batch, frozen)[1]
            aux_grad_fn = lambda p: value_and_grad(p, batch, frozen)[::-1]
        oracles = dict(grad_fn=grad_fn)
        if takes_aux:  # (grads, the loss's metrics): for a gate that watches e.g. the entropy
            oracles["aux_grad_fn"] = aux_grad_fn
        updates, opt_state = tx.update(g0, state.opt_state, state.trainable, **oracles)
        metrics = dict(metrics, grad_norm=optax.global_norm(g0))
        info = optax.tree.get(opt_state, "info")
        if info is not None:
            metrics.update({f"{info_prefix}/{k}": v for k, v in info._asdict().items()})
        grad_evals = getattr(info, "grad_evals", jnp.ones((), jnp.int32))
        metrics["grad_evals"] = grad_evals
        state = state._replace(
            trainable=optax.apply_updates(state.trainable, updates),
            opt_state=opt_state,
            backward_passes=state.backward_passes + grad_evals,
        )
        return state, metrics

    return jax.jit(update, donate_argnums=0, **jit_kwargs)
