"""Batched KV-cache sampling from the very params being trained.

Shape key: Q distinct prompts, G samples per prompt, B = Q * G rows, P prompt length (left
padded, bucketed), N max new tokens, V vocabulary, M vocabulary blocks of W tokens, X tokens of
a prefix all prompts share, Y the most tokens of a prompt after it.

One jitted function per (Q, P bucket, N, G, sampling rule): each distinct prompt is prefilled
once and its keys and values are kept once for its G samples (a `DecodeCache`), then a
`jax.lax.while_loop` decodes one token per row per step until every row has emitted an end token
or N tokens. A token is drawn with a single uniform per row through the CDF, which is exact
and avoids generating V random numbers per row per step; the CDF is searched in two levels
(block sums, then one block), so no step runs a cumulative sum over all V.

Chat prompts share a system prompt: `generate` finds their common prefix (`split_prompts`),
which is then prefilled once and held once for all B rows, each prompt's rest attending to it.
The loop runs in a few segments over a decoded cache grown between them, since a step reads
every allocated slot; it carries the rotary tables, which XLA would otherwise recompute per
element inside every layer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gxpo.models.config import ModelConfig
from gxpo.models.decode import decode, prefill, unstack_layers
from gxpo.models.lora import fold_lora
from gxpo.models.transformer import Transformer

_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")
_BLOCK = 256  # vocabulary block of the two-level inverse CDF: sqrt(V) for V ~ 64k
_SEGMENT_SLOTS = 24  # decoded slots per segment of the decoding loop by default
_MAX_SEGMENTS = 3
_PREFIX_MULTIPLE = 8  # a shared prefix's length is rounded down to this (fewer compilations)


class SampleOutput(NamedTuple):
    """Prompt + response of every row; per-token arrays aligned with `tokens`."""

    tokens: jax.Array  # [B, P + N] int32: left-padded prompt, then the response, then pad_id
    prompt_mask: jax.Array  # [B, P + N] bool: real prompt tokens
    response_mask: jax.Array  # [B, P + N] bool: sampled tokens, the end token included
    logprobs: jax.Array  # [B, P + N] float32: log-prob of each sampled token, 0 elsewhere
    lengths: jax.Array  # [B] int32: sampled tokens per row, the end token included

    @property
    def attention_mask(self) -> jax.Array:
        return self.prompt_mask | self.response_mask


def end_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a response: the tokenizer's eos plus the usual chat end tokens."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_TOKENS if t in vocab)
    if not ids:
        raise ValueError("the tokenizer defines no end-of-sequence token; pass eos_ids explicitly")
    return tuple(sorted(ids))


def _sample_token(
    logits_BxV: jax.Array, key: jax.Array, temperature: float, top_p: float
) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob under softmax(logits / temperature)."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0.0:
        token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        best_Bx1 = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)
        return token_B, -jnp.log(jnp.sum(jnp.exp(logits_BxV - best_Bx1), axis=-1))
    scaled_BxV = logits_BxV / temperature if temperature != 1.0 else logits_BxV
    max_Bx1 = jnp.max(scaled_BxV, axis=-1, keepdims=True)
    # u in (0, 1]: the first token whose running mass reaches u * total has positive mass.
    u_B = 1.0 - jax.random.uniform(key, (logits_BxV.shape[0],), jnp.float32)
    if top_p < 1.0:
        weights_BxV = jnp.exp(scaled_BxV - max_Bx1)  # unnormalised probabilities, the largest 1
        total_B = jnp.sum(weights_BxV, axis=-1)
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_BxV = jnp.sort(weights_BxV, axis=-1)[:, ::-1]
        before_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV
        kept_BxV = jnp.where(before_BxV < top_p * total_B[:, None], sorted_BxV, jnp.inf)
        cutoff_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
        token_B = _inverse_cdf(jnp.where(weights_BxV >= cutoff_Bx1, weights_BxV, 0.0), u_B)
    else:
        # The total is the block sums' running sum (a sum over [B, V] costs as much as the max),
        # and only the block the draw lands in is read again.
        blocks_BxMxW = _blocks(scaled_BxV, -jnp.inf)
        sums_BxM = jnp.sum(jnp.exp(blocks_BxMxW - max_Bx1[:, :, None]), axis=-1)
        inner = lambda block_B: jnp.exp(_take_block(blocks_BxMxW, block_B) - max_Bx1)
        token_B, total_B = _inverse_cdf_blocks(sums_BxM, inner, u_B)
    scaled_B = jnp.take_along_axis(scaled_BxV, token_B[:, None], axis=-1)[:, 0]
    return token_B, scaled_B - max_Bx1[:, 0] - jnp.log(total_B)


def _blocks(x_BxV: jax.Array, fill: float) -> jax.Array:
    """[B, V] -> [B, M, W], the last block filled up with `fill`."""
    B, V = x_BxV.shape
    return jnp.pad(x_BxV, ((0, 0), (0, -V % _BLOCK)), constant_values=fill).reshape(B, -1, _BLOCK)


def _take_block(blocks_BxMxW: jax.Array, block_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(blocks_BxMxW, block_B[:, None, None], axis=1)[:, 0]


def _inverse_cdf(weights_BxV: jax.Array, u_B: jax.Array) -> jax.Array:
    """Per row, the first index whose running sum of `weights` (>= 0, some > 0) reaches u times
    their total (see `_inverse_cdf_blocks`)."""
    blocks_BxMxW = _blocks(weights_BxV, 0.0)
    inner = functools.partial(_take_block, blocks_BxMxW)
    return _inverse_cdf_blocks(jnp.sum(blocks_BxMxW, axis=-1), inner, u_B)[0]


def _inverse_cdf_blocks(sums_BxM: jax.Array, inner, u_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse CDF by blocks of `_BLOCK`: a running sum over the block sums `sums_BxM`, then
    one inside the block it lands in, whose weights [B, W] `inner(block_B)` gives. Two short
    cumsums instead of one over V (several full passes on CPU). Returns the index and the
    total weight of each row."""
    cum_BxM = jnp.cumsum(sums_BxM, axis=-1)
    target_B = u_B * cum_BxM[:, -1]
    # Rounding (the running sums need not be monotone) must never pick an empty block or an
    # empty slot: take the first nonempty block reaching the target, else the last nonempty.
    nonempty_BxM = sums_BxM > 0
    reached_BxM = (cum_BxM >= target_B[:, None]) & nonempty_BxM
    last_B = sums_BxM.shape[1] - 1 - jnp.argmax(nonempty_BxM[:, ::-1], axis=-1)
    block_B = jnp.where(reached_BxM.any(axis=-1), jnp.argmax(reached_BxM, axis=-1), last_B)
    take = lambda x_BxM: jnp.take_along_axis(x_BxM, block_B[:, None], axis=-1)[:, 0]
    inner_BxW = inner(block_B)
    rest_B = target_B - (take(cum_BxM) - take(sums_BxM))
    index_B = jnp.sum(jnp.cumsum(inner_BxW, axis=-1) < rest_B[:, None], axis=-1)
    positive_BxW = inner_BxW > 0
    first_B = jnp.argmax(positive_BxW, axis=-1)
    last_in_block_B = _BLOCK - 1 - jnp.argmax(positive_BxW[:, ::-1], axis=-1)
    index_B = jnp.clip(index_B, first_B, last_in_block_B)
    return (block_B * _BLOCK + index_B).astype(jnp.int32), cum_BxM[:, -1]


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "max_new_tokens",
        "num_samples",
        "temperature",
        "top_p",
        "eos_ids",
        "pad_id",
        "ignore_eos",
        "use_lora",
        "prompt_split",
        "segments",
    ),
)
def sample(
    weights: dict,
    config: ModelConfig,
    prompt_tokens_QxP: jax.Array,
    prompt_mask_QxP: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    ignore_eos: bool = False,
    use_lora: bool = True,
    prompt_split: tuple[int, int] | None = None,
    segments: int | None = None,
) -> SampleOutput:
    """The pure, jitted sampler over a weights dict (see `generate` for the arguments).

    `prompt_split` (X, Y), as `split_prompts` finds it: every prompt's first X real tokens are
    the same and at most Y follow them. The common prefix is then prefilled once and its keys
    and values held once for all rows (the output is the same). The jitted function cannot check
    this on the data: a wrong split gives wrong samples.
    `segments`: the decoding loop runs in this many parts, each over a decoded cache just large
    enough for it (one more compilation of the step each); None picks a few by the length.
    """
    Q, P = prompt_tokens_QxP.shape
    N, G = max_new_tokens, num_samples
    prompt_mask_QxP = prompt_mask_QxP.astype(bool)
    logits_QxV, prompt_cache, shared = _prefill_prompts(
        weights, config, prompt_tokens_QxP, prompt_mask_QxP, prompt_split, use_lora
    )
    # Slots for the N - 1 tokens fed back (the last drawn token is never fed), in segments.
    ends = _segment_ends(max(N - 1, 1), segments)
    cache = prompt_cache.for_decoding(copies=G, slots=ends[0], shared=shared).with_rope(config)
    weights = unstack_layers(_without_adapters(weights, config, use_lora))
    logits_BxV = jnp.repeat(logits_QxV, G, axis=0)
    B = Q * G
    eos = jnp.asarray(eos_ids if eos_ids and not ignore_eos else (-1,), jnp.int32)

    def pick(logits_BxV, step, done_B):
        token_B, logp_B = _sample_token(
            logits_BxV, jax.random.fold_in(key, step), temperature, top_p
        )
        token_B = jnp.where(done_B, pad_id, token_B)
        logp_B = jnp.where(done_B, 0.0, logp_B)
        return token_B, logp_B, done_B | jnp.isin(token_B, eos)

    def write(buffers, step, token_B, logp_B):
        tokens_BxN, logp_BxN = buffers
        tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, token_B[:, None], (0, step))
        logp_BxN = jax.lax.dynamic_update_slice(logp_BxN, logp_B[:, None], (0, step))
        return tokens_BxN, logp_BxN

    not_done_B = jnp.zeros((B,), bool)
    token_B, logp_B, done_B = pick(logits_BxV, 0, not_done_B)
    lengths_B = jnp.ones((B,), jnp.int32)
    buffers = write(
        (jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32)), 0, token_B, logp_B
    )

    def body(carry):
        step, token_B, done_B, lengths_B, buffers, cache = carry
        logits_BxV, cache = decode(weights, config, token_B, cache, use_lora=use_lora)
        token_B, logp_B, new_done_B = pick(logits_BxV, step, done_B)
        lengths_B = lengths_B + (~done_B).astype(jnp.int32)
        buffers = write(buffers, step, token_B, logp_B)
        return step + 1, token_B, new_done_B, lengths_B, buffers, cache

    carry = (jnp.asarray(1, jnp.int32), token_B, done_B, lengths_B, buffers, cache)
    for segment, end in enumerate(ends):
        if segment:
            carry = (*carry[:-1], carry[-1].grow(end))
        # Step s feeds back token s - 1 into decoded slot s - 1: this segment's slots end at `end`.
        last = min(end + 1, N)
        cond = lambda carry, last=last: (carry[0] < last) & ~jnp.all(carry[2])
        carry = jax.lax.while_loop(cond, body, carry)
    *_, lengths_B, (tokens_BxN, logp_BxN), _ = carry

    prompt_tokens_BxP = jnp.repeat(prompt_tokens_QxP, G, axis=0)
    prompt_mask_BxP = jnp.repeat(prompt_mask_QxP, G, axis=0)
    response_mask_BxN = jnp.arange(N)[None, :] < lengths_B[:, None]
    return SampleOutput(
        tokens=jnp.concatenate([prompt_tokens_BxP, tokens_BxN], axis=1),
        prompt_mask=jnp.concatenate([prompt_mask_BxP, jnp.zeros((B, N), bool)], axis=1),
        response_mask=jnp.concatenate([jnp.zeros((B, P), bool), response_mask_BxN], axis=1),
        logprobs=jnp.concatenate([jnp.zeros((B, P), jnp.float32), logp_BxN], axis=1),
        lengths=lengths_B,
    )


