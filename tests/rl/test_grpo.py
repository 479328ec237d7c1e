"""GRPO advantages, token log-probs and loss: hand-worked numbers, a NumPy reference, masking.

Tests of the math run in float64 (the ``x64`` fixture; grpo keeps float64 inputs float64) and
compare at 1e-12; tests where float32 is the point (rounding, overflow, bitwise masking) say so.
"""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gxpo.rl import grpo

EXACT = dict(rtol=1e-12, atol=1e-15)  # float64 results against exact or float64 values


@pytest.fixture
def x64():
    """jax_enable_x64 for one test, restored afterwards."""
    with jax.enable_x64(True):
        yield


# --- A hand-worked batch: Q = 2 prompts x G = 2 responses, T = 3 token positions. -----------
# Rewards [1, 0 | 1, 1] with scale="none" (Dr.GRPO) give advantages [0.5, -0.5 | 0, 0].
# Response tokens (mask) and log-ratios log(pi / pi_old) per token:
#   row 0, A = +0.5: mask 1 1 0, ratio 1.5 1.0 (masked)
#   row 1, A = -0.5: mask 1 1 1, ratio 0.5 1.5 1.2
#   row 2, A =  0  : mask 1 0 0, ratio 2.0
#   row 3, A =  0  : mask 1 1 1, ratio 1   1   1
# pg = -min(r A, clip(r, 0.8, 1.2) A) per token:
#   row 0: -min(0.75, 0.6) = -0.6 (clipped), -0.5         -> sum -1.1, mean -0.55
#   row 1: -min(-0.25, -0.4) = 0.4 (clipped), -min(-0.75, -0.6) = 0.75, 0.6 (clip ties)
#                                                          -> sum 1.75, mean 0.58333
#   rows 2, 3: A = 0 -> 0.
# 9 response tokens; clipped term taken (strictly) on 2 of them.
HAND_MASK = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], bool)
HAND_LOG_RATIO = np.log([[1.5, 1.0, 1.0], [0.5, 1.5, 1.2], [2.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
HAND_ADV = np.array([0.5, -0.5, 0.0, 0.0])
# Reference: ref - logp = ln 2 at row 1 token 1 (k3: 2 - ln 2 - 1 = 0.306853) and -ln 2 at row 3
# token 0 (k3: 0.5 + ln 2 - 1 = 0.193147); k3 sums to 0.5, k1 = logp - ref sums to 0.
HAND_REF_MINUS_LOGP = np.zeros((4, 3))
HAND_REF_MINUS_LOGP[1, 1], HAND_REF_MINUS_LOGP[3, 0] = math.log(2), -math.log(2)


def hand_batch():
    logp = np.full((4, 3), -1.0)
    old = logp - HAND_LOG_RATIO
    ref = logp + HAND_REF_MINUS_LOGP
    # Garbage on masked entries must not reach the loss, the metrics or the gradient.
    old[0, 2], ref[0, 2], ref[2, 1] = np.nan, np.inf, 100.0
    return tuple(jnp.asarray(a, jnp.float64) for a in (logp, old, ref))


def test_group_advantages_hand_worked(x64):
    rewards = jnp.array([1.0, 0.0, 1.0, 1.0], jnp.float64)
    # Group 0: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5).
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    np.testing.assert_allclose(grpo.group_advantages(rewards, 2), [a, -a, 0, 0], **EXACT)
    np.testing.assert_allclose(
        grpo.group_advantages(rewards, 2, scale="none"), [0.5, -0.5, 0, 0], **EXACT
    )
    # Groups are consecutive rows: G = 4 is one group of mean 0.75, std sqrt(0.25) = 0.5.
    np.testing.assert_allclose(
        grpo.group_advantages(rewards, 4, eps=0.0), [0.5, -1.5, 0.5, 0.5], **EXACT
    )


def test_constant_group_gets_exactly_zero_advantage():
    # float32 on purpose: the float32 mean of three 0.1s is not 0.1; the advantage must still be
    # exactly 0.
    rewards = jnp.array([0.1, 0.1, 0.1, 0.3, 0.7, 0.2], jnp.float32)
    for scale in ("std", "none"):
        adv = np.asarray(grpo.group_advantages(rewards, 3, scale=scale))
        assert (adv[:3] == 0).all() and (adv[3:] != 0).all()
        assert adv.dtype == np.float32
    assert float(grpo.nonzero_group_fraction(grpo.group_advantages(rewards, 3), 3)) == 0.5


def test_token_logprobs_hand_worked(x64):
    # logits[0, 0] = log [1, 2, 3] -> p = [1, 2, 3] / 6 predicts tokens[0, 1] = 2: log(1/2).
    # logits[0, 1] = 0 -> uniform predicts tokens[0, 2] = 0: log(1/3). logits[0, 2] predicts
    # nothing; position 0 holds 0.
    p = np.array([[[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [5.0, 1.0, 1.0]]])
    logits = jnp.log(jnp.asarray(p, jnp.float64))
    tokens = jnp.array([[1, 2, 0]])
    logp, ent = grpo.token_logprobs_and_entropy(logits, tokens)
    np.testing.assert_allclose(logp, [[0.0, math.log(1 / 2), math.log(1 / 3)]], **EXACT)
    h0 = -(1 / 6 * math.log(1 / 6) + 1 / 3 * math.log(1 / 3) + 1 / 2 * math.log(1 / 2))
    np.testing.assert_allclose(ent, [[0.0, h0, math.log(3)]], **EXACT)
    # bf16 logits are computed in float32. Temperature 0.5 squares the probabilities:
    # [1, 4, 9] / 14, up to bf16's rounding of log 2 and log 3 (8 bits: 7e-3 of this log-prob).
    logits_bf16 = logits.astype(jnp.bfloat16)
    logp_t = grpo.token_logprobs(logits_bf16, tokens, temperature=0.5)
    assert logp_t.dtype == jnp.float32
    np.testing.assert_allclose(logp_t[0, 1], math.log(9 / 14), rtol=1e-2)
    # Against the rounded logits themselves: a few float32 ops on values up to 2.2, i.e.
    # ~10 eps32 * 2.2 / |log(9/14)| ~ 6e-6 relative.
    x = 2 * np.asarray(logits_bf16, np.float64)[0, 0]
    np.testing.assert_allclose(logp_t[0, 1], x[2] - np.log(np.exp(x).sum()), rtol=1e-5)


@pytest.mark.parametrize(
    "aggregation, max_len, pg_loss",
    [
        ("token-mean", None, 0.65 / 9),
        ("seq-mean-token-mean", None, (-0.55 + 1.75 / 3) / 4),
        ("seq-mean-token-sum-norm", None, 0.65 / 3),  # divisor T = 3, as verl
        ("seq-mean-token-sum-norm", 4, 0.65 / 4),
    ],
)
def test_grpo_loss_hand_worked(x64, aggregation, max_len, pg_loss):
    logp, old, ref = hand_batch()
    k3_a, k3_b = 1 - math.log(2), math.log(2) - 0.5  # the two nonzero k3 terms, sum 0.5
    kl_sum = {"token-mean": 0.5 / 9, "seq-mean-token-mean": (k3_a / 3 + k3_b / 3) / 4}
    kl_sum["seq-mean-token-sum-norm"] = 0.5 / (max_len or 3)
    loss, m = grpo.grpo_loss(
        logp, old, ref, jnp.asarray(HAND_ADV), jnp.asarray(HAND_MASK),
        kl_coef=0.1, aggregation=aggregation, max_len=max_len, group_size=2,
    )  # fmt: skip
    np.testing.assert_allclose(m["pg_loss"], pg_loss, **EXACT)
    np.testing.assert_allclose(loss, pg_loss + 0.1 * kl_sum[aggregation], **EXACT)
    np.testing.assert_allclose(m["loss"], loss)
    # clip_frac is a float32 count ratio: 2 / 9 to float32 rounding.
    np.testing.assert_allclose(m["clip_frac"], 2 / 9, rtol=1e-6)
    np.testing.assert_allclose(
        m["approx_kl_old"], -math.log(1.5 * 1.5 * 0.5 * 1.2 * 2) / 9, **EXACT
    )
    np.testing.assert_allclose(m["kl_ref"], 0.5 / 9, **EXACT)
    assert float(m["nonzero_adv_groups"]) == 0.5
    _, m1 = grpo.grpo_loss(
        logp, old, ref, jnp.asarray(HAND_ADV), jnp.asarray(HAND_MASK), kl_estimator="k1"
    )
    np.testing.assert_allclose(m1["kl_ref"], 0.0, **EXACT)


def test_asymmetric_clip_hand_worked(x64):
    # Row 0 token 0 (ratio 1.5, A = 0.5) under clip_eps_high = 0.28: pg = -1.28 * 0.5 = -0.64.
    logp, old, _ = hand_batch()
    _, m = grpo.grpo_loss(
        logp, old, None, jnp.asarray(HAND_ADV), jnp.asarray(HAND_MASK), kl_coef=0.0,
        clip_eps_high=0.28, aggregation="seq-mean-token-sum-norm", max_len=1,
    )  # fmt: skip
    np.testing.assert_allclose(m["pg_loss"], -0.64 - 0.5 + 1.75, **EXACT)


# --- NumPy reference on random inputs. ------------------------------------------------------


def np_group_advantages(rewards, g, scale, eps=1e-6):
    r = rewards.reshape(-1, g).astype(np.float64)
    centered = r - r.mean(1, keepdims=True)
    centered[r.max(1) == r.min(1)] = 0.0
    if scale == "std":
        centered /= r.std(1, ddof=1, keepdims=True) + eps
    return centered.reshape(-1)


def np_token_logprobs(logits, tokens, temperature):
    x = logits.astype(np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    logsm = x - np.log(np.exp(x).sum(-1, keepdims=True))
    out = np.zeros(tokens.shape)
    out[:, 1:] = np.take_along_axis(logsm[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    ent = np.zeros(tokens.shape)
    ent[:, 1:] = -(np.exp(logsm) * logsm).sum(-1)[:, :-1]
    return out, ent


def np_grpo_loss(logp, old, ref, adv, mask, eps_lo, eps_hi, kl_coef, est, agg, max_len):
    ratio = np.exp(logp - old)
    a = adv[:, None]
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps_lo, 1 + eps_hi))
    d = ref - logp
    kl = np.clip(np.exp(d) - d - 1, -10, 10) if est == "k3" else -d

    def reduce(x):
        x = np.where(mask, x, 0.0)
        if agg == "token-mean":
            return x.sum() / mask.sum()
        if agg == "seq-mean-token-mean":
            n = mask.sum(1)
            return (x.sum(1)[n > 0] / n[n > 0]).mean()
        return x.sum() / (max_len or mask.shape[1])

    return reduce(pg) + kl_coef * reduce(kl)


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("kl_estimator", ["k3", "k1"])
@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_matches_numpy_reference(x64, scale, kl_estimator, aggregation):
    rng = np.random.default_rng(zlib.crc32(f"{scale}/{kl_estimator}/{aggregation}".encode()))
    q, g, t, v = 3, 4, 6, 11
    b = q * g
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2
    tokens = rng.integers(0, v, size=(b, t))
    rewards = rng.integers(0, 2, size=b).astype(np.float32)
    rewards[:g] = 1.0  # one constant group
    mask = np.zeros((b, t), bool)
    mask[:, 2:] = rng.random((b, t - 2)) < 0.8
    mask[5] = False  # one response with no token
    old = np_token_logprobs(logits, tokens, 0.8)[0] + rng.normal(size=(b, t)) * 0.3
    ref = old + rng.normal(size=(b, t)) * 0.5
    max_len = 8 if aggregation == "seq-mean-token-sum-norm" else None
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05, kl_estimator=kl_estimator)

    f64 = lambda a: jnp.asarray(a, jnp.float64)
    adv = grpo.group_advantages(f64(rewards), g, scale=scale)
    np.testing.assert_allclose(adv, np_group_advantages(rewards, g, scale), **EXACT)
    logp, ent = grpo.token_logprobs_and_entropy(f64(logits), jnp.asarray(tokens), 0.8)
    np_logp, np_ent = np_token_logprobs(logits, tokens, 0.8)
    np.testing.assert_allclose(logp, np_logp, **EXACT)
    np.testing.assert_allclose(ent, np_ent, **EXACT)
    loss, metrics = grpo.grpo_loss(
        logp, f64(old), f64(ref), adv, jnp.asarray(mask), aggregation=aggregation,
        max_len=max_len, entropy_BxT=ent, group_size=g, **kw,
    )  # fmt: skip
    expected = np_grpo_loss(
        np_logp, old, ref, np_group_advantages(rewards, g, scale), mask,
        0.2, 0.28, 0.05, kl_estimator, aggregation, max_len,
    )  # fmt: skip
    np.testing.assert_allclose(loss, expected, **EXACT)
    np.testing.assert_allclose(metrics["entropy"], np_ent[mask].mean(), **EXACT)
    np.testing.assert_allclose(metrics["approx_kl_old"], (old - np_logp)[mask].mean(), **EXACT)


# --- Masking, gradients, "current" mode, chunking. -------------------------------------------


def random_problem(seed=0, b=4, t=7, v=13):
    k = jax.random.split(jax.random.key(seed), 5)
    logits = jax.random.normal(k[0], (b, t, v)) * 3
    tokens = jax.random.randint(k[1], (b, t), 0, v)
    mask = (jnp.arange(t) >= 2) & (jax.random.uniform(k[2], (b, t)) < 0.7)
    old = grpo.token_logprobs(logits, tokens) + 0.4 * jax.random.normal(k[3], (b, t))
    ref = old + 0.5 * jax.random.normal(k[4], (b, t))
    adv = jnp.array([1.0, -0.5, 0.0, 2.0])[:b]
    return logits, tokens, mask, old, ref, adv


def loss_from_logits(logits, tokens, mask, old, ref, adv, aggregation, chunk_size=None):
    logp, ent = grpo.token_logprobs_and_entropy(logits, tokens, 0.9, chunk_size=chunk_size)
    return grpo.grpo_loss(logp, old, ref, adv, mask, aggregation=aggregation, entropy_BxT=ent)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_masked_tokens_contribute_exactly_zero(aggregation):
    # float32 on purpose: masked entries must not change a single bit of the result.
    logits, tokens, mask, old, ref, adv = random_problem()
    f = jax.jit(jax.value_and_grad(loss_from_logits, has_aux=True), static_argnums=6)
    (loss, metrics), grad = f(logits, tokens, mask, old, ref, adv, aggregation)
    # logits[:, t] only feed token t + 1; perturb those whose next token is masked (and the
    # last position, which predicts nothing), plus the old/ref log-probs of masked tokens.
    unused_BxT = jnp.concatenate([~mask[:, 1:], jnp.ones_like(mask[:, :1])], axis=1)
    noise = 50 * jax.random.normal(jax.random.key(7), logits.shape)
    logits2 = jnp.where(unused_BxT[..., None], logits + noise, logits)
    old2, ref2 = jnp.where(mask, old, jnp.nan), jnp.where(mask, ref, -jnp.inf)
    (loss2, metrics2), grad2 = f(logits2, tokens, mask, old2, ref2, adv, aggregation)
    assert float(loss) == float(loss2)
    for k in ("pg_loss", "clip_frac", "approx_kl_old", "kl_ref", "entropy"):
        assert float(metrics[k]) == float(metrics2[k]), k
    assert jnp.all(jnp.isfinite(grad)) and jnp.any(grad != 0)
    assert jnp.array_equal(grad, grad2)
    assert jnp.all(jnp.where(unused_BxT[..., None], grad, 0.0) == 0)


def test_gradients_finite_at_extreme_ratios():
    # float32 on purpose: the overflow the clamps guard against.
    logits, tokens, mask, old, ref, adv = random_problem(1)
    # Rows 0-1: log-probs of order -1e4, so log-ratios and k3 hit their clamps (zero gradient
    # there, as in verl); rows 2-3 stay ordinary and must still get a gradient.
    logits = logits.at[:2].multiply(1e3)
    grad = jax.jit(jax.grad(loss_from_logits, has_aux=True), static_argnums=6)
    g, _ = grad(logits, tokens, mask, old, ref, adv, "token-mean")
    assert jnp.all(jnp.isfinite(g)) and jnp.any(g != 0)


def test_current_mode_is_the_plain_policy_gradient(x64):
    logits, tokens, mask, _, _, adv = random_problem(2)
    logp = grpo.token_logprobs(logits, tokens)

    def loss(lp, old):
        return grpo.grpo_loss(lp, old, None, adv, mask, kl_coef=0.0)

    (val, m), g = jax.value_and_grad(loss, has_aux=True)(logp, None)
    assert float(m["clip_frac"]) == 0 and float(m["approx_kl_old"]) == 0
    # ratio == 1: loss = -sum(A) / N and d loss / d logp = -A / N on response tokens.
    n = mask.sum()
    expected = jnp.where(mask, -adv[:, None] / n, 0.0)
    np.testing.assert_allclose(g, expected, **EXACT)
    np.testing.assert_allclose(val, jnp.sum(expected), **EXACT)
    # "rollout" mode anchored at the same point agrees in value and gradient.
    (val_r, _), g_r = jax.value_and_grad(loss, has_aux=True)(logp, logp)
    np.testing.assert_allclose(val_r, val, **EXACT)
    np.testing.assert_allclose(g_r, g, **EXACT)


@pytest.mark.parametrize("chunk_size", [3, 4])  # T = 7: overlapping last chunk / two chunks
def test_chunked_logprobs_match_unchunked(x64, chunk_size):
    logits, tokens, mask, old, ref, adv = random_problem(3)
    f = jax.jit(jax.value_and_grad(loss_from_logits, has_aux=True), static_argnums=(6, 7))
    (loss, m), g = f(logits, tokens, mask, old, ref, adv, "token-mean")
    (loss_c, m_c), g_c = f(logits, tokens, mask, old, ref, adv, "token-mean", chunk_size)
    np.testing.assert_allclose(loss_c, loss, **EXACT)
    np.testing.assert_allclose(m_c["entropy"], m["entropy"], **EXACT)
    np.testing.assert_allclose(g_c, g, **EXACT)
    lp, ent = grpo.token_logprobs_and_entropy(logits, tokens, chunk_size=chunk_size)
    np.testing.assert_allclose(lp, grpo.token_logprobs(logits, tokens), **EXACT)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: grpo.group_advantages(jnp.zeros(6), 4), "whole number of groups"),
        (lambda: grpo.group_advantages(jnp.zeros(6), 1), "at least 2"),
        (lambda: grpo.group_advantages(jnp.zeros(6), 3, scale="mad"), "scale='mad'"),
        (lambda: grpo.token_logprobs(jnp.zeros((1, 3, 5)), jnp.zeros((1, 3), int), 0.0), "> 0"),
        (lambda: grpo.token_logprobs(jnp.zeros((1, 3, 5)), jnp.zeros((1, 4), int)), "shape"),
        (lambda: grpo.grpo_loss(*_zeros(), None, *_adv_mask()), "needs reference"),
        (lambda: grpo.grpo_loss(*_zeros(), *_zeros()[:1], *_adv_mask(), kl_estimator="k2"), "k2"),
        (lambda: grpo.grpo_loss(*_zeros(), *_zeros()[:1], *_adv_mask(), aggregation="x"), "x"),
        (lambda: grpo.grpo_loss(*_zeros(), None, *_adv_mask(), kl_coef=0, clip_eps_low=1), "clip"),
        (lambda: grpo.grpo_loss(*_zeros(), None, jnp.zeros(3), _adv_mask()[1], kl_coef=0), "one"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _zeros():
    return jnp.zeros((2, 3)), jnp.zeros((2, 3))


def _adv_mask():
    return jnp.zeros(2), jnp.ones((2, 3), bool)


# --- The toolbox: population std, entropy bonus, GSPO's sequence ratio, overlong penalty. ----


def test_population_std_advantages(x64):
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], jnp.float64)  # G = 3
    r = np.asarray(rewards).reshape(2, 3)
    want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=0, keepdims=True) + 1e-6)
    got = grpo.group_advantages(rewards, 3, std="population")
    np.testing.assert_allclose(got, want.reshape(-1), **EXACT)
    # The default, unbiased std: the same advantages times std_0 / std_1 (eps aside).
    ratio = r.std(1, keepdims=True) / r.std(1, ddof=1, keepdims=True)
    unbiased = grpo.group_advantages(rewards, 3)
    np.testing.assert_allclose(unbiased, (want * ratio).reshape(-1), rtol=1e-5)


