"""The loss on the response window equals the loss over the full sequence; gradients accumulated
over micro-batches, and the update step built on them, equal the whole batch's.

Exact-math claims run in float64 on a float64 loss of the same shape (the model and
`grpo.grpo_loss` compute in float32 whatever the weights' dtype); where the real model is the
point, it runs in float32 with tolerances derived from the arithmetic.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gxpo.models import get_preset, init_model
from gxpo.models.lora import split_trainable
from gxpo.models.transformer import forward
from gxpo.optim import gxpo
from gxpo.rl import grpo
from gxpo.train import loss as loss_lib
from gxpo.train import step as step_lib
from gxpo.train.state import init_state

EPS32 = float(np.finfo(np.float32).eps)
AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _tiny_weights(config):
    _, trainable, frozen = split_trainable(init_model(config, seed=0))
    trainable, frozen = (jax.tree.map(jnp.asarray, s.to_pure_dict()) for s in (trainable, frozen))
    # LoRA B != 0 so that adapters-off (the reference) differs from the policy.
    return jax.tree.map(lambda x: x + 0.05, trainable), frozen


def test_window_loss_and_logprobs_equal_the_full_sequence():
    config = get_preset("tiny", lora_rank=4)
    trainable, frozen = _tiny_weights(config)
    weights = loss_lib.merge_weights(trainable, frozen)

    rng = np.random.default_rng(0)
    B, P, A = 4, 6, 5
    tokens = rng.integers(3, 500, size=(B, P + A))
    tokens[:, :P] = np.repeat(tokens[::2, :P], 2, axis=0)  # groups of 2 responses per prompt
    tokens = jnp.asarray(tokens, jnp.int32)
    prompt_mask = np.arange(P)[None] >= np.array([[0], [0], [3], [3]])
    response_mask = np.arange(A)[None] < np.array([[5], [3], [1], [4]])
    mask = jnp.asarray(np.concatenate([prompt_mask, response_mask], 1))
    full_response_mask = jnp.concatenate([jnp.zeros((B, P), bool), jnp.asarray(response_mask)], 1)
    advantages = jnp.asarray([1.0, -1.0, 0.5, -0.5])

    old_w, ref_w = loss_lib.batch_logprobs(
        trainable,
        frozen,
        None,
        tokens,
        mask,
        model_config=config,
        temperature=0.7,
        window=A + 1,
        with_old=True,
        reference="adapters_off",
        group_size=2,
    )
    full = grpo.token_logprobs(forward(weights, config, tokens, mask), tokens, 0.7)
    full_ref = grpo.token_logprobs(
        forward(weights, config, tokens, mask, use_lora=False), tokens, 0.7
    )
    # float32 (the model's compute dtype): the window and the full sequence run different
    # kernels (group-shared prefix vs plain attention) and shapes, so each of a layer's ~4
    # reductions may round differently: <= 4 * L * eps32 relative to |logp|, doubled.
    logp_tol = 8 * config.num_layers * EPS32 * float(np.max(np.abs(full)))
    # Window entry 0 is the last prompt token: no prediction inside the window, so 0.
    np.testing.assert_allclose(old_w[:, 1:], full[:, P:], rtol=0, atol=logp_tol)
    np.testing.assert_allclose(ref_w[:, 1:], full_ref[:, P:], rtol=0, atol=logp_tol)
    assert not np.any(old_w[:, 0]) and not np.any(ref_w[:, 0])

    # Perturb the old log-probs so that ratios differ from 1 and clipping binds somewhere.
    old_w = old_w + jnp.asarray(rng.normal(scale=0.3, size=old_w.shape), jnp.float32)
    old_full = jnp.concatenate([jnp.zeros((B, P - 1)), old_w], 1)
    ref_full = jnp.concatenate([jnp.zeros((B, P - 1)), ref_w], 1)
    loss_config = loss_lib.LossConfig(temperature=0.7, kl_coef=0.1, group_size=2)
    batch = loss_lib.Batch(
        tokens=tokens,
        mask=mask,
        response_mask=full_response_mask[:, P - 1 :],
        advantages=advantages,
        old_logp=old_w,
        ref_logp=ref_w,
    )
    loss, metrics = loss_lib.policy_loss(
        trainable, batch=batch, frozen=frozen, model_config=config, loss_config=loss_config
    )
    want, want_metrics = grpo.grpo_loss(
        full,
        old_full,
        ref_full,
        advantages,
        full_response_mask,
        kl_coef=0.1,
        group_size=2,
    )
    # The loss and its metrics are token means of terms whose derivative in logp is at most
    # |A| * ratio (policy) + kl_coef * |exp(ref - logp) - 1| (k3): logp_tol times that bound.
    on = np.asarray(full_response_mask)
    ratio = np.exp(np.asarray(full - old_full))[on]
    k3 = np.abs(np.exp(np.asarray(ref_full - full))[on] - 1)
    tol = logp_tol * (np.max(np.abs(advantages)) * np.max(ratio) + 0.1 * np.max(k3) + 1)
    np.testing.assert_allclose(loss, want, rtol=0, atol=tol)
    assert 0 < float(metrics["clip_frac"]) < 1
    for key in ("pg_loss", "clip_frac", "kl_ref", "approx_kl_old"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=0, atol=tol)


def _tiny_batch(rng, Q=4, G=2, P=5, A=4, dtype=jnp.float32):
    B = Q * G
    tokens = rng.integers(3, 500, size=(B, P + A))
    tokens[:, :P] = np.repeat(tokens[::G, :P], G, axis=0)  # G responses per prompt
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = rng.integers(1, A + 1, size=B)
    response_mask = np.arange(A)[None] < lengths[:, None]
    mask = np.concatenate([np.ones((B, P), bool), response_mask], 1)
    window_mask = np.concatenate([np.zeros((B, 1), bool), response_mask], 1)
    return loss_lib.Batch(
        tokens=tokens,
        mask=jnp.asarray(mask),
        response_mask=jnp.asarray(window_mask),
        advantages=jnp.asarray(rng.normal(size=B), dtype),
        old_logp=jnp.asarray(-6.0 + rng.normal(scale=0.3, size=(B, A + 1)), dtype),
        ref_logp=jnp.asarray(-6.0 + rng.normal(scale=0.3, size=(B, A + 1)), dtype),
    )


def _tiny_loss(aggregation):
    config = get_preset("tiny", lora_rank=4)
    trainable, frozen = _tiny_weights(config)
    loss_config = loss_lib.LossConfig(kl_coef=0.1, aggregation=aggregation, group_size=2)
    loss_fn = functools.partial(loss_lib.policy_loss, model_config=config, loss_config=loss_config)
    return loss_fn, trainable, frozen, _tiny_batch(np.random.default_rng(1)), config


def _float64_loss(params, *, batch, frozen, aggregation="token-mean"):
    """A GRPO-shaped loss that computes in the params' dtype: per-token log-probs from a
    table of token scores (plus each row's prompt through `frozen`), the clipped surrogate
    and `grpo.aggregate_loss`; nonlinear, so every probe point has its own gradient."""
    window = batch.tokens[:, -batch.response_mask.shape[1] :]
    prompt = jnp.sum(frozen["prompt"][batch.tokens] * batch.mask, axis=1, keepdims=True)
    scores = params["table"][window] * params["scale"] + prompt
    logp = scores - jax.nn.logsumexp(params["table"]) * params["scale"]
    ratio = jnp.exp(logp - batch.old_logp)
    a = batch.advantages[:, None]
    per_token = (
        jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 0.8, 1.2)) + 0.1 * (logp - batch.ref_logp) ** 2
    )
    aggregate = functools.partial(
        grpo.aggregate_loss, mask_BxT=batch.response_mask, aggregation=aggregation, max_len=4
    )
    loss = aggregate(per_token)
    return loss, {"loss": loss, "logp": aggregate(logp)}  # aggregated alike: they accumulate


def _float64_problem(aggregation):
    rng = np.random.default_rng(2)
    params = {
        "table": jnp.asarray(rng.normal(scale=0.5, size=512)),
        "scale": jnp.asarray(1.3),
    }
    frozen = {"prompt": jnp.asarray(rng.normal(scale=0.01, size=512))}
    batch = _tiny_batch(np.random.default_rng(1), dtype=jnp.float64)
    loss_fn = functools.partial(_float64_loss, aggregation=aggregation)
    return loss_fn, params, frozen, batch


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_accumulated_gradients_equal_the_whole_batch(aggregation):
    with jax.enable_x64(True):  # exact math: float64, where only summation order differs
        loss_fn, params, frozen, batch = _float64_problem(aggregation)
        (_, whole_metrics), whole = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch=batch, frozen=frozen
        )
        assert {x.dtype for x in jax.tree.leaves(whole)} == {jnp.dtype(jnp.float64)}
        for micro in (2, 4):
            metrics, grads = step_lib.accumulated_value_and_grad(
                loss_fn, params, batch, frozen, micro_batches=micro, group_size=2,
                aggregation=aggregation,
            )  # fmt: skip
            assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float64)}
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(whole)):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
            for key in whole_metrics:
                np.testing.assert_allclose(metrics[key], whole_metrics[key], rtol=1e-12)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_accumulated_gradients_of_the_model_equal_the_whole_batch(aggregation):
    loss_fn, trainable, frozen, batch, config = _tiny_loss(aggregation)
    (_, whole_metrics), whole = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, batch=batch, frozen=frozen
    )
    B, T = batch.tokens.shape
    A = batch.response_mask.shape[1]
    for micro in (2, 4):
        metrics, grads = step_lib.accumulated_value_and_grad(
            loss_fn, trainable, batch, frozen, micro_batches=micro, group_size=2,
            aggregation=aggregation,
        )  # fmt: skip
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(whole)):
            # float32 (the model's): an entry sums B * T tokens' terms, each through D-wide
            # reductions, all at most ~ the leaf's largest entry; reordering (other micro-batch
            # shapes) moves the sum by <= eps32 * terms * magnitude.
            atol = EPS32 * B * T * config.dim * float(np.max(np.abs(b)))
            np.testing.assert_allclose(a, b, rtol=0, atol=atol)
        # A token (or row) mean of B * A float32 terms summed in another order.
        np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=EPS32 * B * A)


def test_micro_batched_gxpo_update_equals_the_whole_batch_update():
    with jax.enable_x64(True):  # exact math: float64, where only summation order differs
        loss_fn, params, frozen, batch = _float64_problem("token-mean")
        tx = gxpo(optax.adam(1e-2), gate=None)  # its probes' gradients come as grad_fn
        results = []
        for micro in (1, 2):
            update = step_lib.make_update_step(
                tx, loss_fn, info_prefix="gxpo", micro_batches=micro, group_size=2
            )
            own = jax.tree.map(jnp.copy, params)  # the step donates its state
            state = init_state(own, tx.init(own), {"position": 0})
            results.append(update(state, frozen, batch))
        (whole, whole_metrics), (micro, micro_metrics) = results
        for a, b in zip(jax.tree.leaves(micro.trainable), jax.tree.leaves(whole.trainable)):
            assert a.dtype == jnp.float64
            # Three Adam steps divide by the gradients' RMS, and g1 by g0: relative float64
            # rounding of the gradients, amplified by at most a few hundred.
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-11)
        np.testing.assert_allclose(
            micro_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-12
        )
        assert int(micro_metrics["grad_evals"]) == 3 == int(micro_metrics["gxpo/grad_evals"])
        assert int(micro.backward_passes) == 3
