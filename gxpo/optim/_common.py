"""Pieces shared by the `gxpo` and `sfpo` combinators: argument checks, the
gradient oracle, and tree reductions in float32."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gxpo.optim.gate import GateState, ZScoreGate

GradFn = Callable[[optax.Params], optax.Updates]


def check_common(name: str, inner: Any, reposition: float, gate: Any) -> None:
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(
            f"{name}: `inner` must be an optax.GradientTransformation (e.g. optax.adamw(1e-6)), "
            f"got {type(inner).__name__}."
        )
    if not 0.0 <= reposition <= 1.0:
        raise ValueError(f"{name}: `reposition` (alpha) must lie in [0, 1], got {reposition!r}.")
    if gate is not None and not isinstance(gate, ZScoreGate):
        raise ValueError(f"{name}: `gate` must be a ZScoreGate or None, got {gate!r}.")
    if gate is not None:
        gate.validate()


def resolve_grad_fn(
    name: str,
    loss_fn: Callable[..., Any] | None,
    has_aux: bool,
    grad_fn: GradFn | None,
    params: optax.Params | None,
    extra_args: dict[str, Any],
) -> GradFn:
    """The gradient oracle for probe points: `grad_fn` if given, else grad of `loss_fn`."""
    if params is None:
        raise ValueError(
            f"{name}.update needs `params`: call tx.update(grads, state, params, ...)."
        )
    if grad_fn is not None:
        return grad_fn
    if loss_fn is None:
        raise ValueError(
            f"{name}: no way to evaluate gradients at the probe points. Pass `loss_fn` to "
            f"{name}(...), or `grad_fn=` (params -> grads) to update()."
        )
    grad = jax.grad(loss_fn, has_aux=has_aux)
    if has_aux:
        return lambda p: grad(p, **extra_args)[0]
    return lambda p: grad(p, **extra_args)


def tree_sq_norm(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0))


def tree_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(tree_sq_norm(tree))


def tree_vdot(a: Any, b: Any) -> jax.Array:
    prods = jax.tree.map(lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)), a, b)
    return sum(jax.tree.leaves(prods), jnp.float32(0))


def tree_all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def cosine(a: Any, b: Any) -> jax.Array:
    return tree_vdot(a, b) / (tree_norm(a) * tree_norm(b) + 1e-30)


def tree_select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), on_true, on_false)


def init_gate(gate: ZScoreGate | None) -> GateState | optax.EmptyState:
    return optax.EmptyState() if gate is None else gate.init()


def observe_gate(
    gate: ZScoreGate | None, state: GateState | optax.EmptyState, value: jax.Array, ok: jax.Array
) -> tuple[GateState | optax.EmptyState, jax.Array]:
    """The gate after an active step observed `value` (unchanged if the step fell back, `ok`
    false), and the value's z-score (0 without a gate, or on fallback)."""
    if gate is None:
        return state, jnp.zeros((), jnp.float32)
    observed, z = gate.update(state, value)
    return tree_select(ok, observed, state), jnp.where(ok, z, 0.0)


def gated(
    gate: ZScoreGate | None,
    state: GateState | optax.EmptyState,
    active: Callable[[], Any],
    plain: Callable[[], Any],
) -> Any:
    """`active()` while the gate is on, else `plain()`; a `lax.cond`, so once the gate is off the
    active branch (every probe gradient) is not evaluated at all."""
    if gate is None:
        return active()
    return jax.lax.cond(state.on, active, plain)
