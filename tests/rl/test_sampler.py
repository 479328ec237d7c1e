"""The KV-cache sampler: end tokens per row, log-probs equal the trainer's, determinism,
bucketed shapes share one compilation, the draw follows the softmax, and the refilling loop
returns the static loop's tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gxpo.models import forward, get_preset, init_model
from gxpo.rl.grpo import token_logprobs
from gxpo.rl.sampler import (
    SamplingConfig,
    benchmark_budgets,
    bucket_prompts,
    generate,
    parse_lengths,
    sample,
    split_prompts,
)
from gxpo.rl.sampling import Greedy, Temperature, TopP, uniforms


@pytest.fixture(scope="module")
def model():
    return init_model(get_preset("tiny"), seed=0)


# The sampler computes in float32 by design (models take float32 only, the draw rules cast the
# logits to float32), so its log-probs are compared in float32. Reordered sums of up to n terms
# err by about sqrt(n) roundings of the log-probs' magnitude (about log V at initialisation).
EPS32 = float(np.finfo(np.float32).eps)
TINY = get_preset("tiny")
LOG_V = float(np.log(TINY.vocab_size))
# Cached decode vs the full forward: two independent roundings, each of up to V terms in each of
# the L layers and the head (1.0e-4 for the tiny model).
FORWARD_TOL = 2 * (TINY.num_layers + 1) * np.sqrt(TINY.vocab_size) * LOG_V * EPS32


def _prompts(lengths, width, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 500, size=(len(lengths), width))
    mask = np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]
    return np.where(mask, tokens, 0), mask.astype(np.int32)


def test_logprobs_equal_a_trainer_forward_pass(model):
    tokens, mask = _prompts([5, 9, 2], width=9)
    out = generate(model, tokens, mask, jax.random.key(1), max_new_tokens=12, num_samples=2)
    logits = forward(model.weights(), model.config, out.tokens, out.attention_mask)
    logp = token_logprobs(logits, out.tokens, temperature=1.0)
    diff = np.where(out.response_mask, np.asarray(logp) - np.asarray(out.logprobs), 0.0)
    assert np.abs(diff).max() < FORWARD_TOL
    assert out.tokens.shape == (6, 32 + 12)  # prompts bucketed to 32, 2 samples per prompt
    # Each prompt's samples sit in consecutive rows and share the prompt.
    np.testing.assert_array_equal(out.tokens[0, :32], out.tokens[1, :32])


def test_end_tokens_stop_each_row_and_are_kept(model):
    tokens, mask = _prompts([4, 7, 3, 6], width=8, seed=1)
    eos = tuple(range(0, 512, 5))  # a fifth of the vocabulary: rows stop at different steps
    out = generate(
        model, tokens, mask, jax.random.key(3), max_new_tokens=20, eos_ids=eos, pad_id=511
    )
    response = np.asarray(out.tokens)[:, 32:]
    lengths = np.asarray(out.lengths)
    assert len(set(lengths.tolist())) > 1
    for row, n in zip(response, lengths):
        hits = np.flatnonzero(np.isin(row, eos))
        if n < 20:  # ended by an end token, which is the last token of the response
            assert hits[0] == n - 1 and row[n - 1] in eos
        else:
            assert hits.size == 0 or hits[0] == 19
        assert np.all(row[n:] == 511)
    np.testing.assert_array_equal(
        np.asarray(out.response_mask)[:, 32:], np.arange(20)[None] < lengths[:, None]
    )
    assert np.all(np.asarray(out.logprobs)[:, 32:][~np.asarray(out.response_mask)[:, 32:]] == 0)


def test_same_key_same_output_other_key_other_output(model):
    tokens, mask = _prompts([3, 5], width=6)
    kw = dict(max_new_tokens=10, num_samples=2)
    a = generate(model, tokens, mask, jax.random.key(7), **kw)
    b = generate(model, tokens, mask, jax.random.key(7), **kw)
    c = generate(model, tokens, mask, jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)


def test_prompt_lengths_in_one_bucket_share_one_compilation(model):
    kw = dict(max_new_tokens=6, prompt_bucket=16)
    generate(model, *_prompts([3, 4], width=5), jax.random.key(0), **kw)
    before = sample._cache_size()
    for width in (7, 11, 16):
        generate(model, *_prompts([2, width], width=width), jax.random.key(0), **kw)
    assert sample._cache_size() == before
    assert bucket_prompts(*_prompts([2], width=17), bucket=16)[0].shape == (1, 32)


def _system_prompts(rests, system=11, seed=2):
    """Left-padded prompts that all start with the same `system` tokens, bucketed to 16."""
    rng = np.random.default_rng(seed)
    head = rng.integers(3, 500, size=system)
    seqs = [np.concatenate([head, rng.integers(3, 500, size=n)]) for n in rests]
    width = max(map(len, seqs))
    tokens, mask = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
    for row, seq in enumerate(seqs):
        tokens[row, width - len(seq) :], mask[row, width - len(seq) :] = seq, 1
    return bucket_prompts(tokens, mask, 16)


def test_a_shared_system_prompt_and_decoding_in_segments_change_nothing(model):
    tokens, mask = _system_prompts([5, 9, 2, 7])  # P = 32
    assert split_prompts(tokens, mask, 16) == (8, 16)
    kw = dict(max_new_tokens=12, num_samples=2)
    # generate splits the prompts (one decoding segment); sample here does not (three).
    split = generate(model, tokens, mask, jax.random.key(4), prompt_bucket=16, **kw)
    args = (
        model.weights(),
        model.config,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(4),
    )
    segmented = sample(*args, SamplingConfig(**kw, segments=3))
    np.testing.assert_array_equal(split.tokens, segmented.tokens)
    # The two order the attention sums over the S = P + A slots differently, in each of the L
    # layers: L * sqrt(S) roundings of |log-prob| ~ log V (1.0e-5 here).
    S = tokens.shape[1] + kw["max_new_tokens"]
    tol = TINY.num_layers * np.sqrt(S) * LOG_V * EPS32
    np.testing.assert_allclose(split.logprobs, segmented.logprobs, atol=tol)
    np.testing.assert_array_equal(split.prompt_mask[:, :32], mask.repeat(2, axis=0))
    for out in (split, segmented):
        logits = forward(model.weights(), model.config, out.tokens, out.attention_mask)
        logp = token_logprobs(logits, out.tokens, temperature=1.0)
        diff = np.where(out.response_mask, np.asarray(logp) - np.asarray(out.logprobs), 0.0)
        assert np.abs(diff).max() < FORWARD_TOL


def test_refilling_sampler_returns_the_static_samplers_tokens(model):
    # 4 prompts sharing a system prompt x 3 samples through 5 slots: rows end at very different
    # steps (an end token every 9th id of the vocabulary, per-row budgets), so slots refill
    # often, and rows ending at their first token never take one.
    tokens, mask = _system_prompts([5, 9, 2, 7])
    kw = dict(
        max_new_tokens=20,
        num_samples=3,
        eos_ids=tuple(range(0, 512, 9)),
        pad_id=511,
        prompt_split=split_prompts(tokens, mask, 16),
    )
    budget_B = jnp.array([20, 20, 3, 20, 1, 20, 20, 6, 20, 20, 20, 20])
    args = (model.weights(), model.config, jnp.asarray(tokens), jnp.asarray(mask))
    static = sample(*args, jax.random.key(4), SamplingConfig(**kw), budget_B)
    refill = sample(*args, jax.random.key(4), SamplingConfig(**kw, slots=5), budget_B)
    np.testing.assert_array_equal(refill.tokens, static.tokens)
    np.testing.assert_array_equal(refill.lengths, static.lengths)
    np.testing.assert_array_equal(refill.response_mask, static.response_mask)
    np.testing.assert_array_equal(refill.prompt_mask, static.prompt_mask)
    # Attention sums in another order (the slots' ring, each slot's own prompt copy), in each
    # of the L layers, as in the segments' test.
    tol = TINY.num_layers * np.sqrt(tokens.shape[1] + 20) * LOG_V * EPS32
    np.testing.assert_allclose(refill.logprobs, static.logprobs, atol=tol)
    logits = forward(model.weights(), model.config, refill.tokens, refill.attention_mask)
    logp = token_logprobs(logits, refill.tokens, temperature=1.0)
    diff = np.where(refill.response_mask, np.asarray(logp) - np.asarray(refill.logprobs), 0.0)
    assert np.abs(diff).max() < FORWARD_TOL
    # The lengths the test means to cover, and each row ended by its end token or its budget.
    lengths, response = np.asarray(static.lengths), np.asarray(static.tokens)[:, 32:]
    ended = np.isin(response[np.arange(12), lengths - 1], kw["eos_ids"])
    assert lengths[4] == 1 and lengths[2] <= 3 and 20 in lengths
    assert np.sum(ended & (lengths == 1)) >= 1  # an end token first: never decoded
    assert len(set(lengths.tolist())) >= 6
    assert np.all(ended | (lengths == np.asarray(budget_B)))
    assert np.all(response[np.arange(20)[None] >= lengths[:, None]] == 511)


def test_uniforms_are_a_function_of_row_and_position():
    key, rows, positions = jax.random.key(5), jnp.array([0, 7, 3, 7]), jnp.array([2, 2, 9, 4])
    u = np.asarray(uniforms(key, rows, positions))
    np.testing.assert_array_equal(uniforms(key, rows[::-1], positions[::-1]), u[::-1])
    np.testing.assert_array_equal(uniforms(key, rows[1:2], positions[1:2]), u[1:2])
    assert np.all((u > 0) & (u <= 1)) and len(set(u.tolist())) == 4


def test_benchmark_budgets_are_long_tailed_within_the_budget():
    budgets = benchmark_budgets("lognormal:50:1.0", jax.random.key(0), 4000, 256)
    assert budgets.dtype == np.int32 and budgets.min() >= 1 and budgets.max() == 256
    # The median of 4000 draws is within ~0.04 sigma of the true one (exp(0.04) ~ 1.04).
    assert 46 <= np.median(budgets) <= 54 and budgets.mean() > 1.2 * np.median(budgets)
    np.testing.assert_array_equal(
        budgets, benchmark_budgets("lognormal:50:1.0", jax.random.key(0), 4000, 256)
    )
    assert parse_lengths("lognormal:50:0") == (50.0, 0.0)
    for bad in ("lognormal:50", "lognormal:0.5:1", "normal:50:1", "lognormal:a:1"):
        with pytest.raises(ValueError, match="lognormal:<median>:<sigma>"):
            parse_lengths(bad)


def test_split_prompts(model):
    # Rests of up to 41 - 8 tokens, rounded up to 48 but capped by the 48 - 8 columns left.
    assert split_prompts(*_system_prompts([1, 30, 4]), bucket=16) == (8, 40)
    assert split_prompts(*_system_prompts([0, 0]), bucket=16) == (8, 8)  # a token left over
    assert split_prompts(*_system_prompts([3, 5], system=7), bucket=16) is None  # under 8
    assert split_prompts(*_system_prompts([3]), bucket=16) is None  # one prompt
    tokens, mask = _system_prompts([3, 5])
    right = lambda x: np.stack([np.roll(row, n) for row, n in zip(x, mask.sum(axis=1))])
    assert split_prompts(right(tokens), right(mask), bucket=16) is None  # not left-padded
    prompts = (jnp.ones((2, 16), jnp.int32), jnp.ones((2, 16), bool), jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_split"):
        sample(
            model.weights(),
            model.config,
            *prompts,
            SamplingConfig(max_new_tokens=2, prompt_split=(8, 9)),
        )


def test_greedy_is_argmax_of_the_full_forward(model):
    tokens, mask = _prompts([6], width=6)
    out = generate(model, tokens, mask, jax.random.key(0), max_new_tokens=8, temperature=0.0)
    seq = jnp.asarray(tokens)
    msk = jnp.asarray(mask)
    for _ in range(8):
        logits = forward(model.weights(), model.config, seq, msk)
        seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
        msk = jnp.concatenate([msk, jnp.ones((1, 1), msk.dtype)], axis=1)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 32:], np.asarray(seq)[:, 6:])


def test_draws_follow_the_softmax_and_top_p_truncates():
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05, 0.0]))[None].repeat(20000, 0)
    draw = lambda seed: uniforms(jax.random.key(seed), jnp.arange(20000), jnp.zeros(20000, int))
    token, logp = Temperature(1.0)(logits, draw(0))
    freq = np.bincount(np.asarray(token), minlength=5) / 20000
    # A frequency's standard deviation over 20k draws is at most 0.0035: 0.012 is 3.4 of them.
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05, 0.0], atol=0.012)
    # A float32 log-softmax of 5 logits: a few roundings of |log p| <= 3, 10x below 1e-5.
    np.testing.assert_allclose(np.exp(logp), np.array([0.5, 0.3, 0.15, 0.05])[token], rtol=1e-5)
    token, _ = TopP(top_p=0.7, temperature=1.0)(logits, draw(1))
    freq = np.bincount(np.asarray(token), minlength=5) / 20000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0, 0], atol=0.012)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_samples=0), "num_samples"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(slots=-1), "slots"),
    ],
)
def test_bad_arguments(model, kwargs, field):
    with pytest.raises(ValueError, match=field):
        generate(model, *_prompts([2], width=2), jax.random.key(0), **kwargs)


def test_equal_settings_are_one_static_argument():
    a = SamplingConfig(max_new_tokens=4, eos_ids=[7, 2], pad_id=np.int64(0), temperature=1)
    b = SamplingConfig(max_new_tokens=4, eos_ids=(2, 7), pad_id=0, temperature=1.0)
    assert a == b and hash(a) == hash(b) and a.eos_ids == (2, 7)
    assert a.stop_ids == (2, 7)
    assert SamplingConfig(max_new_tokens=4, eos_ids=(2,), ignore_eos=True).stop_ids == (-1,)
    assert SamplingConfig(max_new_tokens=4, temperature=0.0).rule == Greedy()
    assert SamplingConfig(max_new_tokens=4, top_p=0.5).rule == TopP(top_p=0.5)
