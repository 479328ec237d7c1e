"""GXPO: Gradient Extrapolation-Based Policy Optimization, as an Optax combinator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gxpo.optim import _common
from gxpo.optim._checks import argument_error, is_int, is_real, is_traced
from gxpo.optim.gate import GateState, ZScoreGate

_PROBE_STATES = ("keep", "restore")
_RETENTIONS = ("gradient", "clipped_gradient", "update")

# (updates, params) -> the direction retention compares, for retention="update"
UpdateDirection = Callable[[optax.Updates, optax.Params], optax.Updates]


class GXPOInfo(NamedTuple):
    """Diagnostics of the latest step; every field a scalar array."""

    active: jax.Array  # int32: 1 if this step extrapolated (gate on)
    fallback: jax.Array  # int32: 1 if a non-finite probe forced the plain inner step
    grad_evals: jax.Array  # int32: gradient evaluations this step (3 active, 1 inactive)
    retention_mean: jax.Array  # float32: mean of r over active coordinates
    retention_std: jax.Array  # float32: population std of r over active coordinates
    scale_mean: jax.Array  # float32: mean of the scale s over all coordinates
    inactive_fraction: jax.Array  # float32: fraction of coordinates outside the active set
    corrective_norm: jax.Array  # float32: ||g_tilde||
    initial_norm: jax.Array  # float32: ||g0||
    cos_corrective_initial: jax.Array  # float32: cos(g_tilde, g0)
    displacement_norm: jax.Array  # float32: ||theta2 - theta0||
    gate_z: jax.Array  # float32: z-score of the gate's value against its window
    degenerate: jax.Array  # int32: 1 if ||g0|| was non-finite or <= min_initial_norm (plain step)
    retention_mean_all: jax.Array  # float32: mean of r over all coordinates (inactive ones as 1)
    gate_value: jax.Array  # float32: the value the gate observed (its statistic)


class GXPOState(NamedTuple):
    inner_state: optax.OptState  # state of the wrapped optimizer
    gate: GateState | optax.EmptyState  # EmptyState when gate=None
    info: GXPOInfo  # diagnostics of the latest step; read with optax.tree.get(state, "info")


class LeafSums(NamedTuple):
    """One leaf's float32 sums behind the diagnostics; the step adds them over leaves."""

    active: jax.Array  # coordinates in the active set
    retention: jax.Array  # sum of r over active coordinates
    retention_all: jax.Array  # sum of r over all coordinates (1 on inactive ones)
    retention_sq: jax.Array  # sum of r^2 over active coordinates
    scale: jax.Array  # sum of s over all coordinates
    displacement_sq: jax.Array  # sum of d^2 over all coordinates


def _empty_info(initial_norm: jax.Array | float = 0.0, degenerate: jax.Array | int = 0) -> GXPOInfo:
    zero_i = jnp.zeros((), jnp.int32)
    zero_f = jnp.zeros((), jnp.float32)
    return GXPOInfo(
        active=zero_i,
        fallback=zero_i,
        grad_evals=jnp.ones((), jnp.int32),
        retention_mean=zero_f,
        retention_std=zero_f,
        scale_mean=zero_f,
        inactive_fraction=zero_f,
        corrective_norm=zero_f,
        initial_norm=jnp.asarray(initial_norm, jnp.float32),
        cos_corrective_initial=zero_f,
        displacement_norm=zero_f,
        gate_z=zero_f,
        degenerate=jnp.asarray(degenerate, jnp.int32),
        retention_mean_all=zero_f,
        gate_value=zero_f,
    )


def adamw_direction(learning_rate: float, weight_decay: float) -> UpdateDirection:
    r"""The direction AdamW applied, for ``gxpo(..., retention="update", update_direction=...)``.

    AdamW's update is ``u = -lr (m̂ / (√v̂ + ε) + wd θ)``, so its Adam direction is
    ``-u / lr - wd θ`` (the authors' ``((1 - lr wd) θ_t - θ_{t+1}) / lr``). Exact for a
    constant learning rate; under a schedule pass the rate the probes run at.

    Args:
      learning_rate: AdamW's learning rate (a number > 0).
      weight_decay: AdamW's decoupled weight decay.

    Returns:
      ``(updates, params) -> direction``, leaf by leaf.
    """
    if not (is_real(learning_rate) and learning_rate > 0):
        rule = "must be a number > 0"
        raise argument_error("adamw_direction", "learning_rate", rule, learning_rate)
    if not (is_real(weight_decay) and weight_decay >= 0):
        rule = "must be a number >= 0"
        raise argument_error("adamw_direction", "weight_decay", rule, weight_decay)

    def direction(updates: optax.Updates, params: optax.Params) -> optax.Updates:
        return jax.tree.map(lambda u, p: -u / learning_rate - weight_decay * p, updates, params)

    return direction


