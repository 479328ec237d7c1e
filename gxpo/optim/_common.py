"""Pieces shared by the `gxpo` and `sfpo` combinators: their common argument checks, the
gradient oracle, float32 tree reductions, and the gate plumbing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gxpo.optim._checks import argument_error, is_real, is_traced
from gxpo.optim.gate import GateState, ZScoreGate

GradFn = Callable[[optax.Params], optax.Updates]
AuxGradFn = Callable[[optax.Params], tuple[optax.Updates, Any]]  # params -> (grads, aux)


def check_common(
    owner: str, inner: Any, loss_fn: Any, reposition: Any, gate: Any, has_aux: Any
) -> None:
    """The argument checks `gxpo` and `sfpo` share (`owner` is the combinator's name)."""
    if not isinstance(inner, optax.GradientTransformation):
        rule = "must be an optax.GradientTransformation (e.g. optax.adamw(1e-6))"
        raise argument_error(owner, "inner", rule, inner)
    if loss_fn is not None and not callable(loss_fn):
        raise argument_error(owner, "loss_fn", "must be callable or None", loss_fn)
    # An injected (traced) alpha cannot be checked here; `init` checked its concrete value.
    if not is_traced(reposition) and not (is_real(reposition) and 0.0 <= reposition <= 1.0):
        raise argument_error(owner, "reposition", "must be a number in [0, 1]", reposition)
    if gate is not None and not isinstance(gate, ZScoreGate):
        raise argument_error(owner, "gate", "must be a ZScoreGate or None", gate)
    if gate is not None:
        gate.validate()
    if not isinstance(has_aux, bool):
        raise argument_error(owner, "has_aux", "must be a bool", has_aux)


def check_min_initial_norm(owner: str, min_initial_norm: Any) -> None:
    """`min_initial_norm` of `gxpo` and `sfpo`: None, or a number >= 0 (or traced)."""
    ok = is_traced(min_initial_norm) or (is_real(min_initial_norm) and min_initial_norm >= 0)
    if min_initial_norm is not None and not ok:
        rule = "must be a number >= 0 or None"
        raise argument_error(owner, "min_initial_norm", rule, min_initial_norm)


def resolve_grad_fn(
    owner: str,
    loss_fn: Callable[..., Any] | None,
    has_aux: bool,
    grad_fn: GradFn | None,
    params: optax.Params | None,
    extra_args: dict[str, Any],
) -> GradFn:
    """The gradient oracle for probe points: `grad_fn` if given, else grad of `loss_fn`."""
    if params is None:
        rule = "must be given to update: tx.update(grads, state, params, ...)"
        raise argument_error(owner, "params", rule, params)
    if grad_fn is not None:
        return grad_fn
    if loss_fn is None:
        rule = (
            f"(params -> grads) must be given to update when {owner}(...) has no `loss_fn` to "
            "evaluate gradients at the probe points"
        )
        raise argument_error(owner, "grad_fn", rule, grad_fn)
    grad = jax.grad(loss_fn, has_aux=has_aux)
    if has_aux:
        return lambda p: grad(p, **extra_args)[0]
    return lambda p: grad(p, **extra_args)


def resolve_aux_grad_fn(
    owner: str,
    loss_fn: Callable[..., Any] | None,
    has_aux: bool,
    aux_grad_fn: AuxGradFn | None,
    extra_args: dict[str, Any],
) -> AuxGradFn:
    """The oracle `params -> (grads, aux)` for the corrective point when the gate's statistic
    reads the loss's aux output: `aux_grad_fn` if given, else grad of a `has_aux` loss_fn."""
    if aux_grad_fn is not None:
        return aux_grad_fn
    if loss_fn is None or not has_aux:
        rule = (
            "(params -> (grads, aux)) must be given to update when the gate's `statistic` reads "
            f"the loss's aux output and {owner}(...) has no `loss_fn` with has_aux=True"
        )
        raise argument_error(owner, "aux_grad_fn", rule, aux_grad_fn)
    grad = jax.grad(loss_fn, has_aux=True)
    return lambda p: grad(p, **extra_args)


def corrective_gradient(grad: GradFn, aux_grad: AuxGradFn | None, theta: Any) -> tuple[Any, Any]:
    """(grads, aux) at the corrective point: `aux_grad` where the gate's statistic reads the
    aux output (else None), the plain gradient oracle otherwise (aux None)."""
    if aux_grad is not None:
        return aux_grad(theta)
    return grad(theta), None


# Diagnostics are float32 whatever the leaves' dtype: bf16 leaves are summed in float32, and the
# two branches of the gate's `lax.cond` must agree on dtypes (so float64 leaves are cast down).


def norm_f32(tree: Any) -> jax.Array:
    """Global L2 norm, accumulated in float32."""
    return jnp.asarray(optax.tree.norm(optax.tree.cast(tree, jnp.float32)), jnp.float32)


def vdot_f32(a: Any, b: Any) -> jax.Array:
    """Inner product of two trees, accumulated in float32 (`optax.tree.vdot` returns and adds
    the leaves' dot products in the leaves' own dtype)."""
    prods = optax.tree.mul(optax.tree.cast(a, jnp.float32), optax.tree.cast(b, jnp.float32))
    return jnp.asarray(optax.tree.sum(prods), jnp.float32)


def cosine_f32(a: Any, b: Any) -> jax.Array:
    return vdot_f32(a, b) / (norm_f32(a) * norm_f32(b) + 1e-30)


def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def displacement(theta: Any, theta0: Any) -> Any:
    """theta - theta0 in theta0's dtypes: the updates a combinator returns."""
    return jax.tree.map(lambda a, b: (a - b).astype(b.dtype), theta, theta0)


def init_gate(gate: ZScoreGate | None) -> GateState | optax.EmptyState:
    return optax.EmptyState() if gate is None else gate.init()


def observe_gate(
    gate: ZScoreGate | None,
    state: GateState | optax.EmptyState,
    corrective_norm: jax.Array,
    aux: Any,
    ok: jax.Array,
) -> tuple[GateState | optax.EmptyState, jax.Array, jax.Array]:
    """The gate after an active step (unchanged if the step fell back, `ok` false), the value
    of its statistic and the value's z-score (both 0 without a gate; z 0 on fallback)."""
    if gate is None:
        zero = jnp.zeros((), jnp.float32)
        return state, zero, zero
    value = gate.observed_value(corrective_norm, aux)
    observed, z = gate.update(state, value)
    return optax.tree.where(ok, observed, state), value, jnp.where(ok, z, 0.0)


def idle_gate(
    gate: ZScoreGate | None, state: GateState | optax.EmptyState
) -> GateState | optax.EmptyState:
    """The gate after a plain step (a temporary gate counts its way back on)."""
    return state if gate is None else gate.idle(state)


def healthy_initial(g0_norm: jax.Array, min_initial_norm: float | None) -> jax.Array | None:
    """Whether ||g0|| is finite and above `min_initial_norm` (None: no check)."""
    if min_initial_norm is None:
        return None
    return jnp.isfinite(g0_norm) & (g0_norm > min_initial_norm)


def gated(
    gate: ZScoreGate | None,
    state: GateState | optax.EmptyState,
    healthy: jax.Array | None,
    active: Callable[[], Any],
    plain: Callable[[], Any],
) -> Any:
    """`active()` while the gate is on and g0 is `healthy` (None: always), else `plain()`; a
    `lax.cond`, so a plain step evaluates no probe gradient at all."""
    on = None if gate is None else state.on
    if on is None and healthy is None:
        return active()
    pred = on if healthy is None else (healthy if on is None else on & healthy)
    return jax.lax.cond(pred, active, plain)
