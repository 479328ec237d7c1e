"""GXPO against its definition (docs/algorithms.md): exactness, a plain re-implementation,
fallback, argument checks, and compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gxpo.optim import ZScoreGate, gxpo

NO_CLIPS = dict(active_threshold=0.0, ratio_clip=(None, None), scale_clip=(None, None), gate=None)


# --- Corollary 2: sgd on a diagonal quadratic is reproduced exactly --------------------------


def _quadratic():
    lam = jnp.array([0.5, 1.0, 1.5, 2.0, 3.0], jnp.float64)
    theta0 = jnp.array([1.0, -2.0, 0.5, 3.0, -1.5], jnp.float64)
    return lam, theta0, lambda p: 0.5 * jnp.sum(lam * p**2)


def _rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_corollary2_one_step_is_k_plus_1_gd_steps(k):
    with jax.enable_x64(True):
        lam, theta0, loss = _quadratic()
        eta = 0.1  # eta * lam in (0, 1)
        tx = gxpo(optax.sgd(eta), loss, virtual_depth=k, reposition=1.0, **NO_CLIPS)
        state = tx.init(theta0)
        updates, state = tx.update(jax.grad(loss)(theta0), state, theta0)
        gd = theta0 * (1 - eta * lam) ** (k + 1)
        assert _rel_err(theta0 + updates, gd) < 1e-10
        assert int(state.info.grad_evals) == 3 and int(state.info.fallback) == 0


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_corollary2_t_steps_are_t_times_k_plus_1_gd_steps(k):
    with jax.enable_x64(True):
        lam, params, loss = _quadratic()
        eta, steps = 0.05, 4
        tx = gxpo(optax.sgd(eta), loss, virtual_depth=k, reposition=1.0, **NO_CLIPS)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(steps):
            updates, state = update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, updates)
        gd = _quadratic()[1] * (1 - eta * lam) ** (steps * (k + 1))
        assert _rel_err(params, gd) < 1e-10


# --- A plain re-implementation of docs/algorithms.md, coordinate by coordinate ----------------


def _loss(p, data):
    """Coupled, non-quadratic, so that g1/g0 spreads over a wide range.

    `p["frozen"]` does not enter the loss (exactly zero gradient), and the first
    row of `p["mixed"]` enters with a coefficient so small that its gradients fall
    under the active threshold relative to the leaf's RMS.
    """
    w, b = p["w"], p["b"]
    z = jnp.tanh(data @ w) + b
    main = jnp.sum((z - 0.3) ** 2) + 0.5 * jnp.sum(w**4) + jnp.sum(jnp.cos(3.0 * b))
    mixed = 1e-9 * jnp.sum(p["mixed"][0] ** 2) + jnp.sum(jnp.sin(p["mixed"][1:]))
    # Overshoot through the minimum (r < -2) and a steepening slope (r > 3).
    ctl = 0.5 * p["ctl"][0] ** 2 + p["ctl"][1] ** 3 / 3
    return main + mixed + ctl + 0.0 * jnp.sum(p["frozen"])


def _reference_gxpo(inner, params, state0, data, k, alpha, thr, rclip, sclip, probe_state):
    """docs/algorithms.md's pseudo-code, literally, on flat float64 NumPy vectors per leaf."""
    grad = jax.grad(_loss)
    g0 = grad(params, data)
    u0, s1 = inner.update(g0, state0, params)
    theta1 = jax.tree.map(lambda a, b: a + b, params, u0)
    g1 = grad(theta1, data)
    u1, s2 = inner.update(g1, s1, theta1)
    theta2 = jax.tree.map(lambda a, b: a + b, theta1, u1)

    theta_tilde, rs, ss, actives = {}, [], [], []
    for name in params:
        t0, t2 = np.asarray(params[name]), np.asarray(theta2[name])
        a, b = np.asarray(g0[name]).ravel(), np.asarray(g1[name]).ravel()
        rms = np.sqrt(np.mean(a**2))
        d = (t2 - t0).ravel()
        s = np.ones_like(d)
        for i in range(d.size):
            active = abs(a[i]) > thr * rms and a[i] != 0
            actives.append(active)
            r = 1.0
            if active:
                r = min(max(b[i] / a[i], rclip[0]), rclip[1])
                rs.append(r)
                s_k = sum(r**j for j in range(k))
                s_2 = 1 + r
                s[i] = s_k / s_2 if abs(s_2) > 1e-8 else 1.0
                s[i] = min(max(s[i], sclip[0]), sclip[1])
            ss.append(s[i])
        theta_hat = t0.ravel() + s * d
        theta_tilde[name] = (t0.ravel() + alpha * (theta_hat - t0.ravel())).reshape(t0.shape)
    theta_tilde = jax.tree.map(jnp.asarray, theta_tilde)
    g_tilde = grad(theta_tilde, data)
    s_c = s2 if probe_state == "keep" else state0
    u2, s3 = inner.update(g_tilde, s_c, theta_tilde)
    theta_new = jax.tree.map(lambda a, b: a + b, theta_tilde, u2)
    return theta_new, s3, np.array(rs), np.array(ss), np.array(actives)


