"""Responses packed into rows give the unpacked forward's logits, log-probs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
from hf_tiny import decoder_terms, f32_atol

from gxpo.models import get_preset, init_model
from gxpo.models.packing import plan, unpack
from gxpo.models.transformer import forward, forward_packed

Q, G, S, U = 3, 4, 10, 7  # groups, rows per group, prompt columns, response columns
A = U + 1  # the window: the last prompt token and the response slots


def _batch(lengths):
    rng = np.random.default_rng(0)
    prompt_mask = np.arange(S)[None] >= np.array([[0], [3], [7]])  # left padding per prompt
    tokens = np.concatenate(
        [np.repeat(rng.integers(1, 500, (Q, S)), G, axis=0), rng.integers(1, 500, (Q * G, U))],
        axis=1,
    )
    mask = np.concatenate(
        [np.repeat(prompt_mask, G, axis=0), np.arange(U)[None] < np.asarray(lengths)[:, None]],
        axis=1,
    )
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def test_plan_packs_first_fit_longest_first_and_indexes_back():
    lengths = [7, 1, 2, 3, 6, 1, 7, 2, 4, 4, 1, 5]  # response tokens per row
    _, mask = _batch(lengths)
    src, at = plan(np.asarray(mask), A, bucket=1)
    # Segments of n_b slots in rows of A = 8: 7+1, 7+1, 6+2, 5+3, 4+4, 2+1 (first fit, longest
    # first): 6 rows instead of 12.
    assert src.shape == (6, A)
    filled = src[src >= 0]
    assert sorted(filled.tolist()) == sorted(
        b * A + t for b, n in enumerate(lengths) for t in range(n)
    )
    for b, n in enumerate(lengths):
        for t in range(1, n + 1):  # slot (b, t) is predicted where (b, t - 1) sits
            assert src.reshape(-1)[at[b, t]] == b * A + t - 1
        assert (at[b, n + 1 :] == src.size).all() and at[b, 0] == src.size
    assert plan(np.asarray(mask), A, bucket=4)[0].shape == (8, A)  # rounded up
    assert plan(np.asarray(mask), A, bucket=5)[0].shape == (10, A)


def test_packed_forward_equals_the_unpacked_one():
    """Logits at every response slot, and a log-prob loss's value and LoRA gradients."""
    config = get_preset("tiny", lora_rank=4, qkv_bias=True)
    weights = init_model(config, seed=0).weights()
    noise = lambda w: jax.random.normal(jax.random.key(1), w.shape, w.dtype) * 0.1
    weights = jax.tree_util.tree_map_with_path(
        lambda path, w: noise(w) if "lora_b" in jax.tree_util.keystr(path) else w, weights
    )
    lengths = [7, 1, 2, 3, 6, 1, 7, 2, 4, 4, 1, 5]
    tokens, mask = _batch(lengths)
    src, at = (jnp.asarray(a) for a in plan(np.asarray(mask), A))
    window = tokens[:, -A:]
    response = jnp.arange(A)[None] - 1 < jnp.asarray(lengths)[:, None]
    response = response.at[:, 0].set(False)  # [B, A]: the slots holding response tokens

    def logp_unpacked(trainable):
        merged = {**weights, "layers": {**weights["layers"], **trainable}}
        logits = forward(merged, config, tokens, mask, logits_start=S + U - A, shared_prefix_rows=G)
        lsm = jax.nn.log_softmax(logits[:, :-1])  # slot t - 1 predicts window slot t
        picked = jnp.take_along_axis(lsm, window[:, 1:, None], axis=-1)[..., 0]
        return jnp.pad(picked, ((0, 0), (1, 0))), logits

    def logp_packed(trainable):
        merged = {**weights, "layers": {**weights["layers"], **trainable}}
        logits, next_tokens = forward_packed(merged, config, tokens, mask, src, group_size=G)
        lsm = jax.nn.log_softmax(logits)
        picked = jnp.take_along_axis(lsm, next_tokens[..., None], axis=-1)[..., 0]
        return unpack(picked, at), logits

    def loss(trainable, fn):
        logp, logits = fn(trainable)
        return jnp.sum(jnp.where(response, logp, 0.0)) / 100, (logp, logits)

    trainable = {k: v for k, v in weights["layers"].items() if k in ("q_proj", "v_proj")}
    (plain, (plain_logp, plain_logits)), plain_grads = jax.value_and_grad(loss, has_aux=True)(
        trainable, logp_unpacked
    )
    (packed, (packed_logp, packed_logits)), packed_grads = jax.value_and_grad(loss, has_aux=True)(
        trainable, logp_packed
    )
    # Same math in another order, in float32: the tiny preset's rounding allowance.
    terms = decoder_terms(2, 128)
    resp = np.asarray(response)
    magnitude = np.abs(np.asarray(plain_logp)[resp]).max()
    np.testing.assert_allclose(
        np.asarray(packed_logp)[resp],
        np.asarray(plain_logp)[resp],
        rtol=0,
        atol=f32_atol(magnitude, terms + config.vocab_size),
    )
    assert (np.asarray(packed_logp)[~resp] == 0).all()
    # Each slot's logits are those of the window slot it holds.
    src_np = np.asarray(src)
    rows, slots = np.nonzero(src_np >= 0)
    b, t = src_np[rows, slots] // A, src_np[rows, slots] % A
    np.testing.assert_allclose(
        np.asarray(packed_logits)[rows, slots],
        np.asarray(plain_logits)[b, t],
        rtol=0,
        atol=f32_atol(np.abs(np.asarray(plain_logits)).max(), terms),
    )
    np.testing.assert_allclose(packed, plain, rtol=0, atol=f32_atol(abs(plain), terms + resp.size))
    grad_terms = 2 * terms + tokens.size
    for a, b_ in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b_, rtol=0, atol=f32_atol(np.abs(b_).max(), grad_terms))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain_grads)) > 1e-4