def _wide_norm(tree: Any) -> jax.Array:
    """Global L2 norm in at least float32 (float64 leaves keep float64): the clip factor of
    retention="clipped_gradient" scales r, so it is as precise as r itself."""
    sq = [
        jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))
        for x in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(sq))


def _geometric_sum(r: jax.Array, n: int) -> jax.Array:
    """S_n(r) = 1 + r + ... + r^(n-1) by Horner's rule (no division, exact at r = 1)."""
    s = jnp.ones_like(r)
    for _ in range(n - 1):
        s = 1.0 + r * s
    return s


def _check_pair(argument: str, value: Any) -> tuple[float | None, float | None]:
    rule = "must be a pair (low, high) of numbers or None"
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise argument_error("gxpo", argument, rule, value) from None
    if not all(x is None or is_real(x) for x in (lo, hi)):
        raise argument_error("gxpo", argument, rule, value)
    if lo is not None and hi is not None and not lo <= hi:
        raise argument_error("gxpo", argument, "must have low <= high", value)
    return lo, hi


def gxpo(
    inner: optax.GradientTransformation,
    loss_fn: Callable[..., Any] | None = None,
    *,
    virtual_depth: int = 5,
    reposition: float = 0.5,
    active_threshold: float = 1e-3,
    ratio_clip: tuple[float | None, float | None] = (-2.0, 3.0),
    scale_clip: tuple[float | None, float | None] = (1.0, None),
    gate: ZScoreGate | None = ZScoreGate(),  # noqa: B008 (immutable NamedTuple)
    probe_state: str = "keep",
    has_aux: bool = False,
    retention: str = "gradient",
    grad_clip: float | None = None,
    update_direction: UpdateDirection | None = None,
    min_initial_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient Extrapolation-Based Policy Optimization (GXPO).

    Approximates K steps of ``inner`` on one fixed batch with three gradient
    evaluations. From the caller's gradient :math:`g_0` at :math:`\theta_0`, it
    takes two real inner steps, reads off each coordinate's gradient retention
    ratio, extrapolates the displacement to K steps as if every coordinate's
    gradient decayed geometrically, moves part of the way there, and finishes
    with one corrective inner step::

      u_0, S_1 = inner.update(g_0, S_0, θ_0);        θ_1 = θ_0 + u_0
      g_1      = ∇L(θ_1)
      u_1, S_2 = inner.update(g_1, S_1, θ_1);        θ_2 = θ_1 + u_1
      d        = θ_2 - θ_0
      active   = |g_0| > τ · RMS(g_0 over its leaf)  and  g_0 ≠ 0
      r        = clip(g_1 / g_0, *ratio_clip) on active coordinates, else 1
      s        = clip(S_K(r) / S_2(r), *scale_clip) on active coordinates, else 1
                 with S_n(r) = 1 + r + ... + r^(n-1)
      θ̂        = θ_0 + s · d                         (predicted K-step point)
      θ̃        = θ_0 + α (θ̂ - θ_0)                   (reposition)
      g̃        = ∇L(θ̃)
      u_2, S_3 = inner.update(g̃, S_c, θ̃);           θ_new = θ̃ + u_2

    where ``S_c = S_2`` (``probe_state="keep"``) or ``S_0`` (``"restore"``).
    The returned updates are ``θ_new - θ_0``, so ``optax.apply_updates(params,
    updates)`` gives ``θ_new`` and the combinator composes like any transform.
    Products, ratios and clips are per coordinate. With ``inner=optax.sgd(η)``
    on a quadratic with ``0 < η λ_i < 1``, ``α = 1`` and no clip binding, one
    step lands exactly on the (K+1)-th gradient-descent iterate.

    The inner state advances three times per active step with ``"keep"``
    and once with ``"restore"``, so a schedule inside ``inner`` counts inner
    updates, not GXPO steps.

    Retention (``retention``) says what r compares, coordinate by coordinate:

    - ``"gradient"`` (the paper): ``r = g_1 / g_0``, the raw gradients.
    - ``"clipped_gradient"``: the gradients as clipped for the probe steps,
      ``r = (c_1 g_1) / (c_0 g_0)`` with ``c_i = min(1, grad_clip / (‖g_i‖ +
      1e-12))``; ``grad_clip`` must be the global-norm clip inside ``inner``
      (the combinator cannot see into ``inner``).
    - ``"update"`` (the authors' default): the inner optimizer's update
      directions, ``r = D(u_1, θ_1) / D(u_0, θ_0)``, the active set and the clips
      taken on ``D(u_0, θ_0)``. ``D = update_direction``; None uses the updates
      themselves, which is exact for any inner optimizer whose update is a
      constant learning rate times its direction (Adam, AdamW with weight decay
      0, SGD, a clip in front). For AdamW with weight decay pass
      ``update_direction=adamw_direction(lr, weight_decay)``, which removes the
      learning rate and the decoupled decay. For other optimizers ``D`` defines
      the direction; with None the ratio includes whatever the update includes.

    A ``gate`` watches its statistic (:math:`\|\tilde g\|` by default, or a
    value of the loss's aux output at :math:`\tilde θ`, see ``ZScoreGate``);
    while it is off, a step is exactly ``inner.update(g_0, S, θ_0)`` and
    evaluates no probe gradient (the branch is a ``jax.lax.cond``). With
    ``min_initial_norm`` set, a step whose :math:`\|g_0\|` is not finite or is
    ``<= min_initial_norm`` is that same plain step (the caller's gradient is the
    only one), sets the ``degenerate`` diagnostic and is not shown to the gate.
    If a probe or corrective gradient is not finite, the step falls back to the
    plain inner step from :math:`g_0` and sets the ``fallback`` diagnostic.

    Diagnostics: the state holds a ``GXPOInfo`` of the latest step in its field
    ``info``. Read it with ``optax.tree.get(opt_state, "info")``, which finds it
    wherever the combinator sits: alone, inside ``optax.chain``,
    ``optax.inject_hyperparams``, ``optax.with_extra_args_support``, or as the
    ``opt_state`` of an ``nnx.Optimizer`` (its fields are then ``OptArray``
    variables); it returns None for a state without it (a plain optimizer).

    Symbols and arguments: K = ``virtual_depth``, α = ``reposition``,
    τ = ``active_threshold``, ``inner`` the base optimizer, L = ``loss_fn``.

    Args:
      inner: the base optimizer, e.g. ``optax.adamw(1e-6)``. To clip every
        gradient GXPO sees, put the clip inside: ``optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-6))``.
      loss_fn: ``loss_fn(params, **extra_args) -> loss`` (or ``(loss, aux)``
        with ``has_aux``), evaluated at the probe points with the extra keyword
        arguments given to ``update``. If None, ``update`` needs ``grad_fn=``.
      virtual_depth: K >= 2, the number of inner steps the step emulates.
      reposition: α in [0, 1]; 1 jumps to the predicted K-step point, 0 stays
        at θ_0 (then the step is one corrective inner step from θ_0).
      active_threshold: τ; coordinates with tiny first gradients are not
        extrapolated (their ratio is noise).
      ratio_clip: (low, high) bounds on r; None leaves a side open.
      scale_clip: (low, high) bounds on s; ``high=None`` means K/2 + 1.
      gate: a ``ZScoreGate`` deciding when to stop extrapolating, or None.
      probe_state: ``"keep"`` (the paper) or ``"restore"``: the inner state
        the corrective step starts from.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      retention: ``"gradient"`` (the paper), ``"clipped_gradient"`` or
        ``"update"`` (the authors), see above.
      grad_clip: the global-norm clip inside ``inner``; used (and needed) by
        ``retention="clipped_gradient"`` only.
      update_direction: ``(updates, params) -> direction`` for
        ``retention="update"`` (e.g. ``adamw_direction(lr, wd)``); None: the
        updates themselves.
      min_initial_norm: None (the paper: always extrapolate while the gate is
        on) or a number >= 0 (the authors: 1e-8), see above.

    The floats α and τ may be injected: ``optax.inject_hyperparams(gxpo,
    static_args=("loss_fn", "virtual_depth"))(inner, loss_fn, reposition=...)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its ``update(updates,
      state, params, *, grad_fn=None, aux_grad_fn=None, **extra_args)`` takes
      the caller's gradient at ``params`` as ``updates``; ``grad_fn`` (params ->
      grads) replaces ``loss_fn`` at the probe points, and ``aux_grad_fn``
      (params -> (grads, aux)) at the corrective point when the gate's
      statistic reads aux. Its state is a ``GXPOState``.

    Raises:
      ValueError: for a bad argument, with the message "gxpo: `<argument>`
        <rule>, got <value>." (the keyword's exact name), or "ZScoreGate:
        `<field>` <rule>, got <value>." for a bad field of ``gate``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from gxpo.optim import gxpo
      >>> loss = lambda p, scale: 0.5 * scale * jnp.sum(p ** 2)
      >>> tx = gxpo(optax.sgd(0.1), loss, virtual_depth=5, reposition=1.0)
      >>> params = jnp.array([1.0, -2.0])
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss)(params, scale=1.0)
      >>> updates, state = tx.update(grads, state, params, scale=1.0)
      >>> params = optax.apply_updates(params, updates)  # = 0.9**6 * [1, -2]
      >>> int(optax.tree.get(state, "info").grad_evals)
      3

    References:
      Gradient Extrapolation-Based Policy Optimization (GXPO), 2026.
      Wang et al., Slow-Fast Policy Optimization, ICLR 2026.
    """
    _common.check_common("gxpo", inner, loss_fn, reposition, gate, has_aux)
    if not (is_int(virtual_depth) and virtual_depth >= 2):
        raise argument_error("gxpo", "virtual_depth", "must be an int >= 2", virtual_depth)
    if probe_state not in _PROBE_STATES:
        rule = f"must be one of {_PROBE_STATES}"
        raise argument_error("gxpo", "probe_state", rule, probe_state)
    if not is_traced(active_threshold) and not (
        is_real(active_threshold) and active_threshold >= 0
    ):
        raise argument_error("gxpo", "active_threshold", "must be a number >= 0", active_threshold)
    if retention not in _RETENTIONS:
        raise argument_error("gxpo", "retention", f"must be one of {_RETENTIONS}", retention)
    if grad_clip is not None and not (
        is_traced(grad_clip) or (is_real(grad_clip) and grad_clip > 0)
    ):
        raise argument_error("gxpo", "grad_clip", "must be a number > 0 or None", grad_clip)
    if retention == "clipped_gradient" and grad_clip is None:
        rule = (
            "must be the inner optimizer's global-norm clip (> 0) with retention='clipped_gradient'"
        )
        raise argument_error("gxpo", "grad_clip", rule, grad_clip)
    if update_direction is not None and not callable(update_direction):
        rule = "must be callable (updates, params) -> direction, or None"
        raise argument_error("gxpo", "update_direction", rule, update_direction)
    _common.check_min_initial_norm("gxpo", min_initial_norm)
    r_lo, r_hi = _check_pair("ratio_clip", ratio_clip)
    s_lo, s_hi = _check_pair("scale_clip", scale_clip)
    if s_hi is None:
        s_hi = virtual_depth / 2 + 1
    if s_lo is not None and not s_lo <= s_hi:
        rule = f"must have low <= virtual_depth / 2 + 1 = {s_hi} (its high when None)"
        raise argument_error("gxpo", "scale_clip", rule, scale_clip)
    k = virtual_depth

    def init_fn(params: optax.Params) -> GXPOState:
        return GXPOState(
            inner_state=inner.init(params),
            gate=_common.init_gate(gate),
            info=_empty_info(),
        )

    def leaf_extrapolate(g0, g1, t0, t2):
        """One leaf: the repositioned point and the leaf's diagnostic sums; g0, g1 are the
        retention signals (gradients, clipped gradients or update directions)."""
        dt = jnp.promote_types(t0.dtype, jnp.float32)
        g0, g1, t0f, t2f = (x.astype(dt) for x in (g0, g1, t0, t2))
        d = t2f - t0f
        rms = jnp.sqrt(jnp.mean(jnp.square(g0)))
        active = (jnp.abs(g0) > active_threshold * rms) & (g0 != 0)
        r = jnp.where(active, g1 / jnp.where(active, g0, 1.0), 1.0)
        r = jnp.clip(r, min=r_lo, max=r_hi)
        r = jnp.where(jnp.isfinite(r), r, 1.0)
        s2 = _geometric_sum(r, 2)
        ok = jnp.abs(s2) > 1e-8
        s = jnp.where(ok, _geometric_sum(r, k) / jnp.where(ok, s2, 1.0), 1.0)
        s = jnp.where(active, jnp.clip(s, min=s_lo, max=s_hi), 1.0)
        theta_hat = t0f + s * d
        theta_tilde = t0f + reposition * (theta_hat - t0f)
        af = active.astype(jnp.float32)
        r32 = r.astype(jnp.float32)
        sums = LeafSums(
            active=jnp.sum(af),
            retention=jnp.sum(af * r32),
            retention_all=jnp.sum(r32),
            retention_sq=jnp.sum(af * r32 * r32),
            scale=jnp.sum(s.astype(jnp.float32)),
            displacement_sq=jnp.sum(jnp.square(d.astype(jnp.float32))),
        )
        return theta_tilde.astype(t0.dtype), sums

    def retention_signals(g0, g1, u0, u1, theta1, params):
        """The two trees whose per-coordinate ratio is r."""
        if retention == "gradient":
            return g0, g1
        if retention == "clipped_gradient":
            c0 = jnp.minimum(1.0, grad_clip / (_wide_norm(g0) + 1e-12))
            c1 = jnp.minimum(1.0, grad_clip / (_wide_norm(g1) + 1e-12))
            c = c1 / c0  # (c1 g1) / (c0 g0) = (c1 / c0) g1 / g0; the active set is g0's
            return g0, jax.tree.map(lambda g: g * c.astype(g.dtype), g1)
        if update_direction is None:
            return u0, u1
        return update_direction(u0, params), update_direction(u1, theta1)

    def update_fn(updates, state, params=None, *, grad_fn=None, aux_grad_fn=None, **extra_args):
        grad = _common.resolve_grad_fn("gxpo", loss_fn, has_aux, grad_fn, params, extra_args)
        aux_grad = None
        if gate is not None and gate.needs_aux:
            aux_grad = _common.resolve_aux_grad_fn(
                "gxpo", loss_fn, has_aux, aux_grad_fn, extra_args
            )
        g0 = updates
        u0, s1 = inner.update(g0, state.inner_state, params)
        g0_norm = _common.norm_f32(g0)
        healthy = _common.healthy_initial(g0_norm, min_initial_norm)

        def extrapolate():
            theta1 = optax.apply_updates(params, u0)
            g1 = grad(theta1)
            u1, s2 = inner.update(g1, s1, theta1)
            theta2 = optax.apply_updates(theta1, u1)

            x0, x1 = retention_signals(g0, g1, u0, u1, theta1, params)
            leaves0, treedef = jax.tree.flatten(params)
            per_leaf = [
                leaf_extrapolate(*xs)
                for xs in zip(
                    jax.tree.leaves(x0), jax.tree.leaves(x1), leaves0, jax.tree.leaves(theta2)
                )
            ]
            theta_tilde = jax.tree.unflatten(treedef, [t for t, _ in per_leaf])
            sums = jax.tree.map(lambda *xs: sum(xs), *[leaf_sums for _, leaf_sums in per_leaf])
            n_total = float(optax.tree.size(params))

            g_tilde, aux = _common.corrective_gradient(grad, aux_grad, theta_tilde)
            s_c = s2 if probe_state == "keep" else state.inner_state
            u2, s3 = inner.update(g_tilde, s_c, theta_tilde)
            theta_new = optax.apply_updates(theta_tilde, u2)
            new_updates = _common.displacement(theta_new, params)

            ok = _common.all_finite((g1, g_tilde, new_updates))
            g_tilde_norm = _common.norm_f32(g_tilde)
            new_gate, value, z = _common.observe_gate(gate, state.gate, g_tilde_norm, aux, ok)

            r_mean = sums.retention / jnp.maximum(sums.active, 1.0)
            r_var = sums.retention_sq / jnp.maximum(sums.active, 1.0) - r_mean**2
            info = GXPOInfo(
                active=jnp.ones((), jnp.int32),
                fallback=(~ok).astype(jnp.int32),
                grad_evals=jnp.full((), 3, jnp.int32),
                retention_mean=r_mean,
                retention_std=jnp.sqrt(jnp.maximum(r_var, 0.0)),
                scale_mean=sums.scale / n_total,
                inactive_fraction=1.0 - sums.active / n_total,
                corrective_norm=g_tilde_norm,
                initial_norm=g0_norm,
                cos_corrective_initial=_common.cosine_f32(g_tilde, g0),
                displacement_norm=jnp.sqrt(sums.displacement_sq),
                gate_z=z,
                degenerate=jnp.zeros((), jnp.int32),
                retention_mean_all=sums.retention_all / n_total,
                gate_value=value,
            )
            out_updates = optax.tree.where(ok, new_updates, u0)
            out_inner = optax.tree.where(ok, s3, s1)
            return out_updates, GXPOState(out_inner, new_gate, info)

        def plain():
            # Degenerate: g0 was the reason, not the gate (which then is not shown the step).
            degenerate = jnp.zeros((), jnp.bool_) if healthy is None else ~healthy
            if gate is not None:
                degenerate = degenerate & state.gate.on
            info = _empty_info(g0_norm, degenerate)
            return u0, GXPOState(s1, _common.idle_gate(gate, state.gate), info)

        return _common.gated(gate, state.gate, healthy, extrapolate, plain)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
