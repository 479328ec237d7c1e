"""The options that run GXPO / SFPO as their authors' code does (GXPO.md, "The authors'
code"), each against a small independent re-implementation: the gate with patience, warm-up,
temporary fallback and a cap; retention on clipped gradients and on update directions; the
degenerate-g0 skip; SFPO's passes over all mini-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gxpo.optim import ZScoreGate, adamw_direction, gxpo, sfpo

# --- the gate, against a plain loop ------------------------------------------------------------


def _reference_gate(
    values, window, warmup, threshold, patience, fallback, rearm_after, cap, freeze=True
):
    """Per step: (extrapolated?, z). The issue's gate, literally: the first `warmup` values
    never fire and are dropped; z against the full preceding window (population std), the
    baseline frozen while a streak is open; `patience` hits in a row fire; the firing step
    keeps its extrapolation; "temporary" re-arms after `rearm_after` plain steps."""
    hist, seen, streak, frozen, on, off = [], 0, 0, None, True, 0
    out = []
    for v in values:
        if not on:
            out.append((False, 0.0))
            if fallback == "temporary":
                off += 1
                if off >= rearm_after and (cap is None or seen < cap):
                    on, off = True, 0
            continue
        seen += 1
        z = 0.0
        if seen > warmup:
            if len(hist) >= window:
                if streak > 0 and freeze:
                    mu, sd = frozen
                else:
                    w = np.array(hist[-window:])
                    mu, sd = w.mean(), w.std()
                z = (v - mu) / (sd + 1e-8)
                if z > threshold:
                    if streak == 0:
                        frozen = (mu, sd)
                    streak += 1
                else:
                    streak = 0
            hist.append(v)
            if streak >= patience:
                on, streak = False, 0
        if cap is not None and seen >= cap:
            on = False
        out.append((True, z))
    return out


# Warm-up (with a spike that must not count), a window of noise, a lone spike (a streak of 1),
# noise that flushes it, a sustained excursion of three (fires with patience 3 only because the
# baseline is frozen), then noise, then another excursion (fires again once re-armed).
SCRIPT = (
    [1.0, 50.0, 1.0]
    + [1.00, 1.02, 0.98, 1.01, 0.99]
    + [1.5, 1.0, 0.99, 1.01, 1.0, 1.02]
    + [1.3, 1.3, 1.3]
    + [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.01]
    + [1.4, 1.4, 1.4, 1.0, 1.0]
)
GATES = {
    "permanent_patience3": dict(patience=3, fallback="permanent", rearm_after=10, cap=None),
    "temporary_patience3": dict(patience=3, fallback="temporary", rearm_after=4, cap=None),
    "temporary_patience1": dict(patience=1, fallback="temporary", rearm_after=2, cap=None),
    "temporary_capped": dict(patience=3, fallback="temporary", rearm_after=4, cap=22),
}


@pytest.mark.parametrize("statistic", ["corrective_norm", "entropy"])
@pytest.mark.parametrize("name", list(GATES))
def test_gate_fires_exactly_when_an_independent_loop_says(name, statistic):
    cfg = GATES[name]
    window, warmup, threshold = 5, 3, 2.5
    gate = ZScoreGate(
        window,
        warmup,
        threshold,
        cfg["patience"],
        cfg["fallback"],
        cfg["rearm_after"],
        max_active_steps=cfg["cap"],
        statistic="corrective_norm" if statistic == "corrective_norm" else ("aux", "entropy"),
    )
    tx = gxpo(optax.sgd(0.01), gate=gate)
    params = jnp.zeros(4, jnp.float32)
    state = tx.init(params)
    # The scripted value v is ||g~|| (a constant gradient v/2 on 4 coordinates) or aux["entropy"].
    if statistic == "corrective_norm":

        def step(state, params, v):
            grad = lambda p: jnp.full(4, v / 2)
            return tx.update(grad(params), state, params, grad_fn=grad)

    else:

        def step(state, params, v):
            grad = lambda p: jnp.ones(4, jnp.float32)
            aux_grad = lambda p: (grad(p), {"entropy": v})
            return tx.update(grad(params), state, params, grad_fn=grad, aux_grad_fn=aux_grad)

    step = jax.jit(step)
    values = [float(np.float32(v)) for v in SCRIPT]
    got = []
    for v in values:
        updates, state = step(state, params, jnp.float32(v))
        params = optax.apply_updates(params, updates)
        got.append((bool(state.info.active), float(state.info.gate_z)))
    values = [float(np.float32(np.float32(v) / 2) * 2) for v in values]  # what the gate sees
    want = _reference_gate(
        values,
        window,
        warmup,
        threshold,
        cfg["patience"],
        cfg["fallback"],
        cfg["rearm_after"],
        cfg["cap"],
    )
    assert [a for a, _ in got] == [a for a, _ in want]
    np.testing.assert_allclose([z for _, z in got], [z for _, z in want], rtol=1e-3, atol=1e-3)
    # The script exercises what it claims to: the gate goes off, and with patience 3 only
    # because the streak's baseline is frozen.
    assert not all(a for a, _ in got)
    if cfg["patience"] == 3:
        unfrozen = _reference_gate(
            values,
            window,
            warmup,
            threshold,
            3,
            cfg["fallback"],
            cfg["rearm_after"],
            cfg["cap"],
            freeze=False,
        )
        assert [a for a, _ in unfrozen] != [a for a, _ in want]


# --- retention on clipped gradients and on update directions -----------------------------------


def _loss(p, x):
    z = jnp.tanh(x @ p["w"]) + p["b"]
    return jnp.sum((z - 0.3) ** 2) + 0.5 * jnp.sum(p["w"] ** 4) + jnp.sum(jnp.cos(3.0 * p["b"]))


def _reference_step(inner, params, state0, x, k, alpha, signal):
    """One GXPO step by GXPO.md with r = signal1 / signal0 (NumPy, float64, per coordinate):
    `signal(g, u, theta)` gives the compared tree; the active set and the clips on signal0."""
    grad = jax.grad(_loss)
    g0 = grad(params, x)
    u0, s1 = inner.update(g0, state0, params)
    theta1 = jax.tree.map(np.add, params, u0)
    g1 = grad(theta1, x)
    u1, s2 = inner.update(g1, s1, theta1)
    theta2 = jax.tree.map(np.add, theta1, u1)
    a_tree, b_tree = signal(g0, u0, params), signal(g1, u1, theta1)
    tilde, rs_all = {}, []
    for name in params:
        a = np.asarray(a_tree[name], np.float64).ravel()
        b = np.asarray(b_tree[name], np.float64).ravel()
        t0 = np.asarray(params[name]).ravel()
        d = np.asarray(theta2[name]).ravel() - t0
        rms = np.sqrt(np.mean(a**2))
        s = np.ones_like(d)
        for i in range(d.size):
            r = 1.0
            if abs(a[i]) > 1e-3 * rms and a[i] != 0:
                r = min(max(b[i] / a[i], -2.0), 3.0)
                sum2 = 1 + r
                s[i] = sum(r**j for j in range(k)) / sum2 if abs(sum2) > 1e-8 else 1.0
                s[i] = min(max(s[i], 1.0), k / 2 + 1)
            rs_all.append(r)
        tilde[name] = jnp.asarray((t0 + alpha * s * d).reshape(params[name].shape))
    u2, s3 = inner.update(grad(tilde, x), s2, tilde)
    return jax.tree.map(np.add, tilde, u2), np.array(rs_all)


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=(3,)))}
    return params, jnp.asarray(rng.normal(size=(6, 4)))


LR, WD, CLIP = 0.05, 0.1, 0.5


def _norm(t):
    return np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree.leaves(t)))


CASES = {
    "update_adam": (
        lambda: optax.adam(LR),
        dict(retention="update"),
        lambda g, u, t: jax.tree.map(lambda v: -np.asarray(v) / LR, u),
    ),
    "update_adamw": (
        lambda: optax.adamw(LR, weight_decay=WD),
        dict(retention="update", update_direction=adamw_direction(LR, WD)),
        lambda g, u, t: jax.tree.map(lambda v, p: -np.asarray(v) / LR - WD * np.asarray(p), u, t),
    ),
    "clipped_gradient": (
        lambda: optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(LR)),
        dict(retention="clipped_gradient", grad_clip=CLIP),
        lambda g, u, t: jax.tree.map(lambda v: np.asarray(v) * min(1.0, CLIP / _norm(g)), g),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_retention_matches_a_plain_reimplementation(case):
    make_inner, kwargs, signal = CASES[case]
    with jax.enable_x64(True):
        params, x = _problem()
        inner = make_inner()
        tx = gxpo(inner, _loss, virtual_depth=5, reposition=0.5, gate=None, **kwargs)
        state = tx.init(params)
        noise = jax.tree.map(
            lambda v: 1e-2 * jnp.sin(jnp.arange(v.size) + 1.0).reshape(v.shape), params
        )
        state = state._replace(inner_state=inner.update(noise, state.inner_state, params)[1])
        want, rs_all = _reference_step(inner, params, state.inner_state, x, 5, 0.5, signal)
        updates, new_state = jax.jit(tx.update)(jax.grad(_loss)(params, x), state, params, x=x)
        got = optax.apply_updates(params, updates)
        for name in params:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(new_state.info.retention_mean_all, rs_all.mean(), rtol=1e-5)
        # A different algorithm from the paper's gradient ratio, not an alias of it.
        paper = gxpo(inner, _loss, virtual_depth=5, reposition=0.5, gate=None)
        other, _ = jax.jit(paper.update)(jax.grad(_loss)(params, x), state, params, x=x)
        assert not np.allclose(jax.tree.leaves(other)[0], jax.tree.leaves(updates)[0])
        assert _norm(jax.grad(_loss)(params, x)) > CLIP  # the clip binds in "clipped_gradient"


# --- a degenerate first gradient ----------------------------------------------------------------


@pytest.mark.parametrize("make", [gxpo, sfpo], ids=["gxpo", "sfpo"])
@pytest.mark.parametrize("g0_scale", [0.0, np.nan], ids=["zero", "nan"])
def test_degenerate_g0_takes_one_gradient_evaluation_and_is_not_shown_to_the_gate(make, g0_scale):
    calls = []

    def loss(p, adv):
        jax.debug.callback(lambda: calls.append(1))
        return adv * jnp.sum(jnp.cosh(p))

    inner = optax.adam(0.1)
    tx = make(inner, loss, min_initial_norm=1e-8, gate=ZScoreGate(window=2, warmup=0))
    params = jnp.array([0.5, -1.0, 2.0])
    state = tx.init(params)
    update = jax.jit(tx.update)
    g0 = jnp.full(3, g0_scale, jnp.float32) * jnp.ones(3)
    adv = jnp.float32(0.0)
    updates, new_state = update(g0, state, params, adv=adv)
    jax.block_until_ready(updates)
    assert calls == []  # g0 was the caller's: no probe, no corrective gradient
    info = new_state.info
    assert int(info.grad_evals) == 1 and int(info.degenerate) == 1 and int(info.active) == 0
    assert int(new_state.gate.count) == 0 and bool(new_state.gate.on)
    want, _ = inner.update(g0, inner.init(params), params)
    np.testing.assert_array_equal(updates, want)
    # A healthy g0 extrapolates as before, and the gate sees it.
    updates, new_state = update(jnp.ones(3), state, params, adv=jnp.float32(1.0))
    jax.block_until_ready(updates)
    assert int(new_state.info.degenerate) == 0 and int(new_state.info.active) == 1
    assert int(new_state.gate.count) == 1 and len(calls) >= 2


def test_zero_advantage_batch_takes_one_backward_pass_in_the_update_step():
    from gxpo.train.state import init_state
    from gxpo.train.step import make_update_step

    calls = []

    def loss_fn(params, *, batch, frozen):
        jax.debug.callback(lambda: calls.append(1))
        loss = batch["adv"] * jnp.sum(jnp.cosh(params["w"] + frozen["b"]))
        return loss, {"entropy": jnp.sum(params["w"])}

    tx = gxpo(optax.adamw(0.1), min_initial_norm=1e-8)
    params, frozen = {"w": jnp.array([0.5, -1.0])}, {"b": jnp.zeros(2)}
    state = init_state(params, tx.init(params), {"position": 0})
    step = make_update_step(tx, loss_fn)
    state, metrics = step(state, frozen, {"adv": jnp.float32(0.0)})
    jax.block_until_ready(state)
    assert len(calls) == 1 and int(state.backward_passes) == 1
    assert int(metrics["grad_evals"]) == 1 and int(metrics["policy/degenerate"]) == 1
    calls.clear()
    state, metrics = step(state, frozen, {"adv": jnp.float32(1.0)})
    jax.block_until_ready(state)
    assert len(calls) == 3 and int(state.backward_passes) == 4


# --- the entropy gate inside the update step ---------------------------------------------------


def test_update_step_hands_the_loss_aux_to_an_aux_gate():
    from gxpo.train.state import init_state
    from gxpo.train.step import make_update_step

    def loss_fn(params, *, batch, frozen):
        return jnp.sum(params["w"] ** 2), {"entropy": batch["h"]}

    gate = ZScoreGate(window=2, warmup=0, threshold=2.0, statistic=("aux", "entropy"))
    tx = gxpo(optax.sgd(0.1), gate=gate)
    params = {"w": jnp.array([0.5, -1.0])}
    state = init_state(params, tx.init(params), {"position": 0})
    step = make_update_step(tx, loss_fn)
    for h in (1.0, 1.1, 0.9):
        state, metrics = step(state, {}, {"h": jnp.float32(h)})
    np.testing.assert_allclose(float(metrics["policy/gate_value"]), 0.9, rtol=1e-6)


# --- SFPO over all the mini-batches of a rollout batch -----------------------------------------


def test_sfpo_mini_batch_passes_match_a_plain_loop():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        params = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}
        xs = jnp.asarray(rng.normal(size=(3, 5, 4)))  # M = 3 mini-batches
        inner = optax.adamw(0.05, weight_decay=0.01)
        k, alpha, m = 2, 0.8, 3
        grad = jax.grad(_loss)

        theta, s = params, inner.init(params)
        for _ in range(k):
            for j in range(m):
                u, s = inner.update(grad(theta, xs[j]), s, theta)
                theta = jax.tree.map(np.add, theta, u)
        theta = jax.tree.map(lambda a, b: a + alpha * (b - a), params, theta)
        norms = []
        for j in range(m):
            g = grad(theta, xs[j])
            norms.append(_norm(g))
            u, s = inner.update(g, s, theta)
            theta = jax.tree.map(np.add, theta, u)

        for how in ("loss_fn", "grad_fn"):
            if how == "loss_fn":
                tx = sfpo(inner, _loss, fast_steps=k, reposition=alpha, mini_batches=m, gate=None)
                update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, x=xs))
            else:
                tx = sfpo(inner, fast_steps=k, reposition=alpha, mini_batches=m, gate=None)
                grad_fn = lambda p, j: grad(p, xs[j])
                update = jax.jit(lambda g, s, p, tx=tx, f=grad_fn: tx.update(g, s, p, grad_fn=f))
            updates, state = update(grad(params, xs[0]), tx.init(params), params)
            got = optax.apply_updates(params, updates)
            for name in params:
                np.testing.assert_allclose(got[name], theta[name], rtol=1e-10, atol=1e-12)
            for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(s)):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
            assert int(state.info.grad_evals) == (k + 1) * m
            np.testing.assert_allclose(state.info.corrective_norm, np.mean(norms), rtol=1e-5)


# --- argument errors, in the combinators' one format -------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field, rule",
    [
        (
            dict(retention="updates"),
            "retention",
            "must be one of ('gradient', 'clipped_gradient', 'update')",
        ),
        (dict(grad_clip=0.0), "grad_clip", "must be a number > 0 or None"),
        (dict(grad_clip="1"), "grad_clip", "must be a number > 0 or None"),
        (
            dict(retention="clipped_gradient"),
            "grad_clip",
            "must be the inner optimizer's global-norm clip (> 0) with "
            "retention='clipped_gradient'",
        ),
        (
            dict(update_direction=3),
            "update_direction",
            "must be callable (updates, params) -> direction, or None",
        ),
        (dict(min_initial_norm=-1.0), "min_initial_norm", "must be a number >= 0 or None"),
        (dict(min_initial_norm="0"), "min_initial_norm", "must be a number >= 0 or None"),
    ],
)
def test_gxpo_bad_new_arguments(kwargs, field, rule):
    with pytest.raises(ValueError) as excinfo:
        gxpo(optax.sgd(0.1), lambda p: jnp.sum(p**2), **kwargs)
    assert str(excinfo.value) == f"gxpo: `{field}` {rule}, got {kwargs.get(field)!r}."


@pytest.mark.parametrize(
    "kwargs, field, rule",
    [
        (dict(mini_batches=0), "mini_batches", "must be an int >= 1 or None"),
        (dict(mini_batches=2.0), "mini_batches", "must be an int >= 1 or None"),
        (dict(min_initial_norm=-1e-8), "min_initial_norm", "must be a number >= 0 or None"),
    ],
)
def test_sfpo_bad_new_arguments(kwargs, field, rule):
    with pytest.raises(ValueError) as excinfo:
        sfpo(optax.sgd(0.1), lambda p: jnp.sum(p**2), **kwargs)
    assert str(excinfo.value) == f"sfpo: `{field}` {rule}, got {kwargs[field]!r}."


def test_adamw_direction_bad_arguments():
    with pytest.raises(ValueError) as excinfo:
        adamw_direction(0.0, 0.01)
    assert str(excinfo.value) == "adamw_direction: `learning_rate` must be a number > 0, got 0.0."
    with pytest.raises(ValueError) as excinfo:
        adamw_direction(1e-6, -0.1)
    assert str(excinfo.value) == "adamw_direction: `weight_decay` must be a number >= 0, got -0.1."


def test_an_aux_gate_without_aux_raises_on_first_call():
    gate = ZScoreGate(statistic=("aux", "entropy"))
    params = jnp.ones(3)
    tx = gxpo(optax.sgd(0.1), lambda p: jnp.sum(p**2), gate=gate)
    with pytest.raises(ValueError, match=r"^gxpo: `aux_grad_fn` .*, got None\.$"):
        tx.update(params, tx.init(params), params)
    tx = gxpo(optax.sgd(0.1), lambda p: (jnp.sum(p**2), {"kl": 0.0}), gate=gate, has_aux=True)
    with pytest.raises(ValueError, match=r"^ZScoreGate: `statistic` names a key the loss's aux"):
        tx.update(params, tx.init(params), params)
