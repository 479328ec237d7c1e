"""The surrogate check, the GXPO paper's Table 6 on a real model: how far GXPO's predicted
K-step point lies from the point that K real inner steps reach, on the same batch, from the same
params and optimizer state.

GXPO (`gxpo.optim.gxpo`) takes two real inner steps, reads each coordinate's retention ratio r
and predicts the K-step point `theta_hat = theta0 + s(r) * (theta2 - theta0)`; it never checks
that prediction. `surrogate_check` takes the K real steps too and compares. The predicted point
is GXPO's own: the combinator with `reposition=1` evaluates its corrective gradient at
`theta_tilde = theta_hat`, and the gradient oracle it is handed records that point (the same
device the quadratic notebook uses through the public API), so no second copy of the
extrapolation exists to drift from the real one.

With `config.logging.surrogate_every = N` the Trainer runs it (`SurrogateCheck`) before the
update of every N-th step while GXPO's gate is on, on the step's first mini-batch. Diagnostic
only: nothing it computes is applied, its gradients are not counted in `backward_passes`, and
its seconds (compilation included) are left out of `wall_seconds` and `update_seconds`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gxpo.models.config import ModelConfig
from gxpo.train import builders, updates
from gxpo.train.loss import Batch
from gxpo.train.step import accumulated_value_and_grad

GradFn = Callable[[optax.Params], optax.Updates]
# K -> a GXPO at virtual depth K with reposition 1, no gate, no degenerate-g0 test (no lax.cond)
Predictor = Callable[[int], optax.GradientTransformationExtraArgs]


def _predicted_point(
    tx: optax.GradientTransformationExtraArgs,
    g0: optax.Updates,
    g1: optax.Updates,
    params: optax.Params,
    inner_state: optax.OptState,
) -> optax.Params:
    """GXPO's predicted K-step point from (params, inner_state): the point its corrective
    gradient is asked at, which is theta_hat when `tx` has reposition 1."""
    asked = []

    def grad_fn(p):
        asked.append(p)
        # The first probe point is the same inner step from the same state as the real
        # trajectory's first step: its gradient is g1. The corrective one is never used.
        return g1 if len(asked) == 1 else jax.tree.map(jnp.zeros_like, p)

    state = tx.init(params)._replace(inner_state=inner_state)
    tx.update(g0, state, params, grad_fn=grad_fn)
    return asked[1]


def _flat(tree: Any) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def prediction_errors(
    theta0: optax.Params, predicted: optax.Params, real: optax.Params, two_step: optax.Params
) -> dict[str, jax.Array]:
    """How far `predicted` lies from `real` (both K-step points from `theta0`), float32 scalars:

    - `abs_err`: the median over coordinates of |predicted - real|;
    - `abs_move`: the median over coordinates of |real - theta0|, the scale `abs_err` reads
      against;
    - `rel_err`: ||predicted - real|| / ||real - theta0||, relative to the real displacement;
    - `cos_err`: 1 - cos(predicted - theta0, real - theta0), the displacement's direction;
    - `rel_err_two_step`: ||two_step - real|| / ||real - theta0||, the error of stopping at the
      two real steps (no extrapolation), for comparison with `rel_err`;
    - `displacement_norm`: ||real - theta0||.
    """
    t0, p, r, t2 = map(_flat, (theta0, predicted, real, two_step))
    d_real, d_pred = r - t0, p - t0
    real_norm = jnp.linalg.norm(d_real)
    safe = jnp.maximum(real_norm, jnp.finfo(jnp.float32).tiny)
    cos = jnp.vdot(d_pred, d_real) / jnp.maximum(
        jnp.linalg.norm(d_pred) * real_norm, jnp.finfo(jnp.float32).tiny
    )
    return {
        "abs_err": jnp.median(jnp.abs(p - r)),
        "abs_move": jnp.median(jnp.abs(d_real)),
        "rel_err": jnp.linalg.norm(p - r) / safe,
        "cos_err": 1.0 - cos,
        "rel_err_two_step": jnp.linalg.norm(t2 - r) / safe,
        "displacement_norm": real_norm,
    }


@functools.cache
def _programs(inner: optax.GradientTransformation, predictor: Predictor):
    """The check's jitted pieces, built once per (inner, predictor): one inner step, one
    predicted point per K, the errors. Called one after another from Python, they hold one
    gradient's activations at a time (one program for the whole trajectory held them all)."""

    def inner_step(g, state, theta):
        u, state = inner.update(g, state, theta)
        return optax.apply_updates(theta, u), state

    def predict(k, g0, g1, params, inner_state):
        return _predicted_point(predictor(k), g0, g1, params, inner_state)

    return (
        jax.jit(inner_step),
        jax.jit(predict, static_argnums=0),
        jax.jit(prediction_errors),
    )


