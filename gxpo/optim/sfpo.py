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
    grad_evals: (
        jax.Array
    )  # int32: gradient evaluations ((K + 1) M active, M inactive; M mini-batches)
    corrective_norm: jax.Array  # float32: ||g_tilde||
    initial_norm: jax.Array  # float32: ||g0||
    cos_corrective_initial: jax.Array  # float32: cos(g_tilde, g0)
    displacement_norm: jax.Array  # float32: ||theta_K - theta0||
    gate_z: jax.Array  # float32: z-score of the gate's value against its window
    degenerate: jax.Array  # int32: 1 if ||g0|| was non-finite or <= min_initial_norm (plain step)
    gate_value: jax.Array  # float32: the value the gate observed (its statistic)


class SFPOState(NamedTuple):
    inner_state: optax.OptState  # state of the wrapped optimizer
    gate: GateState | optax.EmptyState  # EmptyState when gate=None
    info: SFPOInfo  # diagnostics of the latest step; read with optax.tree.get(state, "info")


def _empty_info(
    initial_norm: jax.Array | float = 0.0, grad_evals: int = 1, degenerate: jax.Array | int = 0
) -> SFPOInfo:
    zero_f = jnp.zeros((), jnp.float32)
    return SFPOInfo(
        active=jnp.zeros((), jnp.int32),
        fallback=jnp.zeros((), jnp.int32),
        grad_evals=jnp.full((), grad_evals, jnp.int32),
        corrective_norm=zero_f,
        initial_norm=jnp.asarray(initial_norm, jnp.float32),
        cos_corrective_initial=zero_f,
        displacement_norm=zero_f,
        gate_z=zero_f,
        degenerate=jnp.asarray(degenerate, jnp.int32),
        gate_value=zero_f,
    )


