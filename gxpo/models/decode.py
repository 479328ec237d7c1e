"""Decoding: the prompt's KV cache (`prefill`), the cache a decoding loop carries, one step.

`prefill` runs prompts and returns a `KVCache`, every layer's keys and values stacked. A
decoding loop turns it once into a `DecodeCache` (`KVCache.for_decoding`), which `decode` steps
one token per row: per layer, laid out for the step's matmuls, each prompt's keys held once for
its rows, with room for the decoded tokens. The step's layers are unrolled over
`unstack_layers(weights)`, each a `qkv` -> `attention.cached` -> `finish` of
`gxpo.models.transformer`.

Shapes: the key in `gxpo.models.config`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gxpo.models import attention
from gxpo.models.config import ModelConfig
from gxpo.models.sharding import (
    ACTIVATION_AXES,
    DECODE_KEYS_AXES,
    DECODE_VALUES_AXES,
    KV_CACHE_AXES,
    constrain,
)
from gxpo.models.transformer import embed, finish, hidden, qkv, rope_tables, to_logits


class KVCache(NamedTuple):
    """The keys and values of every layer over prompts, as `prefill` makes them; written once.

    Rows whose prompt is shorter carry padding slots that `mask` hides, and `positions` keeps each
    row's own rotary position. `decode` does not take it: it is the prompt part of the cache a
    decoding loop carries (`for_decoding`), or a prefix that a later `prefill(..., prefix=)`
    continues. A decoding loop drawing A tokens per row, G rows per prompt:

        weights = fold_lora(model.weights(), model.config)  # optional: no adapter matmuls
        logits_QxV, cache = prefill(weights, config, prompt_QxP, mask_QxP, P)
        cache = cache.for_decoding(copies=G, slots=A - 1)  # the A - 1 tokens fed back
        cache = cache.with_rope(config)  # optional: rotary tables once per step
        weights = unstack_layers(weights)  # once, outside the loop
        token_B = pick(jnp.repeat(logits_QxV, G, axis=0))
        for _ in range(A - 1):  # or a jax.lax.while_loop carrying the cache
            logits_BxV, cache = decode(weights, config, token_B, cache)
            token_B = pick(logits_BxV)
    """

    k: jax.Array  # [L, B, S, K, H] compute dtype
    v: jax.Array  # [L, B, S, K, H] compute dtype
    mask: jax.Array  # [B, S] bool: slot holds a real token
    positions: jax.Array  # [B] int32: rotary position of the row's next token

    def for_decoding(self, copies: int, slots: int, shared: KVCache | None = None) -> DecodeCache:
        """This cache as the prompt part of a `DecodeCache` with `copies` rows per row here and
        room for `slots` decoded tokens (every slot here, `mask` hiding those not filled).

        `shared`: the one-row cache of a prefix that every prompt here continues (made by
        `prefill` and passed to this cache's `prefill(..., prefix=shared)`); its keys and
        values are then held once for all rows."""
        layers = range(self.k.shape[0])
        Q, _, K, H = self.k.shape[1:]
        zeros = lambda *shape: jnp.zeros(shape, self.k.dtype)
        # A buffer per layer (not one shared): an eager `decode` donates each of them.
        empty_k = lambda: constrain(zeros(Q * copies, K, H, slots), DECODE_KEYS_AXES)
        empty_v = lambda: constrain(zeros(Q * copies, K, slots, H), DECODE_VALUES_AXES)
        prompt_k, prompt_v = _decode_layout(self)
        shared_k, shared_v = _decode_layout(shared) if shared is not None else ((), ())
        return DecodeCache(
            prompt_k=prompt_k,
            prompt_v=prompt_v,
            prompt_mask=self.mask,
            k=tuple(empty_k() for _ in layers),
            v=tuple(empty_v() for _ in layers),
            positions=jnp.repeat(self.positions, copies, axis=0),
            index=jnp.zeros((), jnp.int32),
            shared_k=shared_k,
            shared_v=shared_v,
            shared_mask=shared.mask if shared is not None else None,
        )


def _decode_layout(cache: KVCache) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Per layer, the keys [E, K, H, S] and values [E, K, S, H] of a `KVCache` of E rows."""
    keys = lambda k_ExSxKxH: constrain(k_ExSxKxH.transpose(0, 2, 3, 1), DECODE_KEYS_AXES)
    values = lambda v_ExSxKxH: constrain(v_ExSxKxH.transpose(0, 2, 1, 3), DECODE_VALUES_AXES)
    layers = range(cache.k.shape[0])
    return tuple(keys(cache.k[i]) for i in layers), tuple(values(cache.v[i]) for i in layers)


class DecodeCache(NamedTuple):
    """The KV cache as a decoding loop carries it (`KVCache.for_decoding`).

    Per layer, since slicing one layer out of a stacked array copies it at every step. Keys
    [B, K, H, S] and values [B, K, S, H]: both attention matmuls then read the cache as a plain
    (untransposed) right operand, which is faster than keys stored like values. Each prompt's
    keys and values are held once for its G rows (drawing G samples per prompt then reads them
    once per step, not G times), the decoded tokens' per row; every row writes decoded slot
    `index` at each step, so slots [0, index] are the ones visible. A prefix common to all
    prompts (a system prompt) may be held once for all rows (`shared_*`).
    """

    prompt_k: tuple[jax.Array, ...]  # L x [Q, K, H, P] compute dtype
    prompt_v: tuple[jax.Array, ...]  # L x [Q, K, P, H] compute dtype
    prompt_mask: jax.Array  # [Q, P] bool: slot holds a real prompt token
    k: tuple[jax.Array, ...]  # L x [B, K, H, S] compute dtype: decoded tokens, B = Q * G
    v: tuple[jax.Array, ...]  # L x [B, K, S, H] compute dtype
    positions: jax.Array  # [B] int32: rotary position of the row's next token
    index: jax.Array  # [] int32: next decoded slot to write
    shared_k: tuple[jax.Array, ...] = ()  # L x [1, K, H, X] compute dtype: X shared slots
    shared_v: tuple[jax.Array, ...] = ()  # L x [1, K, X, H] compute dtype
    shared_mask: jax.Array | None = None  # [1, X] bool: slot holds a real prefix token
    rope: tuple[jax.Array, jax.Array] | None = None  # cos, sin [B, 1, 1, H/2] of `positions`

    def with_rope(self, config: ModelConfig) -> DecodeCache:
        """This cache carrying the rotary tables of its rows' next positions, which `decode`
        then updates. A loop carrying them computes each step's cos and sin once: computed
        inside the step, XLA fuses them into every layer's rotary and recomputes them there for
        every element of q and k."""
        return self._replace(rope=rope_tables(config, self.positions[:, None]))

    def grow(self, slots: int) -> DecodeCache:
        """This cache with room for `slots` decoded tokens (at least as many as now). A step
        reads every decoded slot, visible or not: a loop that grows the cache in a few segments
        reads fewer slots than one that allocates all of them up front."""
        extra = slots - self.v[0].shape[2]
        if extra < 0:
            raise ValueError(f"DecodeCache.grow: slots={slots} < the {slots - extra} it has")
        pad_k = lambda k: constrain(jnp.pad(k, ((0, 0),) * 3 + ((0, extra),)), DECODE_KEYS_AXES)
        pad_v = lambda v: constrain(
            jnp.pad(v, ((0, 0), (0, 0), (0, extra), (0, 0))), DECODE_VALUES_AXES
        )
        return self._replace(k=tuple(map(pad_k, self.k)), v=tuple(map(pad_v, self.v)))


@functools.partial(jax.jit, static_argnames=("config", "cache_size", "use_lora"))
def prefill(
    weights: dict,
    config: ModelConfig,
    tokens_BxT: jax.Array,
    mask_BxT: jax.Array,
    cache_size: int,
    *,
    prefix: KVCache | None = None,
    use_lora: bool = True,
) -> tuple[jax.Array, KVCache]:
    """Runs the prompt, returns the logits [B, V] at each row's last real token and a cache of
    `cache_size` slots (>= T) holding the prompt in slots [0, T), the rest empty (masked).

    `prefix`: a cache (one row, or B) that every row's tokens continue, e.g. a system prompt
    prefilled once for all prompts: positions go on from its own and its slots are attended
    to. The returned cache holds this call's tokens only; decode with
    `cache.for_decoding(..., shared=prefix)`.
    """
    B, T = tokens_BxT.shape
    if cache_size < T:
        raise ValueError(f"prefill: cache_size={cache_size} is smaller than the prompt length {T}")
    mask_BxT = mask_BxT.astype(bool)
    if prefix is None:
        x_BxTxD, (k, v) = hidden(config, weights, tokens_BxT, mask_BxT, use_lora, collect_kv=True)
        start_B = jnp.zeros((B,), jnp.int32)
    else:
        x_BxTxD, (k, v) = _hidden_after_prefix(
            config, weights, prefix, tokens_BxT, mask_BxT, use_lora
        )
        start_B = jnp.broadcast_to(prefix.positions, (B,))
    last_B = T - 1 - jnp.argmax(mask_BxT[:, ::-1], axis=1)
    x_Bx1xD = jnp.take_along_axis(x_BxTxD, last_B[:, None, None], axis=1)
    logits_BxV = to_logits(config, weights, x_Bx1xD)[:, 0]
    pad = cache_size - T
    kv_pad = ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))
    cache = KVCache(
        k=constrain(jnp.pad(k, kv_pad), KV_CACHE_AXES),
        v=constrain(jnp.pad(v, kv_pad), KV_CACHE_AXES),
        mask=jnp.pad(mask_BxT, ((0, 0), (0, pad))),
        positions=start_B + mask_BxT.sum(axis=1, dtype=jnp.int32),
    )
    return logits_BxV, cache