def _segment_ends(slots: int, segments: int | None) -> tuple[int, ...]:
    """The decoded-cache size of each segment of the decoding loop, the last `slots`. By default
    one segment per `_SEGMENT_SLOTS` slots, at most `_MAX_SEGMENTS`: each costs a compilation of
    the decoding step (SmolLM2-135M, B = 64, N = 64: 3 segments are ~6% faster than one, for
    ~6 s more compiling; a fourth bought nothing more)."""
    if segments is None:
        segments = min(_MAX_SEGMENTS, -(-slots // _SEGMENT_SLOTS))
    if segments < 1:
        raise ValueError(f"segments={segments} must be >= 1")
    segments = min(segments, slots)
    return tuple(-(-slots * (i + 1) // segments) for i in range(segments))


def _prefill_prompts(weights, config, tokens_QxP, mask_QxP, prompt_split, use_lora):
    """Logits [Q, V] after each prompt, its cache, and the cache of the common prefix (None
    without `prompt_split`): the prefix runs once, then each prompt's rest attends to it."""
    Q, P = tokens_QxP.shape
    prefill_ = functools.partial(prefill, weights, config, use_lora=use_lora)
    if prompt_split is None:
        return (*prefill_(tokens_QxP, mask_QxP, P), None)
    X, Y = prompt_split
    if X < 1 or Y < 1 or X + Y > P:
        raise ValueError(
            f"prompt_split={prompt_split} must be two positive lengths summing to at most the "
            f"prompt length {P}: use split_prompts"
        )
    # Left padding: prompt 0's real tokens start at column P - its length.
    start = P - jnp.sum(mask_QxP[0], dtype=jnp.int32)
    prefix_1xX = jax.lax.dynamic_slice(tokens_QxP[0], (start,), (X,))[None]
    _, shared = prefill_(prefix_1xX, jnp.ones((1, X), bool), X)
    # Each prompt's rest sits in its last Y columns (at most Y real tokens follow the prefix).
    after_QxP = mask_QxP & (jnp.cumsum(mask_QxP, axis=1) > X)
    logits_QxV, cache = prefill_(tokens_QxP[:, P - Y :], after_QxP[:, P - Y :], Y, prefix=shared)
    return logits_QxV, cache, shared


def split_prompts(
    tokens_QxP: np.ndarray | jax.Array, mask_QxP: np.ndarray | jax.Array, bucket: int
) -> tuple[int, int] | None:
    """`sample`'s `prompt_split` for these left-padded prompts: (X, Y), X the length of their
    common prefix (a system prompt) rounded down to a multiple of 8, leaving every prompt at
    least one token more, Y the most tokens after it, rounded up to `bucket` (so batches of
    nearby lengths share a compilation) and at most P - X. None when fewer than two prompts
    share a prefix of 8 tokens or more (nothing to gain), or the prompts are not left-padded."""
    tokens_QxP, mask_QxP = np.asarray(tokens_QxP), np.asarray(mask_QxP).astype(bool)
    Q, P = tokens_QxP.shape
    lengths_Q = mask_QxP.sum(axis=1)
    starts_Q = P - lengths_Q
    left_padded = np.array_equal(mask_QxP, np.arange(P)[None, :] >= starts_Q[:, None])
    if Q < 2 or lengths_Q.min() < 2 or not left_padded:
        return None
    # Real tokens of each row, left-aligned, up to the shortest prompt's length less one.
    first = int(lengths_Q.min()) - 1
    heads_QxF = np.take_along_axis(tokens_QxP, starts_Q[:, None] + np.arange(first), axis=1)
    differs_F = np.any(heads_QxF != heads_QxF[:1], axis=0)
    common = int(np.argmax(differs_F)) if differs_F.any() else first
    X = common // _PREFIX_MULTIPLE * _PREFIX_MULTIPLE
    if X == 0:
        return None
    Y = min(-(-(int(lengths_Q.max()) - X) // bucket) * bucket, P - X)
    return X, Y


def _without_adapters(weights: dict, config: ModelConfig, use_lora: bool) -> dict:
    """The weights with LoRA folded into the kernels (`use_lora`) or dropped: the same function,
    with no adapter matmuls per decoded token (the fold is one small matmul per projection)."""
    if use_lora:
        return fold_lora(weights, config)
    strip = lambda p: {k: v for k, v in p.items() if not k.startswith("lora_")}
    layers = {name: strip(p) if isinstance(p, dict) else p for name, p in weights["layers"].items()}
    return {**weights, "layers": layers}


def bucket_prompts(
    tokens_QxP: np.ndarray | jax.Array,
    mask_QxP: np.ndarray | jax.Array,
    bucket: int,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts to the next multiple of `bucket`, so nearby lengths share a compile."""
    tokens_QxP, mask_QxP = np.asarray(tokens_QxP), np.asarray(mask_QxP)
    extra = -tokens_QxP.shape[1] % bucket
    if extra:
        tokens_QxP = np.pad(tokens_QxP, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask_QxP = np.pad(mask_QxP, ((0, 0), (extra, 0)))
    return tokens_QxP, mask_QxP


def generate(
    model: Transformer | tuple[dict, ModelConfig],
    prompt_tokens_BxP: np.ndarray | jax.Array,
    prompt_mask_BxP: np.ndarray | jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_samples: int = 1,
    eos_ids: Iterable[int] = (),
    pad_id: int = 0,
    ignore_eos: bool = False,
    prompt_bucket: int = 32,
    use_lora: bool = True,
) -> SampleOutput:
    """Samples `num_samples` responses for each left-padded prompt.

    Args:
      model: a `Transformer`, or `(weights, config)` as the trainer holds them.
      prompt_tokens_BxP, prompt_mask_BxP: left-padded prompts (mask 1 on real tokens).
      key: PRNG key; the same key gives the same output.
      max_new_tokens: N, the response budget per row.
      temperature: 1.0 in training (so the returned log-probs are the trainer's); 0 = greedy.
      top_p: nucleus sampling; keep 1.0 in training (the log-probs are of the full softmax).
      num_samples: G responses per prompt, in consecutive rows (prompt b -> rows b*G..b*G+G-1).
      eos_ids: tokens that end a row (see `end_token_ids`); the end token is part of the
        response (and of its mask).
      pad_id: fills the response after it ends.
      ignore_eos: always generate exactly `max_new_tokens` (benchmarks).
      prompt_bucket: prompts are left-padded to a multiple of this, so that batches of nearby
        lengths reuse one compilation.
      use_lora: False samples from the base model (adapters off).

    Returns:
      A `SampleOutput` with B * num_samples rows.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    weights, config = (model.weights(), model.config) if isinstance(model, Transformer) else model
    tokens, mask = bucket_prompts(prompt_tokens_BxP, prompt_mask_BxP, prompt_bucket, pad_id)
    split = split_prompts(tokens, mask, prompt_bucket)
    return sample(
        weights,
        config,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(mask, bool),
        key,
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        temperature=float(temperature),
        top_p=float(top_p),
        eos_ids=tuple(sorted(int(i) for i in eos_ids)),
        pad_id=int(pad_id),
        ignore_eos=ignore_eos,
        use_lora=use_lora,
        prompt_split=split,
    )
