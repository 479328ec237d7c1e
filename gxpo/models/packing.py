"""Responses packed into rows for the update's forward: no work on the padding after them.

A rollout batch's response window is as wide as its longest response (A), so every shorter row
carries padding through every layer and through the [A, V] output head. Packing places the
responses, each as one segment of consecutive slots, into R <= B rows of A slots (first fit,
longest first), so the forward runs R * A positions instead of B * A. Each segment attends to
its own earlier slots and to its group's prompt, which runs once per group beside the packed
rows (as in `gxpo.models.transformer.forward`'s shared-prefix pass); its rotary positions are
the unpacked row's. The math is the unpacked forward's: the same tokens see the same keys.

A plan is two index arrays, made on the host from the batch's mask (`plan`) and carried in
`gxpo.train.loss.Batch`:

- `src_RxA`: slot (r, u) holds the window token (b, t) at flat index b * A + t, or -1 (empty).
  A segment feeds window slots t = 0 .. n_b - 1 (the last prompt token and all but the last
  response token), which predict the response tokens t = 1 .. n_b.
- `at_BxA`: window slot (b, t) is predicted at packed flat index r * A + u (the slot holding
  (b, t - 1)), or R * A (none: t = 0 and the padding after the response).

Shapes: the key in `gxpo.models.config`; here A is the response window of `Batch`, n_b the
response tokens of row b, R the packed rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def row_bucket(rows: int) -> int:
    """Packed row counts are rounded up to a multiple of this (a quarter of the rows): each
    count is a compilation of the update, so a few sizes serve every batch."""
    return max(1, -(-rows // 4))


def plan(mask_BxT: np.ndarray, window: int, bucket: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(src_RxA, at_BxA) for the rows of `mask_BxT` (real tokens; responses right-padded) and
    a response window of A = `window` slots; R is a multiple of `bucket` (default
    `row_bucket(B)`), at most B."""
    mask_BxT = np.asarray(mask_BxT, bool)
    B, A = mask_BxT.shape[0], window
    n_B = mask_BxT[:, mask_BxT.shape[1] - A + 1 :].sum(axis=1)  # response tokens per row
    free: list[int] = []  # slots left in each packed row
    places = np.zeros((B, 2), np.int64)  # (row, first slot) of each segment
    for b in np.argsort(-n_B, kind="stable"):  # first fit, longest first
        n = int(n_B[b])
        r = next((i for i, f in enumerate(free) if f >= n), None)
        if r is None:
            r = len(free)
            free.append(A)
        places[b] = (r, A - free[r])
        free[r] -= n
    bucket = bucket or row_bucket(B)
    R = min(B, -(-max(len(free), 1) // bucket) * bucket)
    src_RxA = np.full((R, A), -1, np.int32)
    at_BxA = np.full((B, A), R * A, np.int32)
    for b in range(B):
        r, u = places[b]
        n = int(n_B[b])
        src_RxA[r, u : u + n] = b * A + np.arange(n)
        at_BxA[b, 1 : n + 1] = r * A + u + np.arange(n)
    return src_RxA, at_BxA


def packed_stream(
    tokens_BxT: jax.Array, mask_BxT: jax.Array, src_RxA: jax.Array, group_size: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """What the packed rows feed the model, from the batch and its plan: tokens [R, A], rotary
    positions [R, A], the next tokens they predict [R, A], the group of each slot [R, A] (-1:
    empty) and the own-keys mask [R, A, A] (a slot sees the earlier slots of its segment)."""
    B, T = tokens_BxT.shape
    R, A = src_RxA.shape
    window_BxA = tokens_BxT[:, T - A :]
    flat = window_BxA.reshape(-1)
    filled_RxA = src_RxA >= 0
    src_RxA = jnp.maximum(src_RxA, 0)
    row_RxA, t_RxA = src_RxA // A, src_RxA % A
    tokens_RxA = jnp.where(filled_RxA, flat[src_RxA], 0)
    # The next token of the last slot of a full-width segment (t = A - 1) lies outside the window:
    # it predicts nothing (the response ended there), so any token serves.
    next_RxA = jnp.where(filled_RxA, flat[jnp.minimum(src_RxA + 1, B * A - 1)], 0)
    before_B = jnp.sum(mask_BxT[:, : T - A + 1], axis=1) - 1  # the last prompt token's position
    positions_RxA = jnp.where(filled_RxA, before_B[row_RxA] + t_RxA, 0)
    group_RxA = jnp.where(filled_RxA, row_RxA // group_size, -1)
    segment_RxA = jnp.where(filled_RxA, row_RxA, -1 - jnp.arange(A)[None, :])  # empty: alone
    own_RxAxA = (segment_RxA[:, :, None] == segment_RxA[:, None, :]) & (
        t_RxA[:, None, :] <= t_RxA[:, :, None]
    )
    return tokens_RxA, positions_RxA, next_RxA, group_RxA, own_RxAxA


def unpack(values_RxA: jax.Array, at_BxA: jax.Array) -> jax.Array:
    """Per-slot values [R, A] (e.g. log-probs of the next token) back to the window [B, A]; 0
    where nothing predicts a slot."""
    flat = jnp.concatenate([values_RxA.reshape(-1), jnp.zeros((1,), values_RxA.dtype)])
    return flat[at_BxA]