def _hidden_after_prefix(config, weights, prefix: KVCache, tokens_BxT, mask_BxT, use_lora):
    """`hidden` (keys and values collected) for tokens that continue `prefix`'s rows (E = 1, or
    B): each layer attends over the prefix's X slots and this call's own, in one softmax."""
    T = tokens_BxT.shape[1]
    positions_BxT = prefix.positions[:, None] + jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
    rope = rope_tables(config, positions_BxT)
    own_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & mask_BxT[:, None, :]

    def body(x_BxTxD, layer):
        p, k_ExXxKxH, v_ExXxKxH = layer
        q_BxTxKxJxH, k_BxTxKxH, v_BxTxKxH = qkv(config, p, x_BxTxD, rope, use_lora)
        y_BxTxKxJxH = attention.shared_prefix(
            q_BxTxKxJxH, k_ExXxKxH, v_ExXxKxH, prefix.mask, k_BxTxKxH, v_BxTxKxH, own_BxTxT
        )
        x_BxTxD = finish(config, p, x_BxTxD, y_BxTxKxJxH, use_lora)
        return constrain(x_BxTxD, ACTIVATION_AXES), (k_BxTxKxH, v_BxTxKxH)

    x_BxTxD = constrain(embed(config, weights, tokens_BxT), ACTIVATION_AXES)
    return jax.lax.scan(body, x_BxTxD, (weights["layers"], prefix.k, prefix.v))