def test_entropy_bonus_is_subtracted_and_differentiated(x64):
    logp, old, ref = hand_batch()
    mask = jnp.asarray(HAND_MASK)
    entropy = jnp.asarray(np.arange(12.0).reshape(4, 3) / 10)
    adv = jnp.asarray(HAND_ADV)

    def loss(ent, coef):
        return grpo.grpo_loss(logp, old, ref, adv, mask, entropy_BxT=ent, entropy_coef=coef)[0]

    base = loss(entropy, 0.0)
    token_mean = np.sum(np.asarray(entropy) * HAND_MASK) / HAND_MASK.sum()
    np.testing.assert_allclose(loss(entropy, 1e-3), base - 1e-3 * token_mean, **EXACT)
    grad = jax.grad(loss)(entropy, 1e-3)
    np.testing.assert_allclose(grad, -1e-3 * HAND_MASK / HAND_MASK.sum(), **EXACT)
    with pytest.raises(ValueError, match="entropy_coef"):
        grpo.grpo_loss(logp, old, ref, adv, mask, entropy_coef=1e-3)


def test_sequence_importance_ratio_matches_gspo(x64):
    """Value and gradient against GSPO's formula written per response in NumPy."""
    rng = np.random.default_rng(0)
    B, T = 4, 5
    logp = jnp.asarray(rng.normal(-1.0, 0.3, (B, T)))
    old = jnp.asarray(np.asarray(logp) + rng.normal(0, 0.15, (B, T)))
    mask = jnp.asarray(rng.random((B, T)) < 0.8).at[:, 0].set(True)
    adv = jnp.asarray([1.0, -1.0, 0.5, -0.5])

    def ours(lp):
        return grpo.grpo_loss(
            lp, old, None, adv, mask, kl_coef=0.0, importance_level="sequence",
            aggregation="seq-mean-token-mean", clip_eps_low=0.05, clip_eps_high=0.05,
        )  # fmt: skip

    loss, metrics = ours(logp)
    m, lp, od, a = (np.asarray(x) for x in (mask, logp, old, adv))
    n = m.sum(1)
    s = np.exp(((lp - od) * m).sum(1) / n)
    clipped = np.clip(s, 0.95, 1.05)
    per_seq = np.maximum(-a * s, -a * clipped)
    np.testing.assert_allclose(loss, per_seq.mean(), **EXACT)
    # d/dlogp_t: s * A / n (times -1) where the unclipped term is taken, else 0.
    active = (-a * s) >= (-a * clipped)
    want = np.where(active, -a * s / n, 0.0)[:, None] * m / B
    np.testing.assert_allclose(jax.grad(lambda x: ours(x)[0])(logp), want, **EXACT)
    assert 0 < float(metrics["clip_frac"]) < 1  # some responses clipped whole, some not


def test_overlong_penalty_hand_worked(x64):
    lengths = jnp.asarray([10.0, 12.0, 14.0, 16.0])
    got = grpo.overlong_penalty(lengths, max_new_tokens=16, buffer=4, penalty=0.5)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.25, -0.5], **EXACT)
    np.testing.assert_array_equal(grpo.overlong_penalty(lengths, 16, 0), np.zeros(4))
    with pytest.raises(ValueError, match="overlong_buffer"):
        grpo.overlong_penalty(lengths, 16, 17)
