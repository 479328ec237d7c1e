"""The sampler's token-draw rules: each a small frozen (hashable, so jit-static) object with
`rule(logits_BxV, u_B) -> (token_B, logprob_B)`, the log-prob of the drawn token under the
distribution it was drawn from (what the trainer's log-probs are compared with).

Shapes: the key in `gxpo.models.config`.

A token is drawn with a single uniform per row through the CDF, which is exact and avoids
generating V random numbers per row per step; the CDF is searched in two levels (`InverseCdf`:
block sums, then one block), so no step runs a cumulative sum over all V. Each uniform comes
from its (row, response position) alone (`uniforms`): a row draws the same tokens whichever
other rows share its batch and whenever it is decoded (the refilling sampler relies on it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def rule_for(temperature: float, top_p: float) -> Greedy | Temperature | TopP:
    """The rule that draws from softmax(logits / temperature) cut to its top-p mass."""
    if temperature == 0.0:
        return Greedy()
    if top_p < 1.0:
        return TopP(top_p=top_p, temperature=temperature)
    return Temperature(temperature=temperature)


@dataclasses.dataclass(frozen=True)
class Greedy:
    """The most likely token, and its log-prob under softmax(logits)."""

    def __call__(self, logits_BxV: jax.Array, u_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        del u_B
        logits_BxV = logits_BxV.astype(jnp.float32)
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        best_Bx1 = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)
        return token_B, -jnp.log(jnp.sum(jnp.exp(logits_BxV - best_Bx1), axis=-1))


@dataclasses.dataclass(frozen=True)
class InverseCdf:
    """The inverse CDF searched in blocks of `width` (W; sqrt(V) for V ~ 64k): a running sum
    over the Z block sums, then one inside the block the draw lands in. Two short cumsums
    instead of one over V, which takes several full passes on CPU."""

    width: int = 256

    def __call__(self, weights_BxV: jax.Array, u_B: jax.Array) -> jax.Array:
        """Per row, the first index whose running sum of `weights` (>= 0, some > 0) reaches u
        times their total."""
        blocks_BxZxW = self.blocks(weights_BxV, 0.0)
        inner = functools.partial(self.take, blocks_BxZxW)
        return self.search(jnp.sum(blocks_BxZxW, axis=-1), inner, u_B)[0]

    def blocks(self, x_BxV: jax.Array, fill: float) -> jax.Array:
        """[B, V] -> [B, Z, W], the last block filled up with `fill`."""
        B, V = x_BxV.shape
        padded_BxZW = jnp.pad(x_BxV, ((0, 0), (0, -V % self.width)), constant_values=fill)
        return padded_BxZW.reshape(B, -1, self.width)

    @staticmethod
    def take(blocks_BxZxW: jax.Array, block_B: jax.Array) -> jax.Array:
        """Each row's block `block_B`: [B, W]."""
        return jnp.take_along_axis(blocks_BxZxW, block_B[:, None, None], axis=1)[:, 0]

    def search(
        self, sums_BxZ: jax.Array, inner: Callable[[jax.Array], jax.Array], u_B: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """The index reached by u times the total of block sums `sums_BxZ`, where
        `inner(block_B)` gives the weights [B, W] inside the block it lands in, and each row's
        total weight."""
        cum_BxZ = jnp.cumsum(sums_BxZ, axis=-1)
        target_B = u_B * cum_BxZ[:, -1]
        # Rounding (the running sums need not be monotone) must never pick an empty block or an
        # empty slot: take the first nonempty block reaching the target, else the last nonempty.
        nonempty_BxZ = sums_BxZ > 0
        reached_BxZ = (cum_BxZ >= target_B[:, None]) & nonempty_BxZ
        last_B = sums_BxZ.shape[1] - 1 - jnp.argmax(nonempty_BxZ[:, ::-1], axis=-1)
        block_B = jnp.where(reached_BxZ.any(axis=-1), jnp.argmax(reached_BxZ, axis=-1), last_B)
        take = lambda x_BxZ: jnp.take_along_axis(x_BxZ, block_B[:, None], axis=-1)[:, 0]
        inner_BxW = inner(block_B)
        rest_B = target_B - (take(cum_BxZ) - take(sums_BxZ))
        index_B = jnp.sum(jnp.cumsum(inner_BxW, axis=-1) < rest_B[:, None], axis=-1)
        positive_BxW = inner_BxW > 0
        first_B = jnp.argmax(positive_BxW, axis=-1)
        last_in_block_B = self.width - 1 - jnp.argmax(positive_BxW[:, ::-1], axis=-1)
        index_B = jnp.clip(index_B, first_B, last_in_block_B)
        return (block_B * self.width + index_B).astype(jnp.int32), cum_BxZ[:, -1]


def uniforms(key: jax.Array, rows_B: jax.Array, positions_B: jax.Array) -> jax.Array:
    """u_B in (0, 1], each from the key folded with its row, then its position in the response:
    a function of (key, row, position) only. (In (0, 1]: the first token whose running mass
    reaches u * total then has positive mass.) Two key derivations and one draw per row and
    step, negligible beside a decoding step's matmuls."""

    def one(row, position):
        key_rp = jax.random.fold_in(jax.random.fold_in(key, row), position)
        return 1.0 - jax.random.uniform(key_rp, (), jnp.float32)

    return jax.vmap(one)(rows_B, positions_B)


def _scale(logits_BxV: jax.Array, temperature: float) -> jax.Array:
    logits_BxV = logits_BxV.astype(jnp.float32)
    return logits_BxV / temperature if temperature != 1.0 else logits_BxV


def _logprob(scaled_BxV, max_Bx1, total_B, token_B) -> jax.Array:
    """log softmax(scaled) at `token`, given the max and the total of exp(scaled - max)."""
    scaled_B = jnp.take_along_axis(scaled_BxV, token_B[:, None], axis=-1)[:, 0]
    return scaled_B - max_Bx1[:, 0] - jnp.log(total_B)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """A draw from softmax(logits / temperature) (> 0)."""

    temperature: float = 1.0
    cdf: InverseCdf = InverseCdf()

    def __call__(self, logits_BxV: jax.Array, u_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        scaled_BxV = _scale(logits_BxV, self.temperature)
        max_Bx1 = jnp.max(scaled_BxV, axis=-1, keepdims=True)
        # The total is the block sums' running sum (a sum over [B, V] costs as much as the max),
        # and only the block the draw lands in is read again.
        blocks_BxZxW = self.cdf.blocks(scaled_BxV, -jnp.inf)
        sums_BxZ = jnp.sum(jnp.exp(blocks_BxZxW - max_Bx1[:, :, None]), axis=-1)
        inner = lambda block_B: jnp.exp(self.cdf.take(blocks_BxZxW, block_B) - max_Bx1)
        token_B, total_B = self.cdf.search(sums_BxZ, inner, u_B)
        return token_B, _logprob(scaled_BxV, max_Bx1, total_B, token_B)


@dataclasses.dataclass(frozen=True)
class TopP:
    """Nucleus sampling: a draw from softmax(logits / temperature) cut to the smallest set of
    most likely tokens whose mass reaches `top_p`. The log-prob is of the full softmax."""

    top_p: float = 0.9
    temperature: float = 1.0
    cdf: InverseCdf = InverseCdf()

    def __call__(self, logits_BxV: jax.Array, u_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        scaled_BxV = _scale(logits_BxV, self.temperature)
        max_Bx1 = jnp.max(scaled_BxV, axis=-1, keepdims=True)
        weights_BxV = jnp.exp(scaled_BxV - max_Bx1)  # unnormalised probabilities, the largest 1
        total_B = jnp.sum(weights_BxV, axis=-1)
        sorted_BxV = jnp.sort(weights_BxV, axis=-1)[:, ::-1]
        before_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV
        kept_BxV = jnp.where(before_BxV < self.top_p * total_B[:, None], sorted_BxV, jnp.inf)
        cutoff_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
        token_B = self.cdf(jnp.where(weights_BxV >= cutoff_Bx1, weights_BxV, 0.0), u_B)
        return token_B, _logprob(scaled_BxV, max_Bx1, total_B, token_B)
