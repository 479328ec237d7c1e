"""The surrogate check: GXPO's predicted K-step point against K real inner steps, exact where
the paper's Corollary 2 says it is and measurably off where it is not. Through the Trainer, on
a tiny model: tests/experiments/test_compare.py (the study harness's end-to-end run)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gxpo.optim import gxpo
from gxpo.train.builders import check
from gxpo.train.surrogate import surrogate_check

ETA = 0.1
LAM = jnp.array([0.3, 1.0, 2.0, 4.0, 7.0])
THETA0 = jnp.array([1.0, -2.0, 0.5, 3.0, -1.5])


def _predictor(inner):
    return lambda k: gxpo(inner, virtual_depth=k, reposition=1.0, gate=None)


def _check(loss, inner, depths=(3, 5, 10)):
    grad_fn = jax.grad(loss)
    run = jax.jit(  # under jit, as the Trainer runs it: the recorded point must not leak
        lambda p, s: surrogate_check(inner, _predictor(inner), grad_fn, p, s, depths)
    )
    return {k: float(v) for k, v in run(THETA0, inner.init(THETA0)).items()}


def test_exact_on_a_diagonal_quadratic_with_sgd():
    # Corollary 2: each coordinate's gradient decays by r = 1 - eta * lam, so the predicted
    # point is the K-th gradient-descent iterate, where the real steps land.
    out = _check(lambda p: 0.5 * jnp.sum(LAM * p**2), optax.sgd(ETA))
    for k in (3, 5, 10):
        assert out[f"K{k}/rel_err"] < 1e-5 and out[f"K{k}/cos_err"] < 1e-6
        assert out[f"K{k}/abs_err"] < 1e-5 * out[f"K{k}/abs_move"]
        # the real point is the K-th iterate: its displacement has the closed form
        gd = THETA0 * (1 - ETA * LAM) ** k - THETA0
        np.testing.assert_allclose(out[f"K{k}/displacement_norm"], jnp.linalg.norm(gd), 1e-5)
        # stopping after two steps is far off: the extrapolation is what closes the gap
        assert out[f"K{k}/rel_err_two_step"] > 0.1


def test_off_on_a_coupled_quadratic_and_worse_with_depth():
    # A rotated quadratic: coordinates no longer decay geometrically one by one.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))
    a = jnp.asarray(q @ np.diag(np.asarray(LAM)) @ q.T, jnp.float32)
    out = _check(lambda p: 0.5 * p @ a @ p, optax.sgd(ETA))
    errors = [out[f"K{k}/rel_err"] for k in (3, 5, 10)]
    assert 1e-3 < errors[0] < errors[1] < errors[2]
    assert all(out[f"K{k}/cos_err"] > 1e-6 for k in (3, 5, 10))


def test_bad_depths_raise():
    with pytest.raises(ValueError, match="depths"):
        surrogate_check(optax.sgd(ETA), None, None, THETA0, None, (1, 3))


def test_config_checks_name_the_field(monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2]))
    from configs.tiny import get_config  # noqa: PLC0415

    c = get_config()
    c.policy_update.name = "grpo"
    c.logging.surrogate_every = 5
    with pytest.raises(ValueError, match=r"config\.logging\.surrogate_every=5: .*'grpo'"):
        check(c)
    c.policy_update.name = "gxpo"
    c.logging.surrogate_depths = (1,)
    with pytest.raises(ValueError, match=r"config\.logging\.surrogate_depths"):
        check(c)
