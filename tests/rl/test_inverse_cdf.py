"""The sampler's two-level inverse CDF: the same token as a search of the full running sum, never
a token of zero mass, across blocks, padding and empty blocks."""

import jax
import jax.numpy as jnp
import numpy as np

from gxpo.rl.sampling import InverseCdf

CDF = InverseCdf()
W = CDF.width


def _reference(weights_BxV: np.ndarray, u_B: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights_BxV.astype(np.float64), axis=-1)
    return np.argmax(cdf >= (u_B * cdf[:, -1])[:, None], axis=-1)


def test_matches_a_search_of_the_full_running_sum():
    rng = np.random.default_rng(0)
    V = 3 * W + 17  # the last block is padded
    weights = rng.exponential(size=(512, V)).astype(np.float32)
    weights[:, W : 2 * W] = 0.0  # an empty block in the middle
    u = 1.0 - rng.random(512, dtype=np.float32)
    token = np.asarray(CDF(jnp.asarray(weights), jnp.asarray(u)))
    expected = _reference(weights, u)
    assert np.mean(token == expected) > 0.99  # the rest: float32 vs float64 at a boundary
    assert np.all(np.abs(token - expected) <= 1)
    assert np.all(weights[np.arange(512), token] > 0)


def test_sparse_mass_is_drawn_in_proportion_and_zero_mass_never():
    V, rows = 2 * W + 5, 40_000
    mass = {3: 0.1, W - 1: 0.2, W: 0.3, V - 1: 0.4}
    weights = np.zeros((rows, V), np.float32)
    for index, p in mass.items():
        weights[:, index] = p
    u = 1.0 - jax.random.uniform(jax.random.key(0), (rows,))
    token = np.asarray(CDF(jnp.asarray(weights), u))
    assert set(np.unique(token)) <= set(mass)
    freq = np.bincount(token, minlength=V)[list(mass)] / rows
    np.testing.assert_allclose(freq, list(mass.values()), atol=0.01)
    # u = 1 exactly: the last token with mass, not the padding after it.
    last = CDF(jnp.asarray(weights[:1]), jnp.ones((1,)))
    assert int(last[0]) == V - 1
