"""The sampler's two-level inverse CDF: the same token as a search of the full running sum, never
a token of zero mass, across blocks, padding and empty blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gxpo.rl.sampling import InverseCdf

CDF = InverseCdf()
W = CDF.width


def _reference(weights_BxV: np.ndarray, u_B: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights_BxV.astype(np.float64), axis=-1)
    return np.argmax(cdf >= (u_B * cdf[:, -1])[:, None], axis=-1)


def _weights_with_an_empty_block(rows: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    V = 3 * W + 17  # the last block is padded
    weights = rng.exponential(size=(rows, V))
    weights[:, W : 2 * W] = 0.0  # an empty block in the middle
    return weights, 1.0 - rng.random(rows)


def test_matches_a_search_of_the_full_running_sum():
    weights, u = _weights_with_an_empty_block(512)
    weights, u = weights.astype(np.float32), u.astype(np.float32)
    token = np.asarray(CDF(jnp.asarray(weights), jnp.asarray(u)))
    expected = _reference(weights, u)
    assert np.mean(token == expected) > 0.99  # the rest: float32 vs float64 at a boundary
    assert np.all(np.abs(token - expected) <= 1)
    assert np.all(weights[np.arange(512), token] > 0)


def test_in_float64_is_exactly_the_search_of_the_full_running_sum():
    # The same sums in two orders: in float64 a draw lands within rounding of a boundary with
    # probability ~ V * 1e-16 per row, so every token must equal the reference's.
    weights, u = _weights_with_an_empty_block(512)
    with jax.enable_x64(True):
        token = np.asarray(CDF(jnp.asarray(weights, jnp.float64), jnp.asarray(u, jnp.float64)))
    np.testing.assert_array_equal(token, _reference(weights, u))


@pytest.mark.parametrize("width", [W, 7])
def test_sparse_mass_is_drawn_in_proportion_and_zero_mass_never(width):
    cdf = InverseCdf(width)
    V, rows = 2 * W + 5, 40_000
    mass = {3: 0.1, W - 1: 0.2, W: 0.3, V - 1: 0.4}
    weights = np.zeros((rows, V), np.float32)
    for index, p in mass.items():
        weights[:, index] = p
    u = 1.0 - jax.random.uniform(jax.random.key(0), (rows,))
    token = np.asarray(cdf(jnp.asarray(weights), u))
    assert set(np.unique(token)) <= set(mass)
    freq = np.bincount(token, minlength=V)[list(mass)] / rows
    # A frequency's standard deviation over 40k draws is at most 0.0025: 0.01 is 4 of them.
    np.testing.assert_allclose(freq, list(mass.values()), atol=0.01)
    # u = 1 exactly: the last token with mass, not the padding after it.
    last = cdf(jnp.asarray(weights[:1]), jnp.ones((1,)))
    assert int(last[0]) == V - 1