def unstack_layers(weights: dict) -> dict:
    """`weights` with `layers` as a tuple of per-layer dicts, as `decode` reads them. A decoding
    loop makes this once, before the loop: a layer's slice of a stacked array taken inside the
    loop is copied at every step."""
    layers = weights["layers"]
    if isinstance(layers, tuple):
        return weights
    leaves, treedef = jax.tree.flatten(layers)
    count = leaves[0].shape[0]
    return {
        **weights,
        "layers": tuple(treedef.unflatten([x[i] for x in leaves]) for i in range(count)),
    }


def _write_slot(k_BxKxHxS, v_BxKxSxH, k_Bx1xKxH, v_Bx1xKxH, slot):
    """A layer's decoded keys and values with this token's in slot `slot`."""
    zero = jnp.zeros((), jnp.int32)
    k_BxKxHx1 = k_Bx1xKxH.transpose(0, 2, 3, 1).astype(k_BxKxHxS.dtype)
    k_BxKxHxS = jax.lax.dynamic_update_slice(k_BxKxHxS, k_BxKxHx1, (zero, zero, zero, slot))
    v_BxKx1xH = v_Bx1xKxH.swapaxes(1, 2).astype(v_BxKxSxH.dtype)
    v_BxKxSxH = jax.lax.dynamic_update_slice(v_BxKxSxH, v_BxKx1xH, (zero, zero, slot, zero))
    return k_BxKxHxS, v_BxKxSxH