def surrogate_check(
    inner: optax.GradientTransformation,
    predictor: Predictor,
    grad_fn: GradFn,
    params: optax.Params,
    inner_state: optax.OptState,
    depths: Sequence[int],
) -> dict[str, jax.Array]:
    r"""GXPO's predicted K-step points against K real inner steps, for each K of `depths`.

    From :math:`\theta_0` = `params` and :math:`S_0` = `inner_state`, the real trajectory is
    :math:`u_k, S_{k+1} = \mathrm{inner.update}(\nabla L(\theta_k), S_k, \theta_k)`,
    :math:`\theta_{k+1} = \theta_k + u_k`, up to the largest K (max(depths) gradient
    evaluations, :math:`g_0` included); GXPO's probes are its first two steps. Each K's
    predicted point :math:`\hat\theta_K` is `predictor(K)`'s (see `_predicted_point`), so it is
    exactly the point a GXPO step at depth K would extrapolate to; nothing is applied.

    Called outside `jax.jit` it runs step by step (pass a jitted `grad_fn`), so its memory is
    one gradient's; under `jax.jit` it traces into one program.

    Args:
      inner: the inner optimizer GXPO wraps (its clip included).
      predictor: K -> `gxpo(inner, virtual_depth=K, reposition=1.0, gate=None, ...)` with the
        run's other GXPO settings (retention, clips, ...) and no `min_initial_norm` (the
        predicted point is read through the gradient oracle, which a `lax.cond` would hide).
        The same object at every call: the jitted pieces are cached on it.
      grad_fn: params -> the gradient of the step's loss on the step's batch.
      params: :math:`\theta_0`.
      inner_state: :math:`S_0`, the inner optimizer's state before the step.
      depths: the K to check, each >= 2.

    Returns:
      `K<K>/<error>` for each K and each error of `prediction_errors`, float32 scalars.
    """
    depths = sorted(set(depths))
    if not depths or depths[0] < 2:
        raise ValueError(f"surrogate_check: `depths` must be ints >= 2, got {depths}.")
    inner_step, predict, errors = _programs(inner, predictor)
    g0 = grad_fn(params)
    theta, state, g, g1, real = params, inner_state, g0, None, {}
    for k in range(1, depths[-1] + 1):
        theta, state = inner_step(g, state, theta)
        if k == 2 or k in depths:
            real[k] = theta
        if k < depths[-1]:
            g = grad_fn(theta)
            g1 = g if k == 1 else g1
    out = {}
    for k in depths:
        predicted = predict(k, g0, g1, params, inner_state)
        found = errors(params, predicted, real[k], real[2])
        out.update({f"K{k}/{name}": value for name, value in found.items()})
    return out


def gate_on(opt_state: optax.OptState) -> bool:
    """Whether GXPO extrapolates at the next step: its gate is on (or it has none)."""
    gate = getattr(opt_state, "gate", None)
    return not hasattr(gate, "on") or bool(gate.on)


class SurrogateCheck:
    """`surrogate_check` for a Trainer: the config's inner optimizer, GXPO settings, loss and
    gradient accumulation, jitted once (compiled at its first call).

    `due(step, opt_state)`: whether training step `step` (1-based) is checked: every
    `config.logging.surrogate_every`-th step while the gate is on. Calling it with the train
    state before that step's update and the step's first mini-batch returns
    `surrogate/K<K>/<error>` metrics and `surrogate/seconds` (the time it took, which the
    Trainer leaves out of the run's clock).
    """

    def __init__(self, config: ml_collections.ConfigDict, model_config: ModelConfig):
        self.every = config.logging.surrogate_every
        depths = tuple(config.logging.surrogate_depths)
        inner = builders.inner_optimizer(config)
        entry = updates.get("gxpo")
        group = dict(config.policy_update.gxpo.to_dict(), reposition=1.0, min_initial_norm=0.0)
        settings = {f: config.optimizer[f] for f in entry.optimizer_fields}

        def predictor(k: int) -> optax.GradientTransformationExtraArgs:
            return entry.factory(inner, None, **dict(group, virtual_depth=k), **settings)

        loss_fn = builders.loss_fn(config, model_config)
        micro = config.train.micro_batches

        def grad(p: dict, batch: Batch, frozen: dict) -> dict:
            if micro == 1:
                return jax.grad(loss_fn, has_aux=True)(p, batch=batch, frozen=frozen)[0]
            return accumulated_value_and_grad(
                loss_fn,
                p,
                batch,
                frozen,
                micro_batches=micro,
                group_size=config.rollout.responses_per_prompt,
                aggregation=config.loss.aggregation,
            )[1]

        grad = jax.jit(grad)
        self._check = lambda trainable, inner_state, frozen, batch: surrogate_check(
            inner, predictor, lambda p: grad(p, batch, frozen), trainable, inner_state, depths
        )

    def due(self, step: int, opt_state: optax.OptState) -> bool:
        return self.every > 0 and step % self.every == 0 and gate_on(opt_state)

    def __call__(self, state: Any, frozen: dict, batch: Batch) -> dict[str, float]:
        start = time.perf_counter()
        out = self._check(state.trainable, state.opt_state.inner_state, frozen, batch)
        metrics = {f"surrogate/{k}": float(v) for k, v in jax.device_get(out).items()}
        metrics["surrogate/seconds"] = time.perf_counter() - start
        return metrics
