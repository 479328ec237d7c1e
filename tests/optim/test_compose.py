"""gxpo / sfpo compose with Optax and Flax NNX, their diagnostics are found through every wrapper
with `optax.tree.get(opt_state, "info")`, and they converge with several inner optimizers.

Comparisons of one computation done two ways run in float64 with tight tolerances."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gxpo.optim import GXPOInfo, SFPOInfo, gxpo, sfpo


def _loss(p, x):
    return jnp.sum((x @ p - 1.0) ** 2) + 0.1 * jnp.sum(p**4)


def _problem():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(3,))), jnp.asarray(rng.normal(size=(5, 3)))


def test_inside_chain_after_global_norm_clip():
    with jax.enable_x64(True):
        params, x = _problem()
        g0 = jax.grad(_loss)(params, x) * 100.0  # large, so the clip binds
        tx = optax.chain(optax.clip_by_global_norm(1.0), gxpo(optax.adam(0.1), _loss))
        updates, state = jax.jit(tx.update)(g0, tx.init(params), params, x=x)

        alone = gxpo(optax.adam(0.1), _loss)
        clipped = g0 / jnp.linalg.norm(g0)
        want, _ = alone.update(clipped, alone.init(params), params, x=x)
        np.testing.assert_allclose(updates, want, rtol=1e-12)
        assert int(state[1].info.grad_evals) == 3


def test_around_inject_hyperparams():
    with jax.enable_x64(True):
        params, x = _problem()
        g0 = jax.grad(_loss)(params, x)
        inner = optax.inject_hyperparams(optax.adamw)(learning_rate=0.05, weight_decay=0.01)
        tx = gxpo(inner, _loss)
        state = tx.init(params)
        got, _ = tx.update(g0, state, params, x=x)
        plain = gxpo(optax.adamw(0.05, weight_decay=0.01), _loss)
        want, _ = plain.update(g0, plain.init(params), params, x=x)
        np.testing.assert_allclose(got, want, rtol=1e-12)

        # The injected learning rate is live: at 0 nothing moves.
        state.inner_state.hyperparams["learning_rate"] = jnp.float64(0.0)
        got, _ = jax.jit(tx.update)(g0, state, params, x=x)
        np.testing.assert_array_equal(got, jnp.zeros_like(params))


@pytest.mark.parametrize("make", [gxpo, sfpo], ids=["gxpo", "sfpo"])
def test_through_nnx_optimizer(make):
    with jax.enable_x64(True):
        model = nnx.Linear(3, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
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
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=1e-12)
        assert int(optimizer.opt_state.info.active) == 1


# --- Diagnostics through wrappers: optax.tree.get(opt_state, "info") ------------------------

INFO = {gxpo: (GXPOInfo, 3), sfpo: (SFPOInfo, 4)}  # info type, gradient evaluations (K = 3)
DEPTH = {gxpo: "virtual_depth", sfpo: "fast_steps"}  # ints: static under inject_hyperparams

WRAPPERS = {
    "alone": lambda make: make(optax.adam(0.1), _loss),
    "chain": lambda make: optax.chain(
        optax.clip_by_global_norm(1.0), make(optax.adam(0.1), _loss), optax.scale(1.0)
    ),
    "inject_hyperparams": lambda make: optax.inject_hyperparams(
        make, static_args=("loss_fn", DEPTH[make])
    )(optax.adam(0.1), _loss, reposition=0.5),
    "inner_inject_hyperparams": lambda make: make(
        optax.inject_hyperparams(optax.adam)(learning_rate=0.1), _loss
    ),
    "with_extra_args_support": lambda make: optax.with_extra_args_support(
        make(optax.adam(0.1), _loss)
    ),
}


@pytest.mark.parametrize("make", [gxpo, sfpo], ids=["gxpo", "sfpo"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_tree_get_finds_info_through_wrapper(make, wrapper):
    info_type, evals = INFO[make]
    params, x = _problem()
    tx = WRAPPERS[wrapper](make)
    state = tx.init(params)
    info = optax.tree.get(state, "info")
    assert isinstance(info, info_type) and int(info.grad_evals) == 1

    updates, state = jax.jit(tx.update)(jax.grad(_loss)(params, x), state, params, x=x)
    info = jax.jit(lambda s: optax.tree.get(s, "info"))(state)  # as the trainer's step reads it
    assert isinstance(info, info_type)
    assert int(info.active) == 1 and int(info.grad_evals) == evals
    assert len(optax.tree.get_all_with_path(state, "info")) == 1


def test_tree_get_finds_no_info_in_a_plain_optimizer():
    params, _ = _problem()
    tx = optax.with_extra_args_support(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)))
    assert optax.tree.get(tx.init(params), "info") is None


@pytest.mark.parametrize("make", [gxpo, sfpo], ids=["gxpo", "sfpo"])
def test_inside_inject_hyperparams_the_injected_reposition_is_live(make):
    with jax.enable_x64(True):
        params, x = _problem()
        g0 = jax.grad(_loss)(params, x)
        factory = optax.inject_hyperparams(make, static_args=("loss_fn", DEPTH[make]))
        tx = factory(optax.adam(0.1), _loss, reposition=0.5)
        state = tx.init(params)
        update = jax.jit(tx.update)
        for alpha in (0.5, 0.0, 1.0):
            state.hyperparams["reposition"] = jnp.float64(alpha)
            got, new_state = update(g0, state, params, x=x)
            plain = make(optax.adam(0.1), _loss, reposition=alpha)
            want, want_state = plain.update(g0, plain.init(params), params, x=x)
            np.testing.assert_allclose(got, want, rtol=1e-12)
            np.testing.assert_array_equal(
                optax.tree.get(new_state, "info").grad_evals, want_state.info.grad_evals
            )
        # The combinator's own check still guards the injected value, when `init` builds it.
        with pytest.raises(ValueError, match=f"^{make.__name__}: `reposition` "):
            factory(optax.adam(0.1), _loss, reposition=1.5).init(params)


@pytest.mark.parametrize("make", [gxpo, sfpo], ids=["gxpo", "sfpo"])
def test_tree_get_finds_info_in_nnx_optimizer_state(make):
    info_type, evals = INFO[make]
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))

    def loss_fn(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    optimizer = nnx.Optimizer(model, make(optax.adam(0.1), loss_fn), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model), x=x, y=y)

    info = optax.tree.get(optimizer.opt_state, "info")  # fields are nnx.OptArray variables
    assert isinstance(info, info_type) and int(info.active) == 1
    pure = optax.tree.get(nnx.as_pure(optimizer.opt_state), "info")
    assert isinstance(pure, info_type) and int(pure.grad_evals) == evals
    # nnx.state(optimizer) turns named tuples into mappings: the same fields, by name.
    fields = optax.tree.get(nnx.state(optimizer), "info")
    assert set(fields) == set(info_type._fields) and int(fields["grad_evals"][...]) == evals


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
    # float32, the training dtype; thresholds, not equalities: the final losses sit 5x (lion on
    # the parabola, its sign steps' limit cycle) to 1e10x below them, far beyond rounding.
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

    # float32 counts: a sgd step shrinks the slow coordinate's loss by 1.8%, so accumulated
    # rounding (~1e-5 relative) moves a crossing of the target by one step at most; the counts
    # clear their bounds by 2 to 3 GXPO steps (222 vs 229.5, 129 vs 140 evaluations).
    sgd_evals = evals_to_target(optax.sgd(0.9), 1)
    # Paper defaults (K = 5, alpha = 0.5): each step moves ~3.5 sgd steps for 3 evaluations.
    default_evals = evals_to_target(gxpo(optax.sgd(0.9), loss, gate=None), 3)
    # Full reposition: each step lands on the (K + 1)-th iterate, 6 sgd steps for 3.
    full_evals = evals_to_target(gxpo(optax.sgd(0.9), loss, reposition=1.0, gate=None), 3)
    assert default_evals < 0.9 * sgd_evals, (default_evals, sgd_evals)
    assert full_evals < 0.55 * sgd_evals, (full_evals, sgd_evals)
