"""The surrogate check: GXPO's predicted K-step point against K real inner steps, exact where
the paper's Corollary 2 says it is, measurably off where it is not, and on a tiny model through
the Trainer without touching the run."""

import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gxpo.optim import gxpo
from gxpo.rl.rewards import RewardStats
from gxpo.train.builders import check
from gxpo.train.logging import read_jsonl
from gxpo.train.surrogate import surrogate_check
from gxpo.train.trainer import Trainer

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


def test_trainer_logs_the_check_and_leaves_the_run_alone(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2]))
    from configs.tiny import get_config  # noqa: PLC0415 (configs/ is not a package)

    c = get_config()
    c.data.eval = ()
    c.train.steps = 2
    c.train.checkpoint_every = 0
    c.policy_update.gate.warmup = 30  # stays on
    c.logging.surrogate_every = 2
    c.logging.surrogate_depths = (2, 3)  # K = 2 predicts theta2 itself: exact by construction
    check(c)
    trainer = Trainer(c, tmp_path)

    def score_batch(texts, refs, kinds, format_reward=0.0):  # nonzero advantages
        rewards = np.array([zlib.crc32(t.encode()) % 2 for t in texts], np.float32)
        rewards[0], rewards[1] = 0.0, 1.0
        return rewards, RewardStats(count=len(texts))

    trainer.scorer.score_batch = score_batch
    trainer.run()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert "surrogate/K2/rel_err" not in rows[0]  # step 1 is not a multiple of 2
    second = rows[1]
    assert second["surrogate/K2/rel_err"] < 1e-4  # the recorded point is theta_hat, not theta1
    assert 0 < second["surrogate/K3/rel_err"] < 10 and second["surrogate/K3/displacement_norm"] > 0
    assert second["surrogate/seconds"] > 0
    # not counted: GXPO's three gradients a step, and the check's seconds off the clock
    assert [r["backward_passes"] for r in rows] == [3, 6]
    # (the check's first call compiles: seconds, where the compiled update takes far less)
    assert second["update_seconds"] < second["surrogate/seconds"]
    np.testing.assert_allclose(
        second["wall_seconds"] - rows[0]["wall_seconds"],
        second["rollout_seconds"] + second["update_seconds"],
        atol=1e-3,
    )


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