def sfpo(
    inner: optax.GradientTransformation,
    loss_fn: Callable[..., Any] | None = None,
    *,
    fast_steps: int = 3,
    reposition: float = 0.8,
    gate: ZScoreGate | None = ZScoreGate(),  # noqa: B008 (immutable NamedTuple)
    has_aux: bool = False,
    mini_batches: int | None = None,
    min_initial_norm: float | None = None,
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
    ``θ_new - θ_0``. ``gate``, ``min_initial_norm`` and the non-finite fallback
    behave as in :func:`gxpo.optim.gxpo`, the gate observing its statistic at
    :math:`\tilde\theta` (:math:`\|\nabla L(\tilde\theta)\|` by default).

    With ``mini_batches = M > 1`` (SFPO as its authors run it) one step is one
    rollout batch of M mini-batches: each fast step, and the slow step from
    :math:`\tilde\theta`, is a pass of M inner updates, one per mini-batch in
    order, the inner state carried through (never reset); ``updates`` is the
    gradient of mini-batch 0 at θ_0 and the gradient oracle takes the mini-batch
    index, ``grad_fn(params, j)`` (or ``loss_fn(params, **extra_args)`` with every
    extra argument stacked over a leading axis of M, sliced at j). That is
    (K + 1) M gradient evaluations; the gate sees the mean of its statistic over
    the slow pass, and a plain step is one pass of M inner updates.

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
      mini_batches: M, see above; None (the paper's reading) is M = 1. An int:
        list it in ``static_args`` under ``optax.inject_hyperparams``.
      min_initial_norm: None, or a number >= 0: a step whose ``‖g_0‖`` is not
        finite or ``<= min_initial_norm`` is the plain step, flagged
        ``degenerate`` and not shown to the gate.

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
    if mini_batches is not None and not (is_int(mini_batches) and mini_batches >= 1):
        rule = "must be an int >= 1 or None"
        raise argument_error("sfpo", "mini_batches", rule, mini_batches)
    _common.check_min_initial_norm("sfpo", min_initial_norm)
    m = 1 if mini_batches is None else mini_batches

    def init_fn(params: optax.Params) -> SFPOState:
        return SFPOState(
            inner_state=inner.init(params),
            gate=_common.init_gate(gate),
            info=_empty_info(),
        )

    def oracles(grad_fn, aux_grad_fn, params, extra_args):
        """(grad(p, j), aux_grad(p, j) or None): mini-batch j's gradient (j ignored if M = 1)."""
        if m == 1:
            grad = _common.resolve_grad_fn("sfpo", loss_fn, has_aux, grad_fn, params, extra_args)
            aux_grad = None
            if gate is not None and gate.needs_aux:
                aux_grad = _common.resolve_aux_grad_fn(
                    "sfpo", loss_fn, has_aux, aux_grad_fn, extra_args
                )
            return (lambda p, j: grad(p)), (None if aux_grad is None else lambda p, j: aux_grad(p))
        if params is None:
            rule = "must be given to update: tx.update(grads, state, params, ...)"
            raise argument_error("sfpo", "params", rule, params)

        def sliced(j):
            return jax.tree.map(
                lambda x: jax.lax.dynamic_index_in_dim(x, j, keepdims=False), extra_args
            )

        if grad_fn is not None:
            grad = grad_fn
        elif loss_fn is not None:
            g = jax.grad(loss_fn, has_aux=has_aux)
            grad = (
                (lambda p, j: g(p, **sliced(j))[0]) if has_aux else (lambda p, j: g(p, **sliced(j)))
            )
        else:
            rule = (
                "(params, j -> mini-batch j's grads) must be given to update when sfpo(...) "
                "has no `loss_fn`"
            )
            raise argument_error("sfpo", "grad_fn", rule, grad_fn)
        aux_grad = None
        if gate is not None and gate.needs_aux:
            if aux_grad_fn is not None:
                aux_grad = aux_grad_fn
            elif loss_fn is not None and has_aux:
                ga = jax.grad(loss_fn, has_aux=True)
                aux_grad = lambda p, j: ga(p, **sliced(j))  # noqa: E731
            else:
                rule = (
                    "(params, j -> (grads, aux)) must be given to update when the gate's "
                    "`statistic` reads the loss's aux output and sfpo(...) has no `loss_fn` "
                    "with has_aux=True"
                )
                raise argument_error("sfpo", "aux_grad_fn", rule, aux_grad_fn)
        return grad, aux_grad

    def one_pass(grad, theta, inner_state, start=0):
        """Inner updates from theta on mini-batches start..M-1 in order; returns (theta, inner
        state, all their gradients finite)."""

        def body(j, carry):
            theta, inner_state, ok = carry
            g = grad(theta, j)
            u, inner_state = inner.update(g, inner_state, theta)
            return optax.apply_updates(theta, u), inner_state, ok & _common.all_finite(g)

        ok = jnp.ones((), jnp.bool_)
        if start >= m:
            return theta, inner_state, ok
        return jax.lax.fori_loop(start, m, body, (theta, inner_state, ok))

    def update_fn(updates, state, params=None, *, grad_fn=None, aux_grad_fn=None, **extra_args):
        grad, aux_grad = oracles(grad_fn, aux_grad_fn, params, extra_args)
        g0 = updates
        u0, s1 = inner.update(g0, state.inner_state, params)  # mini-batch 0's step from θ_0
        g0_norm = _common.norm_f32(g0)
        healthy = _common.healthy_initial(g0_norm, min_initial_norm)

        def fast_then_correct():
            # Fast trajectory: K passes from θ_0 (the first one's step 0 is u0 above).
            theta_1, s_1, ok = one_pass(grad, optax.apply_updates(params, u0), s1, start=1)

            def fast_step(_, carry):
                theta, inner_state, ok = carry
                theta, inner_state, ok_pass = one_pass(grad, theta, inner_state)
                return theta, inner_state, ok & ok_pass

            theta_k, s_k, ok = jax.lax.fori_loop(1, fast_steps, fast_step, (theta_1, s_1, ok))
            theta_tilde = jax.tree.map(
                lambda t0, tk: (t0 + reposition * (tk - t0)).astype(t0.dtype), params, theta_k
            )

            # Slow step from θ̃: one pass, observing the gate's statistic at each mini-batch.
            def slow(j, carry):
                theta, inner_state, ok, norm_sum, value_sum, g_first = carry
                if aux_grad is None:
                    g, aux = grad(theta, j), None
                else:
                    g, aux = aux_grad(theta, j)
                norm = _common.norm_f32(g)
                value = norm if gate is None else gate.observed_value(norm, aux)
                u, inner_state = inner.update(g, inner_state, theta)
                g_first = jax.tree.map(lambda a, b: jnp.where(j == 0, b, a), g_first, g)
                return (
                    optax.apply_updates(theta, u),
                    inner_state,
                    ok & _common.all_finite(g),
                    norm_sum + norm,
                    value_sum + value,
                    g_first,
                )

            zero = jnp.zeros((), jnp.float32)
            carry = (theta_tilde, s_k, ok, zero, zero, jax.tree.map(jnp.zeros_like, g0))
            theta_new, s_new, ok, norm_sum, value_sum, g_tilde = (
                slow(0, carry) if m == 1 else jax.lax.fori_loop(0, m, slow, carry)
            )
            new_updates = _common.displacement(theta_new, params)
            ok = ok & _common.all_finite(new_updates)

            g_tilde_norm = norm_sum / m
            value = value_sum / m
            if gate is None:
                new_gate, z = state.gate, jnp.zeros((), jnp.float32)
            else:
                observed, z = gate.update(state.gate, value)
                new_gate = optax.tree.where(ok, observed, state.gate)
                z = jnp.where(ok, z, 0.0)
            info = SFPOInfo(
                active=jnp.ones((), jnp.int32),
                fallback=(~ok).astype(jnp.int32),
                grad_evals=jnp.full((), (fast_steps + 1) * m, jnp.int32),
                corrective_norm=g_tilde_norm,
                initial_norm=g0_norm,
                cos_corrective_initial=_common.cosine_f32(g_tilde, g0),
                displacement_norm=_common.norm_f32(optax.tree.sub(theta_k, params)),
                gate_z=z,
                degenerate=jnp.zeros((), jnp.int32),
                gate_value=jnp.where(gate is not None, value, 0.0),
            )
            # A non-finite gradient: the plain inner step from g0 (state S_1), as in gxpo.
            out_updates = optax.tree.where(ok, new_updates, u0)
            out_inner = optax.tree.where(ok, s_new, s1)
            return out_updates, SFPOState(out_inner, new_gate, info)

        def plain():
            degenerate = jnp.zeros((), jnp.bool_) if healthy is None else ~healthy
            if gate is not None:
                degenerate = degenerate & state.gate.on
            if m == 1:  # exactly inner.update(g0, S, θ_0)
                new_updates, inner_state = u0, s1
            else:  # the rest of one pass over the mini-batches
                theta, inner_state, _ = one_pass(grad, optax.apply_updates(params, u0), s1, 1)
                new_updates = _common.displacement(theta, params)
            info = _empty_info(g0_norm, m, degenerate)
            return new_updates, SFPOState(inner_state, _common.idle_gate(gate, state.gate), info)

        return _common.gated(gate, state.gate, healthy, fast_then_correct, plain)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
