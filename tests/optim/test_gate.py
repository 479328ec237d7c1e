"""The rolling z-score gate, alone and inside gxpo / sfpo (docs/algorithms.md, "The shutoff
gate")."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gxpo.optim import ZScoreGate, gxpo, sfpo


def test_zscore_matches_numpy_on_the_preceding_window():
    gate = ZScoreGate(window=4, warmup=0, threshold=2.0)
    state = gate.init()
    # The gate's float32 inputs; the reference computes on them in float64.
    values = np.float32([1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.0, 1.08]).astype(np.float64)
    eps32 = np.finfo(np.float32).eps
    for i, v in enumerate(values):
        past = values[max(0, i - 4) : i]
        state, z = gate.update(state, jnp.float32(v))
        if i < 4:
            assert float(z) == 0.0  # a value is scored only against a full preceding window
        else:
            want = (v - past.mean()) / (past.std() + 1e-8)
            # The gate is float32 by design: mu and v - mu carry (n + 1) eps32 max|x| of
            # rounding over n <= 4 values, and sigma a relative error of that over sigma:
            sigma = past.std() + 1e-8
            tol = (len(past) + 2) * eps32 * np.abs(values).max() / sigma * (1 + abs(want))
            assert abs(float(z) - want) <= tol, (i, float(z), want, tol)
        assert bool(state.on)  # no jump above 2 sigma in this sequence
    assert int(state.count) == len(values)


def test_warmup_then_upward_jump_shuts_off_for_good_and_downward_never():
    gate = ZScoreGate(window=5, warmup=5, threshold=2.0)
    state = gate.init()
    noise = [1.0, 1.1, 0.9, 1.05, 0.95]
    for v in [100.0, 1.0, 1.1, 0.9, 1.0]:  # a jump inside warm-up never fires, then is dropped
        state, z = gate.update(state, jnp.float32(v))
        assert bool(state.on) and float(z) == 0.0
    assert int(state.filled) == 0 and not np.any(np.asarray(state.values))
    for v in noise + [0.01, 1e-6]:  # downward jumps: z << 0, stays on
        state, _ = gate.update(state, jnp.float32(v))
        assert bool(state.on)
    for v in noise:
        state, _ = gate.update(state, jnp.float32(v))
    state, z = gate.update(state, jnp.float32(10.0))
    assert float(z) > 2.0 and not bool(state.on)
    for v in noise:  # once off, it stays off
        state, _ = gate.update(state, jnp.float32(v))
        assert not bool(state.on)


@pytest.mark.parametrize("combinator", ["gxpo", "sfpo"])
def test_after_shutoff_update_is_inner_update_bit_for_bit_with_no_loss_evaluation(combinator):
    calls = []

    def loss(p, scale):
        jax.debug.callback(lambda: calls.append(1))
        return scale * jnp.sum(jnp.cosh(p))

    inner = optax.adamw(0.01)
    gate = ZScoreGate(window=4, warmup=2, threshold=2.0)
    make = gxpo if combinator == "gxpo" else sfpo
    tx = make(inner, loss, gate=gate)
    per_step = 2 if combinator == "gxpo" else 3  # loss evaluations while active

    params = jnp.array([0.5, -1.0, 2.0])
    state = tx.init(params)
    update = jax.jit(tx.update)
    grad = jax.jit(jax.grad(lambda p, s: s * jnp.sum(jnp.cosh(p))))
    scales = [1.0, 1.01, 1.0, 1.02, 0.98, 1.0, 0.1, 50.0]  # warm-up, a window, a dip, a jump
    for i, scale in enumerate(scales):
        calls.clear()
        s = jnp.float32(scale)
        updates, state = update(grad(params, s), state, params, scale=s)
        params = optax.apply_updates(params, updates)
        assert len(calls) == per_step, i
        assert bool(state.gate.on) == (i < len(scales) - 1), i
    assert int(state.info.gate_z) > 2

    inner_update = jax.jit(inner.update)
    inner_state = state.inner_state
    for _ in range(3):
        calls.clear()
        g = grad(params, jnp.float32(1.0))
        updates, state = update(g, state, params, scale=jnp.float32(1.0))
        want, inner_state = inner_update(g, inner_state, params)
        assert len(calls) == 0  # no probe or corrective evaluation after shutoff
        np.testing.assert_array_equal(updates, want)
        for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(inner_state)):
            np.testing.assert_array_equal(a, b)
        assert int(state.info.grad_evals) == 1 and int(state.info.active) == 0
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("window", 0, "must be an int >= 1"),
        ("window", 2.0, "must be an int >= 1"),
        ("window", True, "must be an int >= 1"),
        ("warmup", -1, "must be an int >= 0"),
        ("warmup", "30", "must be an int >= 0"),
        ("patience", 0, "must be an int >= 1"),
        ("patience", 1.0, "must be an int >= 1"),
        ("fallback", "once", "must be one of ('permanent', 'temporary')"),
        ("rearm_after", 0, "must be an int >= 1"),
        ("max_active_steps", 0, "must be an int >= 1 or None"),
        ("max_active_steps", 2.5, "must be an int >= 1 or None"),
        (
            "statistic",
            "entropy",
            "must be 'corrective_norm', ('aux', <key of the loss's aux mapping>) or a callable "
            "aux -> scalar",
        ),
        (
            "statistic",
            ("aux", 3),
            "must be 'corrective_norm', ('aux', <key of the loss's aux mapping>) or a callable "
            "aux -> scalar",
        ),
        ("threshold", 0.0, "must be a number > 0"),
        ("threshold", -1.0, "must be a number > 0"),
        ("threshold", float("nan"), "must be a number > 0"),
        ("threshold", "2", "must be a number > 0"),
    ],
)
def test_bad_fields_raise_with_the_field_name(field, value, rule):
    gate = ZScoreGate()._replace(**{field: value})
    want = f"ZScoreGate: `{field}` {rule}, got {value!r}."
    with pytest.raises(ValueError) as excinfo:
        gate.validate()
    assert str(excinfo.value) == want
    for make in (gxpo, sfpo):  # the combinators check their gate the same way
        with pytest.raises(ValueError) as excinfo:
            make(optax.sgd(0.1), lambda p: jnp.sum(p**2), gate=gate)
        assert str(excinfo.value) == want


def test_good_fields_pass():
    ZScoreGate(window=1, warmup=0, threshold=np.float32(0.5)).validate()
    ZScoreGate(window=30, warmup=50, threshold=3, patience=3, fallback="temporary").validate()
    ZScoreGate(max_active_steps=150, statistic=("aux", "entropy")).validate()
    ZScoreGate(statistic=lambda aux: aux["entropy"]).validate()
