"""Batched KV-cache sampling from the very params being trained.

Shapes: the key in `gxpo.models.config` (here A is the response budget, max new tokens).

One jitted function per (Q, P bucket, `SamplingConfig`): each distinct prompt is prefilled once
and its keys and values are kept once for its G samples (a `DecodeCache`), then a
`jax.lax.while_loop` advances a `SamplingState` by one token per row per step until every row
has emitted an end token or A tokens. The draw rules live in `gxpo.rl.sampling`.

Chat prompts share a system prompt: `generate` finds their common prefix (`split_prompts`),
which is then prefilled once and held once for all B rows, each prompt's rest attending to it.
The loop runs in a few segments over a decoded cache grown between them, since a step reads
every allocated slot; it carries the rotary tables, which XLA would otherwise recompute per
element inside every layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gxpo.models.config import ModelConfig
from gxpo.models.decode import DecodeCache, decode, prefill, unstack_layers
from gxpo.models.lora import fold_lora
from gxpo.models.transformer import Transformer
from gxpo.rl.sampling import Greedy, Temperature, TopP, rule_for

_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")
_SEGMENT_SLOTS = 24  # decoded slots per segment of the decoding loop by default
_MAX_SEGMENTS = 3
_PREFIX_MULTIPLE = 8  # a shared prefix's length is rounded down to this (fewer compilations)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """What `sample` compiles for, besides the shapes (frozen and hashable: its static argument).

    Attributes:
      max_new_tokens: A, the response budget per row.
      num_samples: G responses per prompt, in consecutive rows (prompt q -> rows q*G..q*G+G-1).
      temperature: 1.0 in training (so the returned log-probs are the trainer's); 0 = greedy.
      top_p: nucleus sampling; keep 1.0 in training (the log-probs are of the full softmax).
      eos_ids: tokens that end a row (see `end_token_ids`); the end token is part of the
        response (and of its mask).
      pad_id: fills the response after it ends.
      ignore_eos: always generate exactly `max_new_tokens` (benchmarks).
      use_lora: False samples from the base model (adapters off).
      prompt_split: (X, U), as `split_prompts` finds it: every prompt's first X real tokens are
        the same and at most U follow them. The common prefix is then prefilled once and its
        keys and values held once for all rows (the output is the same). The jitted function
        cannot check this on the data: a wrong split gives wrong samples.
      segments: the decoding loop runs in this many parts, each over a decoded cache just large
        enough for it (one more compilation of the step each); None picks a few by the length.
    """

    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    ignore_eos: bool = False
    use_lora: bool = True
    prompt_split: tuple[int, int] | None = None
    segments: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        # One spelling per setting, so that equal settings share one compilation.
        normal = dict(
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            eos_ids=tuple(sorted(int(i) for i in self.eos_ids)),
            pad_id=int(self.pad_id),
        )
        if self.prompt_split is not None:
            normal["prompt_split"] = tuple(int(n) for n in self.prompt_split)
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    @property
    def rule(self) -> Greedy | Temperature | TopP:
        return rule_for(self.temperature, self.top_p)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a row; -1 (no token) when none do."""
        return self.eos_ids if self.eos_ids and not self.ignore_eos else (-1,)


class SampleOutput(NamedTuple):
    """Prompt + response of every row; per-token arrays aligned with `tokens`."""

    tokens: jax.Array  # [B, P + A] int32: left-padded prompt, then the response, then pad_id
    prompt_mask: jax.Array  # [B, P + A] bool: real prompt tokens
    response_mask: jax.Array  # [B, P + A] bool: sampled tokens, the end token included
    logprobs: jax.Array  # [B, P + A] float32: log-prob of each sampled token, 0 elsewhere
    lengths: jax.Array  # [B] int32: sampled tokens per row, the end token included

    @property
    def attention_mask(self) -> jax.Array:
        return self.prompt_mask | self.response_mask


class SamplingState(NamedTuple):
    """What the decoding loop carries from one step to the next."""

    step: jax.Array  # [] int32: index in the response of the token this step draws
    token: jax.Array  # [B] int32: the token drawn last, which this step feeds back
    done: jax.Array  # [B] bool: the row has drawn an end token (it then draws pad_id)
    lengths: jax.Array  # [B] int32: tokens drawn per row, the end token included
    tokens: jax.Array  # [B, A] int32: the response so far, pad_id after it
    logprobs: jax.Array  # [B, A] float32: log-prob of each drawn token, 0 after the end
    cache: DecodeCache  # the prompts' keys and values, then one decoded slot per step


def end_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a response: the tokenizer's eos plus the usual chat end tokens."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_TOKENS if t in vocab)
    if not ids:
        raise ValueError("the tokenizer defines no end-of-sequence token; pass eos_ids explicitly")
    return tuple(sorted(ids))


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def sample(
    weights: dict,
    config: ModelConfig,
    prompt_tokens_QxP: jax.Array,
    prompt_mask_QxP: jax.Array,
    key: jax.Array,
    sampling: SamplingConfig,
) -> SampleOutput:
    """The pure, jitted sampler over a weights dict: `sampling.num_samples` responses for each
    left-padded prompt (see `generate`); the same key gives the same output."""
    Q, P = prompt_tokens_QxP.shape
    A, G = sampling.max_new_tokens, sampling.num_samples
    B = Q * G
    prompt_mask_QxP = prompt_mask_QxP.astype(bool)
    logits_QxV, prompt_cache, shared = _prefill_prompts(
        weights, config, prompt_tokens_QxP, prompt_mask_QxP, sampling
    )
    # Slots for the A - 1 tokens fed back (the last drawn token is never fed), in segments.
    ends = _segment_ends(max(A - 1, 1), sampling.segments)
    cache = prompt_cache.for_decoding(copies=G, slots=ends[0], shared=shared).with_rope(config)
    weights = unstack_layers(_without_adapters(weights, config, sampling.use_lora))
    rule, stop_ids = sampling.rule, jnp.asarray(sampling.stop_ids, jnp.int32)

    def draw(state: SamplingState, logits_BxV: jax.Array) -> SamplingState:
        """`state` after drawing response token `state.step` from `logits_BxV`."""
        token_B, logp_B = rule(logits_BxV, jax.random.fold_in(key, state.step))
        token_B = jnp.where(state.done, sampling.pad_id, token_B)
        logp_B = jnp.where(state.done, 0.0, logp_B)
        at = (0, state.step)
        return state._replace(
            step=state.step + 1,
            token=token_B,
            done=state.done | jnp.isin(token_B, stop_ids),
            lengths=state.lengths + (~state.done).astype(jnp.int32),
            tokens=jax.lax.dynamic_update_slice(state.tokens, token_B[:, None], at),
            logprobs=jax.lax.dynamic_update_slice(state.logprobs, logp_B[:, None], at),
        )

    def step(state: SamplingState) -> SamplingState:
        logits_BxV, cache = decode(
            weights, config, state.token, state.cache, use_lora=sampling.use_lora
        )
        return draw(state._replace(cache=cache), logits_BxV)

    start = SamplingState(
        step=jnp.asarray(0, jnp.int32),
        token=jnp.zeros((B,), jnp.int32),
        done=jnp.zeros((B,), bool),
        lengths=jnp.zeros((B,), jnp.int32),
        tokens=jnp.full((B, A), sampling.pad_id, jnp.int32),
        logprobs=jnp.zeros((B, A), jnp.float32),
        cache=cache,
    )
    state = draw(start, jnp.repeat(logits_QxV, G, axis=0))
    for segment, end in enumerate(ends):
        if segment:
            state = state._replace(cache=state.cache.grow(end))
        # Step s feeds back token s - 1 into decoded slot s - 1: this segment's slots end at `end`.
        last = min(end + 1, A)
        more = lambda state, last=last: (state.step < last) & ~jnp.all(state.done)
        state = jax.lax.while_loop(more, step, state)

    prompt_tokens_BxP = jnp.repeat(prompt_tokens_QxP, G, axis=0)
    prompt_mask_BxP = jnp.repeat(prompt_mask_QxP, G, axis=0)
    response_mask_BxA = jnp.arange(A)[None, :] < state.lengths[:, None]
    return SampleOutput(
        tokens=jnp.concatenate([prompt_tokens_BxP, state.tokens], axis=1),
        prompt_mask=jnp.concatenate([prompt_mask_BxP, jnp.zeros((B, A), bool)], axis=1),
        response_mask=jnp.concatenate([jnp.zeros((B, P), bool), response_mask_BxA], axis=1),
        logprobs=jnp.concatenate([jnp.zeros((B, P), jnp.float32), state.logprobs], axis=1),
        lengths=state.lengths,
    )


def _segment_ends(slots: int, segments: int | None) -> tuple[int, ...]:
    """The decoded-cache size of each segment of the decoding loop, the last `slots`. By default
    one segment per `_SEGMENT_SLOTS` slots, at most `_MAX_SEGMENTS`: each costs a compilation of
    the decoding step, and beyond a few the smaller caches no longer pay for it."""
    if segments is None:
        segments = min(_MAX_SEGMENTS, -(-slots // _SEGMENT_SLOTS))
    if segments < 1:
        raise ValueError(f"segments={segments} must be >= 1")
    segments = min(segments, slots)
    return tuple(-(-slots * (i + 1) // segments) for i in range(segments))


def _prefill_prompts(weights, config, tokens_QxP, mask_QxP, sampling: SamplingConfig):
    """Logits [Q, V] after each prompt, its cache, and the cache of the common prefix (None
    without `prompt_split`): the prefix runs once, then each prompt's rest attends to it."""
    Q, P = tokens_QxP.shape
    prefill_ = functools.partial(prefill, weights, config, use_lora=sampling.use_lora)
    if sampling.prompt_split is None:
        return (*prefill_(tokens_QxP, mask_QxP, P), None)
    X, U = sampling.prompt_split
    if X < 1 or U < 1 or X + U > P:
        raise ValueError(
            f"prompt_split={(X, U)} must be two positive lengths summing to at most the "
            f"prompt length {P}: use split_prompts"
        )
    # Left padding: prompt 0's real tokens start at column P - its length.
    start = P - jnp.sum(mask_QxP[0], dtype=jnp.int32)
    prefix_1xX = jax.lax.dynamic_slice(tokens_QxP[0], (start,), (X,))[None]
    _, shared = prefill_(prefix_1xX, jnp.ones((1, X), bool), X)
    # Each prompt's rest sits in its last U columns (at most U real tokens follow the prefix).
    after_QxP = mask_QxP & (jnp.cumsum(mask_QxP, axis=1) > X)
    logits_QxV, cache = prefill_(tokens_QxP[:, P - U :], after_QxP[:, P - U :], U, prefix=shared)
    return logits_QxV, cache, shared


def split_prompts(
    tokens_QxP: np.ndarray | jax.Array, mask_QxP: np.ndarray | jax.Array, bucket: int
) -> tuple[int, int] | None:
    """`SamplingConfig.prompt_split` for these left-padded prompts: (X, U), X the length of
    their common prefix (a system prompt) rounded down to a multiple of 8, leaving every prompt
    at least one token more, U the most tokens after it, rounded up to `bucket` (so batches of
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
    heads_QxX = np.take_along_axis(tokens_QxP, starts_Q[:, None] + np.arange(first), axis=1)
    differs_X = np.any(heads_QxX != heads_QxX[:1], axis=0)
    common = int(np.argmax(differs_X)) if differs_X.any() else first
    X = common // _PREFIX_MULTIPLE * _PREFIX_MULTIPLE
    if X == 0:
        return None
    U = min(-(-(int(lengths_Q.max()) - X) // bucket) * bucket, P - X)
    return X, U


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
    prompt_tokens_QxP: np.ndarray | jax.Array,
    prompt_mask_QxP: np.ndarray | jax.Array,
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
      prompt_tokens_QxP, prompt_mask_QxP: left-padded prompts (mask 1 on real tokens).
      key: PRNG key; the same key gives the same output.
      max_new_tokens, temperature, top_p, num_samples, eos_ids, pad_id, ignore_eos, use_lora:
        see `SamplingConfig`.
      prompt_bucket: prompts are left-padded to a multiple of this, so that batches of nearby
        lengths reuse one compilation; a system prompt they all share is prefilled once.

    Returns:
      A `SampleOutput` with Q * num_samples rows.
    """
    weights, config = (model.weights(), model.config) if isinstance(model, Transformer) else model
    tokens, mask = bucket_prompts(prompt_tokens_QxP, prompt_mask_QxP, prompt_bucket, pad_id)
    settings = SamplingConfig(
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        eos_ids=tuple(eos_ids),
        pad_id=pad_id,
        ignore_eos=ignore_eos,
        use_lora=use_lora,
        prompt_split=split_prompts(tokens, mask, prompt_bucket),
    )
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)
    return sample(weights, config, tokens, mask, key, settings)