@pytest.mark.parametrize("probe_state", ["keep", "restore"])
def test_matches_plain_reimplementation_with_adamw(probe_state):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = {
            "w": jnp.asarray(rng.normal(size=(4, 3))),
            "b": jnp.asarray(rng.normal(size=(3,))),
            "mixed": jnp.asarray(rng.normal(size=(3, 2))),
            "ctl": jnp.array([0.05, -0.1]),
            "frozen": jnp.asarray(rng.normal(size=(5,))),
        }
        data = jnp.asarray(rng.normal(size=(6, 4)))
        k, alpha, thr, rclip, sclip = 5, 0.5, 1e-3, (-2.0, 3.0), (1.0, 5 / 2 + 1)
        inner = optax.adamw(0.3, weight_decay=0.01)
        tx = gxpo(inner, _loss, virtual_depth=k, reposition=alpha, probe_state=probe_state)
        state = tx.init(params)
        # Non-trivial adam moments, from small gradients that barely change a step's size.
        noise = jax.tree.map(lambda x: 1e-3 * jnp.asarray(rng.normal(size=x.shape)), params)
        state = state._replace(inner_state=inner.update(noise, state.inner_state, params)[1])

        want, want_inner, rs, ss, actives = _reference_gxpo(
            inner, params, state.inner_state, data, k, alpha, thr, rclip, sclip, probe_state
        )
        g0 = jax.grad(_loss)(params, data)
        updates, new_state = jax.jit(tx.update)(g0, state, params, data=data)
        got = optax.apply_updates(params, updates)
        for name in params:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-11, atol=1e-12)
        for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(want_inner)):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)

        # The example exercises what it claims to: both ratio clips, the scale clip, and
        # the inactive set (a zero-gradient leaf and a row of tiny gradients).
        assert (rs == rclip[0]).any() and (rs == rclip[1]).any()
        assert (ss == sclip[1]).any() and (ss == sclip[0]).any()
        assert (~actives).sum() == params["frozen"].size + params["mixed"].shape[1]
        # Diagnostics are float32 by design: a sum of n <= 28 terms is off by n eps32 (3e-6)
        # of its terms' magnitudes: x sum|r| / |sum r| = 2.3 for the mean of r, x (E[r^2] +
        # mean^2) / var = 1.5 for the variance of r (half that for its std); 1 - n_active / n
        # (= 0.25) is off by eps32 / 2 x 0.75 / 0.25 (2e-7).
        info = new_state.info
        np.testing.assert_allclose(info.retention_mean, rs.mean(), rtol=1e-5)
        np.testing.assert_allclose(info.retention_std, rs.std(), rtol=1e-4)
        np.testing.assert_allclose(info.scale_mean, ss.mean(), rtol=1e-5)
        np.testing.assert_allclose(info.inactive_fraction, (~actives).mean(), rtol=1e-6)
        g0n = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(g0)))
        np.testing.assert_allclose(info.initial_norm, g0n, rtol=1e-5)
        assert int(info.active) == 1 and int(info.grad_evals) == 3
        assert 0.0 < float(info.cos_corrective_initial) <= 1.0


def test_restore_and_keep_differ():
    """The two probe_state choices are different algorithms, not aliases."""
    loss = lambda p: jnp.sum(jnp.cosh(p))
    params = jnp.array([1.0, -0.5, 2.0])
    outs = []
    for probe_state in ("keep", "restore"):
        tx = gxpo(optax.adam(0.1), loss, probe_state=probe_state)
        updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
        outs.append(updates)
    assert not np.allclose(outs[0], outs[1])


# --- Fallback on a non-finite probe or corrective gradient ------------------------------------


@pytest.mark.parametrize("bad_below", [0.95, 0.85], ids=["probe_nan", "corrective_nan"])
def test_nonfinite_gradient_falls_back_to_plain_inner_step(bad_below):
    # sgd(0.1) from 1.0: theta1 = 0.9, theta2 = 0.81, theta_tilde < 0.81. NaN below
    # `bad_below` poisons g1 (0.95) or only g_tilde (0.85).
    def loss(p):
        return 0.5 * jnp.sum(p**2) * jnp.where(p[0] < bad_below, jnp.nan, 1.0)

    params = jnp.array([1.0, 2.0])
    inner = optax.sgd(0.1, momentum=0.9)
    tx = gxpo(inner, loss, reposition=1.0)
    state = tx.init(params)
    g0 = jax.grad(loss)(params)
    updates, new_state = jax.jit(tx.update)(g0, state, params)
    want_updates, want_inner = inner.update(g0, inner.init(params), params)
    assert np.all(np.isfinite(updates))
    np.testing.assert_array_equal(updates, want_updates)
    for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(want_inner)):
        np.testing.assert_array_equal(a, b)
    assert int(new_state.info.fallback) == 1
    assert int(new_state.gate.count) == 0  # a failed step is not observed by the gate


# --- grad_fn instead of loss_fn, has_aux -------------------------------------------------------