@functools.partial(jax.jit, static_argnames=("config", "use_lora"), donate_argnames=("cache",))
def decode(
    weights: dict,
    config: ModelConfig,
    tokens_B: jax.Array,
    cache: DecodeCache,
    *,
    use_lora: bool = True,
    visible_BxS: jax.Array | None = None,
) -> tuple[jax.Array, DecodeCache]:
    """Feeds one token per row; returns the next-token logits [B, V] and the updated cache. The
    cache is updated in place (donated when called eagerly; inside a jitted loop, carry it).

    Pass `unstack_layers(weights)`, made once before a decoding loop (see `KVCache`): the layers
    are then unrolled, each reading its own weights and cache without a copy; `weights` stacked
    still works, at the cost of that copy per step.

    `visible_BxS`: the decoded slots each row sees, this step's slot `index` included, where rows
    started at different steps (a refilling loop, whose rows write its slots as a ring); by
    default every row sees slots [0, index]."""
    weights = unstack_layers(weights)
    slot = cache.index
    if visible_BxS is None:
        visible_S = jnp.arange(cache.v[0].shape[2]) <= slot
    else:
        visible_S = visible_BxS[:, None, None]
    rope = rope_tables(config, cache.positions[:, None]) if cache.rope is None else cache.rope
    x_Bx1xD = constrain(embed(config, weights, tokens_B[:, None]), ACTIVATION_AXES)
    k, v = [], []
    for i, p in enumerate(weights["layers"]):
        q_Bx1xKxJxH, k_Bx1xKxH, v_Bx1xKxH = qkv(config, p, x_Bx1xD, rope, use_lora)
        k_BxKxHxS, v_BxKxSxH = _write_slot(cache.k[i], cache.v[i], k_Bx1xKxH, v_Bx1xKxH, slot)
        parts = [(cache.prompt_k[i], cache.prompt_v[i], cache.prompt_mask[:, None, None])]
        if cache.shared_k:
            shared = (cache.shared_k[i], cache.shared_v[i], cache.shared_mask[:, None, None])
            parts.insert(0, shared)
        parts.append((k_BxKxHxS, v_BxKxSxH, visible_S))
        y_BxKxJxH = attention.cached(q_Bx1xKxJxH[:, 0], parts)
        x_Bx1xD = finish(config, p, x_Bx1xD, y_BxKxJxH[:, None], use_lora)
        k.append(constrain(k_BxKxHxS, DECODE_KEYS_AXES))
        v.append(constrain(v_BxKxSxH, DECODE_VALUES_AXES))
    positions = cache.positions + 1
    new_cache = cache._replace(
        k=tuple(k),
        v=tuple(v),
        positions=positions,
        index=slot + 1,
        rope=None if cache.rope is None else rope_tables(config, positions[:, None]),
    )
    return to_logits(config, weights, x_Bx1xD)[:, 0], new_cache
