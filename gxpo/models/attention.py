"""The attention kernels, side by side: queries over keys and values already projected and rotated.

- `plain`: a call's queries over its own keys (the forward, a prompt's prefill).
- `shared_prefix`: rows' queries over a prefix held once per group of rows, then their own keys,
  in one softmax (the training forward's shared prompts, a prefill after a cached prefix).
- `cached`: one query per row over the parts of a decoding cache, each part normalised on its
  own and the parts then combined (the decoding step).

Queries arrive grouped by key/value head ([..., K, J, H]) and pre-scaled by 1/sqrt(H). Scores and
softmax run in float32; the weighted sum of values in the values' dtype.

Shapes: the key in `gxpo.models.config`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Finite, so a query with no visible key (a left-pad row) gets uniform weights instead of NaN,
# which would otherwise leak into gradients through the zero-weighted pad positions.
_MASKED = float(np.finfo(np.float32).min)


def plain(
    q_BxTxKxJxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, mask_BxTxS: jax.Array
) -> jax.Array:
    """Each row's queries over its own keys where `mask_BxTxS` shows them: y [B, T, K, J, H]."""
    scores = jnp.einsum(
        "BTKJH,BSKH->BKJTS", q_BxTxKxJxH, k_BxSxKxH, preferred_element_type=jnp.float32
    )
    scores = jnp.where(mask_BxTxS[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
    return jnp.einsum("BKJTS,BSKH->BTKJH", probs, v_BxSxKxH)


def shared_prefix(
    q_BxUxKxJxH: jax.Array,
    k_QxXxKxH: jax.Array,
    v_QxXxKxH: jax.Array,
    prefix_mask_QxX: jax.Array,
    k_BxUxKxH: jax.Array,
    v_BxUxKxH: jax.Array,
    mask_BxUxU: jax.Array,
) -> jax.Array:
    """Each row's queries over its group's shared prefix (all of it precedes them) and over its
    own tokens (`mask_BxUxU`), in one softmax: y [B, U, K, J, H]. Each of the Q prefixes serves
    G = B / Q consecutive rows (Q = 1: one prefix for all rows); its keys are never repeated per
    row. `prefix_mask_QxX` says which prefix keys all its rows see; a mask [Q, G, U, X] says it
    per query instead (packed rows, whose slots belong to different prompts)."""
    Q, X = k_QxXxKxH.shape[:2]
    B, U, K, J, H = q_BxUxKxJxH.shape
    G = B // Q
    f32 = jnp.float32
    q_QxGxUxKxJxH = q_BxUxKxJxH.reshape(Q, G, U, K, J, H)
    s_prefix = jnp.einsum(
        "QGUKJH,QXKH->QGKJUX", q_QxGxUxKxJxH, k_QxXxKxH, preferred_element_type=f32
    )
    if prefix_mask_QxX.ndim == 2:
        visible = prefix_mask_QxX[:, None, None, None, None]
    else:  # [Q, G, U, X]
        visible = prefix_mask_QxX[:, :, None, None]
    s_prefix = jnp.where(visible, s_prefix, _MASKED)
    # S: the own keys' slots (S = U).
    s_own = jnp.einsum("BUKJH,BSKH->BKJUS", q_BxUxKxJxH, k_BxUxKxH, preferred_element_type=f32)
    s_own = jnp.where(mask_BxUxU[:, None, None], s_own, _MASKED).reshape(Q, G, K, J, U, U)
    probs = jax.nn.softmax(jnp.concatenate([s_prefix, s_own], axis=-1), axis=-1)
    probs = probs.astype(v_BxUxKxH.dtype)
    y_prefix = jnp.einsum("QGKJUX,QXKH->QGUKJH", probs[..., :X], v_QxXxKxH)
    y_own = jnp.einsum("BKJUS,BSKH->BUKJH", probs[..., X:].reshape(B, K, J, U, U), v_BxUxKxH)
    return y_prefix.reshape(B, U, K, J, H) + y_own


def cached(q_BxKxJxH: jax.Array, parts: list[tuple]) -> jax.Array:
    """One query per row and head over the parts of a cache, one softmax across them all.

    A part is (keys [E, K, H, S], values [E, K, S, H], visible: bool broadcasting to
    [E, 1, 1, S], or None) whose E rows each serve B / E consecutive query rows: those query it
    together (M = (B / E) * J queries per key/value head in one matmul), so keys shared by
    several rows (a prompt's, a common prefix's) are read once per step.
    Each part is normalised by its own maximum (no relayout of the scores), the parts' sums then
    rescaled to the common one on [B, K, J]; the weights stay unnormalised until the
    [B, K, J, H] output, the smallest place to divide."""
    B, K, J, _ = q_BxKxJxH.shape
    f32 = jnp.float32

    def grouped(x_BxKxJ, E):  # [B, K, J, ...] -> [E, K, M, ...]
        rest = x_BxKxJ.shape[3:]
        x = x_BxKxJ.reshape(E, B // E, K, J, *rest).swapaxes(1, 2)
        return x.reshape(E, K, -1, *rest)

    def ungrouped(x_ExKxM):  # [E, K, M, ...] -> [B, K, J, ...]
        E, rest = x_ExKxM.shape[0], x_ExKxM.shape[3:]
        x = x_ExKxM.reshape(E, K, B // E, J, *rest).swapaxes(1, 2)
        return x.reshape(B, K, J, *rest)

    maxes, sums, totals = [], [], []
    for k_ExKxHxS, v_ExKxSxH, visible in parts:
        q_ExKxMxH = grouped(q_BxKxJxH, k_ExKxHxS.shape[0])
        s_ExKxMxS = jnp.einsum("EKMH,EKHS->EKMS", q_ExKxMxH, k_ExKxHxS, preferred_element_type=f32)
        if visible is not None:
            s_ExKxMxS = jnp.where(visible, s_ExKxMxS, _MASKED)
        max_ExKxMx1 = jnp.max(s_ExKxMxS, axis=-1, keepdims=True)
        e_ExKxMxS = jnp.exp(s_ExKxMxS - max_ExKxMx1)
        p_ExKxMxS = e_ExKxMxS.astype(v_ExKxSxH.dtype)
        y_ExKxMxH = jnp.einsum("EKMS,EKSH->EKMH", p_ExKxMxS, v_ExKxSxH, preferred_element_type=f32)
        maxes.append(ungrouped(max_ExKxMx1[..., 0]))
        sums.append(ungrouped(y_ExKxMxH))
        totals.append(ungrouped(jnp.sum(e_ExKxMxS, axis=-1)))
    max_BxKxJ = functools.reduce(jnp.maximum, maxes)
    scales = [jnp.exp(m_BxKxJ - max_BxKxJ) for m_BxKxJ in maxes]
    y_BxKxJxH = sum(y * c[..., None] for y, c in zip(sums, scales))
    total_BxKxJ = sum(t * c for t, c in zip(totals, scales))
    return (y_BxKxJxH / total_BxKxJ[..., None]).astype(q_BxKxJxH.dtype)
