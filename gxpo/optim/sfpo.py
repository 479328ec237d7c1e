"""SFPO: Slow-Fast Policy Optimization (the baseline GXPO is measured against)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gxpo.optim import _common
from gxpo.optim._checks import argument_error, is_int
from gxpo.optim.gate import GateState, ZScoreGate


class SFPOInfo(NamedTuple):
    """Diagnostics of the latest step; every field a scalar array."""

    active: jax.Array  # int32: 1 if this step ran the fast loop (gate on)
    fallback: jax.Array  # int32: 1 if a non-finite gradient forced the plain inner step
    grad_evals: jax.Array  # int32: gradient evaluations this step (K + 1 active, 1 inactive)
    corrective_norm: jax.Array  # float32: ||g_tilde||
    initial_norm: jax.Array  # float32: ||g0||
    cos_corrective_initial: jax.Array  # float32: cos(g_tilde, g0)
    displacement_norm: jax.Array  # float32: ||theta_K - theta0||
    gate_z: jax.Array  # float32: z-score of ||g_tilde|| against the gate's window


class SFPOState(NamedTuple):
    inner_state: optax.OptState  # state of the wrapped optimizer
    gate: GateState | optax.EmptyState  # EmptyState when gate=None
    info: SFPOInfo  # diagnostics of the latest step; read with optax.tree.get(state, "info")


def _empty_info(initial_norm: jax.Array | float = 0.0) -> SFPOInfo:
    zero_f = jnp.zeros((), jnp.float32)
    return SFPOInfo(
        active=jnp.zeros((), jnp.int32),
        fallback=jnp.zeros((), jnp.int32),
        grad_evals=jnp.ones((), jnp.int32),
        corrective_norm=zero_f,
        initial_norm=jnp.asarray(initial_norm, jnp.float32),
        cos_corrective_initial=zero_f,
        displacement_norm=zero_f,
        gate_z=zero_f,
    )


def sfpo(
    inner: optax.GradientTransformation,
    loss_fn: Callable[..., Any] | None = None,
    *,
    fast_steps: int = 3,
    reposition: float = 0.8,
    gate: ZScoreGate | None = ZScoreGate(),  # noqa: B008 (immutable NamedTuple)
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Slow-Fast Policy Optimization (SFPO).

    Takes K real ``inner`` steps on one fixed batch (the fast trajectory),
    pulls the endpoint back towards the start, and finishes with one
    corrective inner step::

      θ_0 = params;  for k = 1..K:  g = ∇L(θ_{k-1})  (g_0 from the caller at k = 1)
                                    u, S = inner.update(g, S, θ_{k-1});  θ_k = θ_{k-1} + u
      θ̃     = θ_0 + α (θ_K - θ_0)
      u, S  = inner.update(∇L(θ̃), S, θ̃);  θ_new = θ̃ + u

    K + 1 gradient evaluations per step (K new ones; g_0 is the caller's), and
    the inner state advances K + 1 times. The returned updates are
    ``θ_new - θ_0``. ``gate`` and the non-finite fallback behave as in
    :func:`gxpo.optim.gxpo`, observing :math:`\|\nabla L(\tilde\theta)\|`.

    Diagnostics: the state holds an ``SFPOInfo`` of the latest step in its
    field ``info``. Read it with ``optax.tree.get(opt_state, "info")``, which
    finds it wherever the combinator sits: alone, inside ``optax.chain``,
    ``optax.inject_hyperparams``, ``optax.with_extra_args_support``, or as the
    ``opt_state`` of an ``nnx.Optimizer`` (its fields are then ``OptArray``
    variables); it returns None for a state without it (a plain optimizer).

    Symbols and arguments: K = ``fast_steps``, α = ``reposition``.

    Args:
      inner: the base optimizer, e.g. ``optax.adamw(1e-6)``.
      loss_fn: ``loss_fn(params, **extra_args) -> loss`` (or ``(loss, aux)``
        with ``has_aux``). If None, ``update`` needs ``grad_fn=``.
      fast_steps: K >= 1, the number of fast inner steps.
      reposition: α in [0, 1].
      gate: a ``ZScoreGate`` deciding when to stop the fast loop, or None.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    α may be injected: ``optax.inject_hyperparams(sfpo, static_args=("loss_fn",
    "fast_steps"))(inner, loss_fn, reposition=...)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``, with the caller's gradient
      at ``params`` as ``update``'s ``updates``. Its state is an ``SFPOState``.

    Raises:
      ValueError: for a bad argument, with the message "sfpo: `<argument>`
        <rule>, got <value>." (the keyword's exact name), or "ZScoreGate:
        `<field>` <rule>, got <value>." for a bad field of ``gate``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from gxpo.optim import sfpo
      >>> loss = lambda p: 0.5 * jnp.sum(p ** 2)
      >>> tx = sfpo(optax.sgd(0.1), loss, fast_steps=3, reposition=0.8)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
      >>> int(optax.tree.get(state, "info").grad_evals)
      4

    References:
      Wang et al., Slow-Fast Policy Optimization: Reposition-Before-Update for
      LLM Reasoning, ICLR 2026.
    """
    _common.check_common("sfpo", inner, loss_fn, reposition, gate, has_aux)
    if not (is_int(fast_steps) and fast_steps >= 1):
        raise argument_error("sfpo", "fast_steps", "must be an int >= 1", fast_steps)

    def init_fn(params: optax.Params) -> SFPOState:
        return SFPOState(
            inner_state=inner.init(params),
            gate=_common.init_gate(gate),
            info=_empty_info(),
        )

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        grad = _common.resolve_grad_fn("sfpo", loss_fn, has_aux, grad_fn, params, extra_args)
        g0 = updates
        u0, s1 = inner.update(g0, state.inner_state, params)
        g0_norm = _common.norm_f32(g0)

        def fast_then_correct():
            def fast_step(_, carry):
                theta, inner_state, ok = carry
                g = grad(theta)
                u, inner_state = inner.update(g, inner_state, theta)
                return optax.apply_updates(theta, u), inner_state, ok & _common.all_finite(g)

            theta_1 = optax.apply_updates(params, u0)
            theta_k, s_k, ok = jax.lax.fori_loop(
                1, fast_steps, fast_step, (theta_1, s1, jnp.ones((), jnp.bool_))
            )
            theta_tilde = jax.tree.map(
                lambda t0, tk: (t0 + reposition * (tk - t0)).astype(t0.dtype), params, theta_k
            )
            g_tilde = grad(theta_tilde)
            u, s_new = inner.update(g_tilde, s_k, theta_tilde)
            theta_new = optax.apply_updates(theta_tilde, u)
            new_updates = _common.displacement(theta_new, params)
            ok = ok & _common.all_finite((g_tilde, new_updates))

            g_tilde_norm = _common.norm_f32(g_tilde)
            new_gate, z = _common.observe_gate(gate, state.gate, g_tilde_norm, ok)
            info = SFPOInfo(
                active=jnp.ones((), jnp.int32),
                fallback=(~ok).astype(jnp.int32),
                grad_evals=jnp.full((), fast_steps + 1, jnp.int32),
                corrective_norm=g_tilde_norm,
                initial_norm=g0_norm,
                cos_corrective_initial=_common.cosine_f32(g_tilde, g0),
                displacement_norm=_common.norm_f32(optax.tree.sub(theta_k, params)),
                gate_z=z,
            )
            out_updates = optax.tree.where(ok, new_updates, u0)
            out_inner = optax.tree.where(ok, s_new, s1)
            return out_updates, SFPOState(out_inner, new_gate, info)

        def plain():
            return u0, SFPOState(s1, state.gate, _empty_info(g0_norm))

        return _common.gated(gate, state.gate, fast_then_correct, plain)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
