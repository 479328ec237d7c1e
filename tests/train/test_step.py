"""The update step's loss on the response window equals the loss over the full sequence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gxpo.models import get_preset, init_model
from gxpo.models.lora import split_trainable
from gxpo.models.transformer import forward
from gxpo.rl import grpo
from gxpo.train import step as step_lib


def test_window_loss_and_logprobs_equal_the_full_sequence():
    config = get_preset("tiny", lora_rank=4)
    _, trainable, frozen = split_trainable(init_model(config, seed=0))
    trainable, frozen = (jax.tree.map(jnp.asarray, s.to_pure_dict()) for s in (trainable, frozen))
    # LoRA B != 0 so that adapters-off (the reference) differs from the policy.
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    weights = step_lib.merge_weights(trainable, frozen)

    rng = np.random.default_rng(0)
    B, P, N = 4, 6, 5
    tokens = rng.integers(3, 500, size=(B, P + N))
    tokens[:, :P] = np.repeat(tokens[::2, :P], 2, axis=0)  # groups of 2 responses per prompt
    tokens = jnp.asarray(tokens, jnp.int32)
    prompt_mask = np.arange(P)[None] >= np.array([[0], [0], [3], [3]])
    response_mask = np.arange(N)[None] < np.array([[5], [3], [1], [4]])
    mask = jnp.asarray(np.concatenate([prompt_mask, response_mask], 1))
    full_response_mask = jnp.concatenate([jnp.zeros((B, P), bool), jnp.asarray(response_mask)], 1)
    advantages = jnp.asarray([1.0, -1.0, 0.5, -0.5])

    old_w, ref_w = step_lib.batch_logprobs(
        trainable,
        frozen,
        None,
        tokens,
        mask,
        model_config=config,
        temperature=0.7,
        window=N + 1,
        with_old=True,
        reference="adapters_off",
        group_size=2,
    )
    full = grpo.token_logprobs(forward(weights, config, tokens, mask), tokens, 0.7)
    full_ref = grpo.token_logprobs(
        forward(weights, config, tokens, mask, use_lora=False), tokens, 0.7
    )
    # Window entry 0 is the last prompt token: no prediction inside the window, so 0.
    np.testing.assert_allclose(old_w[:, 1:], full[:, P:], atol=1e-5)
    np.testing.assert_allclose(ref_w[:, 1:], full_ref[:, P:], atol=1e-5)
    assert not np.any(old_w[:, 0]) and not np.any(ref_w[:, 0])

    # Perturb the old log-probs so that ratios differ from 1 and clipping binds somewhere.
    old_w = old_w + jnp.asarray(rng.normal(scale=0.3, size=old_w.shape), jnp.float32)
    old_full = jnp.concatenate([jnp.zeros((B, P - 1)), old_w], 1)
    ref_full = jnp.concatenate([jnp.zeros((B, P - 1)), ref_w], 1)
    loss_config = step_lib.LossConfig(temperature=0.7, kl_coef=0.1, group_size=2)
    batch = step_lib.Batch(
        tokens=tokens,
        mask=mask,
        response_mask=full_response_mask[:, P - 1 :],
        advantages=advantages,
        old_logp=old_w,
        ref_logp=ref_w,
    )
    loss, metrics = step_lib.policy_loss(
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
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert 0 < float(metrics["clip_frac"]) < 1
    for key in ("pg_loss", "clip_frac", "kl_ref", "approx_kl_old"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-7)


def _tiny_batch(config, rng, Q=4, G=2, P=5, N=4):
    B = Q * G
    tokens = rng.integers(3, 500, size=(B, P + N))
    tokens[:, :P] = np.repeat(tokens[::G, :P], G, axis=0)  # G responses per prompt
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = rng.integers(1, N + 1, size=B)
    response_mask = np.arange(N)[None] < lengths[:, None]
    mask = np.concatenate([np.ones((B, P), bool), response_mask], 1)
    window_mask = np.concatenate([np.zeros((B, 1), bool), response_mask], 1)
    return step_lib.Batch(
        tokens=tokens,
        mask=jnp.asarray(mask),
        response_mask=jnp.asarray(window_mask),
        advantages=jnp.asarray(rng.normal(size=B), jnp.float32),
        old_logp=jnp.asarray(-6.0 + rng.normal(scale=0.3, size=(B, N + 1)), jnp.float32),
        ref_logp=jnp.asarray(-6.0 + rng.normal(scale=0.3, size=(B, N + 1)), jnp.float32),
    )


def _tiny_loss(aggregation):
    config = get_preset("tiny", lora_rank=4)
    _, trainable, frozen = split_trainable(init_model(config, seed=0))
    trainable, frozen = (jax.tree.map(jnp.asarray, s.to_pure_dict()) for s in (trainable, frozen))
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    loss_config = step_lib.LossConfig(kl_coef=0.1, aggregation=aggregation, group_size=2)
    loss_fn = functools.partial(step_lib.policy_loss, model_config=config, loss_config=loss_config)
    return loss_fn, trainable, frozen, _tiny_batch(config, np.random.default_rng(1))


@pytest.mark.parametrize(
    "aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_accumulated_gradients_equal_the_whole_batch(aggregation):
    loss_fn, trainable, frozen, batch = _tiny_loss(aggregation)
    (_, whole_metrics), whole = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, batch=batch, frozen=frozen
    )
    for micro in (2, 4):
        metrics, grads = step_lib.accumulated_value_and_grad(
            loss_fn, trainable, batch, frozen, micro_batches=micro, group_size=2,
            aggregation=aggregation,
        )  # fmt: skip
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(whole)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-5)


def test_micro_batched_gxpo_update_equals_the_whole_batch_update():
    import optax

    from gxpo.optim import gxpo

    loss_fn, trainable, frozen, batch = _tiny_loss("token-mean")
    tx = gxpo(optax.adam(1e-2), loss_fn, has_aux=True, gate=None)
    results = []
    for micro in (1, 2):
        update = step_lib.make_update_step(
            tx, loss_fn, info_prefix="gxpo", micro_batches=micro, group_size=2
        )
        params = jax.tree.map(jnp.copy, trainable)
        results.append(update(params, tx.init(params), frozen, batch))
    (whole, _, whole_metrics), (micro, _, micro_metrics) = results
    # Gradients agree to rounding (above); after GXPO's three Adam steps, which divide by the
    # gradients' RMS and g1 by g0, the params agree to ~1e-5.
    for a, b in zip(jax.tree.leaves(micro), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, atol=5e-5)
    np.testing.assert_allclose(micro_metrics["grad_norm"], whole_metrics["grad_norm"], rtol=1e-4)
    assert int(micro_metrics["grad_evals"]) == 3
