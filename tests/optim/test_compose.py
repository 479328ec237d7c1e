"""gxpo / sfpo compose with Optax and Flax NNX, and converge with several inner optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gxpo.optim import gxpo, sfpo


def _loss(p, x):
    return jnp.sum((x @ p - 1.0) ** 2) + 0.1 * jnp.sum(p**4)


def _problem():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(3,))), jnp.asarray(rng.normal(size=(5, 3)))


def test_inside_chain_after_global_norm_clip():
    params, x = _problem()
    g0 = jax.grad(_loss)(params, x) * 100.0  # large, so the clip binds
    tx = optax.chain(optax.clip_by_global_norm(1.0), gxpo(optax.adam(0.1), _loss))
    updates, state = jax.jit(tx.update)(g0, tx.init(params), params, x=x)

    alone = gxpo(optax.adam(0.1), _loss)
    clipped = g0 / jnp.linalg.norm(g0)
    want, _ = alone.update(clipped, alone.init(params), params, x=x)
    np.testing.assert_allclose(updates, want, rtol=1e-6)
    assert int(state[1].info.grad_evals) == 3


def test_around_inject_hyperparams():
    params, x = _problem()
    g0 = jax.grad(_loss)(params, x)
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=0.05, weight_decay=0.01)
    tx = gxpo(inner, _loss)
    state = tx.init(params)
    got, _ = tx.update(g0, state, params, x=x)
    plain = gxpo(optax.adamw(0.05, weight_decay=0.01), _loss)
    want, _ = plain.update(g0, plain.init(params), params, x=x)
    np.testing.assert_allclose(got, want, rtol=2e-5)  # lr as a float32 array vs a Python float

    # The injected learning rate is live: at 0 nothing moves.
    state.inner_state.hyperparams["learning_rate"] = jnp.float32(0.0)
    got, _ = jax.jit(tx.update)(g0, state, params, x=x)
    np.testing.assert_array_equal(got, jnp.zeros_like(params))


@pytest.mark.parametrize("make", [gxpo, sfpo], ids=["gxpo", "sfpo"])
def test_through_nnx_optimizer(make):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))

    def loss_fn(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    tx = make(optax.adam(0.1), loss_fn)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params0 = nnx.as_pure(nnx.state(model, nnx.Param))
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)

    want_updates, _ = tx.update(nnx.as_pure(grads), tx.init(params0), params0, x=x, y=y)
    want = optax.apply_updates(params0, want_updates)
    optimizer.update(model, grads, x=x, y=y)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert int(optimizer.opt_state.info.active) == 1


# --- Convergence ------------------------------------------------------------------------------


def _parabola(p):
    return jnp.sum((p - 1.0) ** 2)


def _rosenbrock(p):
    return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


INNERS = {
    "sgd": (lambda: optax.sgd(0.05), lambda: optax.sgd(5e-4)),
    "adam": (lambda: optax.adam(0.05), lambda: optax.adam(0.02)),
    "adamw": (lambda: optax.adamw(0.05, weight_decay=1e-4), lambda: optax.adamw(0.02, 1e-4)),
    "lion": (lambda: optax.lion(0.01), lambda: optax.lion(0.002)),
}


@pytest.mark.parametrize("make", [gxpo, sfpo], ids=["gxpo", "sfpo"])
@pytest.mark.parametrize("inner_name", list(INNERS))
def test_converges_on_parabola_and_rosenbrock(make, inner_name):
    for problem, p0, steps, tol, inner in [
        (_parabola, jnp.array([3.0, -2.0]), 200, 1e-3, INNERS[inner_name][0]),
        (_rosenbrock, jnp.array([-1.0, 1.5]), 1000, 0.2, INNERS[inner_name][1]),
    ]:
        tx = make(inner(), problem, gate=None)

        @jax.jit
        def step(p, state, tx=tx, problem=problem):
            updates, state = tx.update(jax.grad(problem)(p), state, p)
            return optax.apply_updates(p, updates), state

        p, state = p0, tx.init(p0)
        for _ in range(steps):
            p, state = step(p, state)
        assert float(problem(p)) < tol * (1.0 if problem is _parabola else float(problem(p0))), (
            problem.__name__,
            p,
        )


def test_gxpo_needs_fewer_gradient_evaluations_than_sgd_on_ill_conditioned_parabola():
    lam = jnp.array([1.0, 0.01])
    loss = lambda p: 0.5 * jnp.sum(lam * p**2)
    p0 = jnp.array([1.0, 1.0])
    target = 1e-4 * float(loss(p0))

    def evals_to_target(tx, evals_per_step, max_steps=5000):
        @jax.jit
        def step(p, state):
            updates, state = tx.update(jax.grad(loss)(p), state, p)
            return optax.apply_updates(p, updates), state

        p, state = p0, tx.init(p0)
        for i in range(max_steps):
            if float(loss(p)) <= target:
                return i * evals_per_step
            p, state = step(p, state)
        raise AssertionError("did not reach the target")

    sgd_evals = evals_to_target(optax.sgd(0.9), 1)
    # Paper defaults (K = 5, alpha = 0.5): each step moves ~3.5 sgd steps for 3 evaluations.
    default_evals = evals_to_target(gxpo(optax.sgd(0.9), loss, gate=None), 3)
    # Full reposition: each step lands on the (K + 1)-th iterate, 6 sgd steps for 3.
    full_evals = evals_to_target(gxpo(optax.sgd(0.9), loss, reposition=1.0, gate=None), 3)
    assert default_evals < 0.9 * sgd_evals, (default_evals, sgd_evals)
    assert full_evals < 0.55 * sgd_evals, (full_evals, sgd_evals)
