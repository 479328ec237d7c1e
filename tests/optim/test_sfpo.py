"""SFPO against its definition (docs/algorithms.md, "SFPO")."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gxpo.optim import ZScoreGate, sfpo


def _loss(p, x):
    return jnp.sum(jnp.cosh(x @ p["w"] - 0.5)) + jnp.sum(p["b"] ** 4) + jnp.sum(p["w"] * p["b"])


def _setup():
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 2))),
        "b": jnp.asarray(rng.normal(size=(2,))),
    }
    return params, jnp.asarray(rng.normal(size=(4, 3)))


@pytest.mark.parametrize("k", [1, 3, 4])
def test_matches_definition_and_counts(k):
    with jax.enable_x64(True):
        params, x = _setup()
        alpha = 0.8
        inner = optax.adam(0.05)
        calls = []

        def counted_loss(p, x):
            jax.debug.callback(lambda: calls.append(1))
            return _loss(p, x)

        tx = sfpo(inner, counted_loss, fast_steps=k, reposition=alpha)
        state = tx.init(params)
        g0 = jax.grad(_loss)(params, x)
        updates, new_state = jax.jit(tx.update)(g0, state, params, x=x)

        # The definition, step by step.
        theta, s = params, inner.init(params)
        for i in range(k):
            g = g0 if i == 0 else jax.grad(_loss)(theta, x)
            u, s = inner.update(g, s, theta)
            theta = optax.apply_updates(theta, u)
        tilde = jax.tree.map(lambda a, b: a + alpha * (b - a), params, theta)
        u, s = inner.update(jax.grad(_loss)(tilde, x), s, tilde)
        want = optax.apply_updates(tilde, u)

        got = optax.apply_updates(params, updates)
        for name in params:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-13)
        for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(s)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
        assert int(new_state.inner_state[0].count) == k + 1  # state advanced K + 1 times
        assert int(new_state.info.grad_evals) == k + 1
        assert len(calls) == k  # K new gradient evaluations; g0 came from the caller


def test_nonfinite_fast_gradient_falls_back():
    loss = lambda p: 0.5 * jnp.sum(p**2) * jnp.where(p[0] < 0.85, jnp.nan, 1.0)
    params = jnp.array([1.0, 2.0])
    inner = optax.sgd(0.1)
    tx = sfpo(inner, loss, fast_steps=3)
    g0 = jax.grad(loss)(params)
    updates, state = tx.update(g0, tx.init(params), params)
    np.testing.assert_array_equal(updates, inner.update(g0, inner.init(params))[0])
    assert int(state.info.fallback) == 1


@pytest.mark.parametrize(
    "kwargs, field, rule",
    [
        (dict(fast_steps=0), "fast_steps", "must be an int >= 1"),
        (dict(fast_steps=True), "fast_steps", "must be an int >= 1"),
        (dict(fast_steps=2.0), "fast_steps", "must be an int >= 1"),
        (dict(reposition=2.0), "reposition", "must be a number in [0, 1]"),
        (dict(reposition=None), "reposition", "must be a number in [0, 1]"),
        (dict(gate=3), "gate", "must be a ZScoreGate or None"),
        (dict(loss_fn="loss"), "loss_fn", "must be callable or None"),
        (dict(has_aux="yes"), "has_aux", "must be a bool"),
        (
            dict(inner=optax.sgd),
            "inner",
            "must be an optax.GradientTransformation (e.g. optax.adamw(1e-6))",
        ),
    ],
)
def test_bad_arguments(kwargs, field, rule):
    kwargs = dict(dict(inner=optax.sgd(0.1), loss_fn=lambda p: jnp.sum(p**2)), **kwargs)
    with pytest.raises(ValueError, match=field) as excinfo:
        sfpo(**kwargs)
    assert str(excinfo.value) == f"sfpo: `{field}` {rule}, got {kwargs[field]!r}."


def test_bad_gate_field_raises_with_the_gate_as_owner():
    with pytest.raises(ValueError, match="threshold") as excinfo:
        sfpo(optax.sgd(0.1), lambda p: jnp.sum(p**2), gate=ZScoreGate(threshold=0.0))
    assert str(excinfo.value) == "ZScoreGate: `threshold` must be a number > 0, got 0.0."