def test_grad_fn_and_has_aux_match_loss_fn():
    with jax.enable_x64(True):
        loss = lambda p, x: jnp.sum((x * p - 1.0) ** 2)
        params, x = jnp.array([0.3, -1.0, 2.0]), jnp.array([1.0, 2.0, 0.5])
        ref_tx = gxpo(optax.adam(0.05), loss)
        want, _ = ref_tx.update(jax.grad(loss)(params, x), ref_tx.init(params), params, x=x)

        tx = gxpo(optax.adam(0.05))  # no loss_fn: update takes grad_fn
        got, _ = tx.update(
            jax.grad(loss)(params, x),
            tx.init(params),
            params,
            grad_fn=lambda p: jax.grad(loss)(p, x),
        )
        np.testing.assert_allclose(got, want, rtol=1e-12)

        aux_tx = gxpo(optax.adam(0.05), lambda p, x: (loss(p, x), {"m": 1.0}), has_aux=True)
        got, _ = aux_tx.update(jax.grad(loss)(params, x), aux_tx.init(params), params, x=x)
        np.testing.assert_allclose(got, want, rtol=1e-12)


# --- Bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field, rule",
    [
        (dict(virtual_depth=1), "virtual_depth", "must be an int >= 2"),
        (dict(virtual_depth=2.5), "virtual_depth", "must be an int >= 2"),
        (dict(virtual_depth=True), "virtual_depth", "must be an int >= 2"),
        (dict(reposition=1.5), "reposition", "must be a number in [0, 1]"),
        (dict(reposition=-0.1), "reposition", "must be a number in [0, 1]"),
        (dict(reposition="0.5"), "reposition", "must be a number in [0, 1]"),
        (dict(probe_state="reset"), "probe_state", "must be one of ('keep', 'restore')"),
        (dict(active_threshold=-1.0), "active_threshold", "must be a number >= 0"),
        (dict(active_threshold=None), "active_threshold", "must be a number >= 0"),
        (dict(ratio_clip=(3.0, -2.0)), "ratio_clip", "must have low <= high"),
        (dict(ratio_clip=3.0), "ratio_clip", "must be a pair (low, high) of numbers or None"),
        (dict(ratio_clip=(1, 2, 3)), "ratio_clip", "must be a pair (low, high) of numbers or None"),
        (dict(ratio_clip=("a", 2)), "ratio_clip", "must be a pair (low, high) of numbers or None"),
        (dict(scale_clip=(4.0, 2.0)), "scale_clip", "must have low <= high"),
        (
            dict(scale_clip=(4.0, None)),  # high None means K/2 + 1 = 3.5
            "scale_clip",
            "must have low <= virtual_depth / 2 + 1 = 3.5 (its high when None)",
        ),
        (dict(gate="z"), "gate", "must be a ZScoreGate or None"),
        (dict(loss_fn=3.0), "loss_fn", "must be callable or None"),
        (dict(has_aux=1), "has_aux", "must be a bool"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, field, rule):
    kwargs = dict(dict(loss_fn=lambda p: jnp.sum(p**2)), **kwargs)
    with pytest.raises(ValueError, match=field) as excinfo:
        gxpo(optax.sgd(0.1), **kwargs)
    assert str(excinfo.value) == f"gxpo: `{field}` {rule}, got {kwargs[field]!r}."


def test_bad_gate_field_raises_with_the_gate_as_owner():
    with pytest.raises(ValueError, match="window") as excinfo:
        gxpo(optax.sgd(0.1), lambda p: jnp.sum(p**2), gate=ZScoreGate(window=0))
    assert str(excinfo.value) == "ZScoreGate: `window` must be an int >= 1, got 0."


def test_bad_inner_raises():
    inner = lambda g: g
    with pytest.raises(ValueError, match="inner") as excinfo:
        gxpo(inner, lambda p: jnp.sum(p**2))
    rule = "must be an optax.GradientTransformation (e.g. optax.adamw(1e-6))"
    assert str(excinfo.value) == f"gxpo: `inner` {rule}, got {inner!r}."


def test_missing_loss_fn_and_grad_fn_raises_on_first_call():
    tx = gxpo(optax.sgd(0.1))
    params = jnp.ones(3)
    with pytest.raises(ValueError, match=r"^gxpo: `grad_fn` .*, got None\.$"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match=r"^gxpo: `params` .*, got None\.$"):
        gxpo(optax.sgd(0.1), lambda p: jnp.sum(p)).update(params, tx.init(params))


# --- Compilation -----------------------------------------------------------------------------


def test_jitted_update_compiles_once_across_steps_and_gate_shutoff():
    loss = lambda p, scale: scale * jnp.sum(p**2)
    tx = gxpo(optax.adam(0.01), loss, gate=ZScoreGate(window=3, warmup=1, threshold=1.0))
    params = jnp.ones(4)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(8):
        scale = jnp.float32(100.0 if step == 5 else 1.0)  # a jump shuts the gate
        updates, state = update(jax.grad(loss)(params, scale), state, params, scale=scale)
        params = optax.apply_updates(params, updates)
    assert not bool(state.gate.on)
    assert update._cache_size() == 1
