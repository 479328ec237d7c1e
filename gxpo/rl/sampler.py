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

With `SamplingConfig.slots` below B, the refilling loop (`_sample_refilling`) decodes that many
rows at once instead: every prompt is prefilled once up front, and a row that ends hands its
slot to the next pending row, whose prompt's keys and values are copied into the slot, so the
B rows stream through the slots and no step decodes a finished row while rows are pending.
Each row draws its tokens from uniforms of (row, position) alone (`gxpo.rl.sampling.uniforms`),
so both loops return the same tokens for the same key.
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
from gxpo.models.sharding import DECODE_KEYS_AXES, DECODE_VALUES_AXES, constrain
from gxpo.models.transformer import Transformer, rope_tables
from gxpo.rl.sampling import Greedy, Temperature, TopP, rule_for, uniforms

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
      slots: rows decoded at once. 0, or at least the call's rows: all of them (the static loop:
        a row that ends idles until the longest one ends). Fewer: the refilling loop, whose KV
        cache holds `slots` rows (and every prompt once), each row that ends handing its slot
        to the next pending one; the same output.
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
    slots: int = 0

    def __post_init__(self):
        if self.slots < 0:
            raise ValueError(f"slots={self.slots} must be >= 0 (0 = every row at once)")
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
            slots=int(self.slots),
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
    budget_B: jax.Array | None = None,
    first_row: jax.Array | int = 0,
) -> SampleOutput:
    """The pure, jitted sampler over a weights dict: `sampling.num_samples` responses for each
    left-padded prompt (see `generate`); the same key gives the same output.

    `budget_B` (benchmarks): row b ends after min(budget_B[b], max_new_tokens) tokens, as if it
    had drawn an end token there (random weights never do). `first_row`: the rows' index in
    the whole batch, for their draws (row r draws from (key, first_row + r, position)): a batch
    sampled in chunks draws the same tokens as in one call."""
    Q, P = prompt_tokens_QxP.shape
    A, G = sampling.max_new_tokens, sampling.num_samples
    B = Q * G
    prompt_mask_QxP = prompt_mask_QxP.astype(bool)
    budget_B = jnp.full((B,), A, jnp.int32) if budget_B is None else jnp.clip(budget_B, 1, A)
    rows_B = first_row + jnp.arange(B, dtype=jnp.int32)
    logits_QxV, prompt_cache, shared = _prefill_prompts(
        weights, config, prompt_tokens_QxP, prompt_mask_QxP, sampling
    )
    weights = unstack_layers(_without_adapters(weights, config, sampling.use_lora))
    # Every row's first token, from the logits after its prompt.
    first_B, first_logp_B = sampling.rule(
        jnp.repeat(logits_QxV, G, axis=0), uniforms(key, rows_B, jnp.zeros((B,), jnp.int32))
    )
    run = _sample_refilling if 0 < sampling.slots < B else _sample_static
    tokens_BxA, logprobs_BxA, lengths_B = run(
        weights, config, prompt_cache, shared, key, sampling, rows_B, budget_B, first_B,
        first_logp_B,
    )  # fmt: skip
    prompt_tokens_BxP = jnp.repeat(prompt_tokens_QxP, G, axis=0)
    prompt_mask_BxP = jnp.repeat(prompt_mask_QxP, G, axis=0)
    response_mask_BxA = jnp.arange(A)[None, :] < lengths_B[:, None]
    return SampleOutput(
        tokens=jnp.concatenate([prompt_tokens_BxP, tokens_BxA], axis=1),
        prompt_mask=jnp.concatenate([prompt_mask_BxP, jnp.zeros((B, A), bool)], axis=1),
        response_mask=jnp.concatenate([jnp.zeros((B, P), bool), response_mask_BxA], axis=1),
        logprobs=jnp.concatenate([jnp.zeros((B, P), jnp.float32), logprobs_BxA], axis=1),
        lengths=lengths_B,
    )


def _sample_static(
    weights, config, prompt_cache, shared, key, sampling, rows_B, budget_B, first_B, first_logp_B
):
    """Every row decoded at once, each prompt's cache held once for its G rows, until every row
    has ended: the response tokens [B, A], their log-probs and the lengths [B]."""
    A, G = sampling.max_new_tokens, sampling.num_samples
    B = rows_B.shape[0]
    # Slots for the A - 1 tokens fed back (the last drawn token is never fed), in segments.
    ends = _segment_ends(max(A - 1, 1), sampling.segments)
    cache = prompt_cache.for_decoding(copies=G, slots=ends[0], shared=shared).with_rope(config)
    rule, stop_ids = sampling.rule, jnp.asarray(sampling.stop_ids, jnp.int32)

    def draw(state: SamplingState, token_B: jax.Array, logp_B: jax.Array) -> SamplingState:
        """`state` after drawing `token_B` as response token `state.step`."""
        token_B = jnp.where(state.done, sampling.pad_id, token_B)
        logp_B = jnp.where(state.done, 0.0, logp_B)
        lengths_B = state.lengths + (~state.done).astype(jnp.int32)
        at = (0, state.step)
        return state._replace(
            step=state.step + 1,
            token=token_B,
            done=state.done | jnp.isin(token_B, stop_ids) | (lengths_B >= budget_B),
            lengths=lengths_B,
            tokens=jax.lax.dynamic_update_slice(state.tokens, token_B[:, None], at),
            logprobs=jax.lax.dynamic_update_slice(state.logprobs, logp_B[:, None], at),
        )

    def step(state: SamplingState) -> SamplingState:
        logits_BxV, cache = decode(
            weights, config, state.token, state.cache, use_lora=sampling.use_lora
        )
        u_B = uniforms(key, rows_B, jnp.broadcast_to(state.step, (B,)))
        return draw(state._replace(cache=cache), *rule(logits_BxV, u_B))

    start = SamplingState(
        step=jnp.asarray(0, jnp.int32),
        token=jnp.zeros((B,), jnp.int32),
        done=jnp.zeros((B,), bool),
        lengths=jnp.zeros((B,), jnp.int32),
        tokens=jnp.full((B, A), sampling.pad_id, jnp.int32),
        logprobs=jnp.zeros((B, A), jnp.float32),
        cache=cache,
    )
    state = draw(start, first_B, first_logp_B)
    for segment, end in enumerate(ends):
        if segment:
            state = state._replace(cache=state.cache.grow(end))
        # Step s feeds back token s - 1 into decoded slot s - 1: this segment's slots end at `end`.
        last = min(end + 1, A)
        more = lambda state, last=last: (state.step < last) & ~jnp.all(state.done)
        state = jax.lax.while_loop(more, step, state)
    return state.tokens, state.logprobs, state.lengths


class RefillState(NamedTuple):
    """What the refilling loop carries: S slots, each decoding one of the B rows or idle."""

    step: jax.Array  # [] int32: decoding steps run; this step writes decoded slot step % C
    row: jax.Array  # [S] int32: the row each slot decodes, B when idle
    position: jax.Array  # [S] int32: response index of the token this step draws (= tokens fed)
    token: jax.Array  # [S] int32: the token this step feeds back
    next: jax.Array  # [] int32: how many rows of the queue have started
    tokens: jax.Array  # [B, A] int32: the responses, pad_id after each end
    logprobs: jax.Array  # [B, A] float32: log-prob of each drawn token, 0 after the end
    lengths: jax.Array  # [B] int32: tokens drawn per row, the end token included
    cache: DecodeCache  # S rows: each slot's prompt, copied in as its row starts, and its tokens


def _sample_refilling(
    weights, config, prompt_cache, shared, key, sampling, rows_B, budget_B, first_B, first_logp_B
):
    """The B rows streamed through `sampling.slots` decoding slots: the same tokens, log-probs
    and lengths as `_sample_static` (up to the order of float sums).

    Each slot's cache holds its row's prompt (copied from the prompts' prefill when the row
    starts, so a prompt runs once for its G rows) and C = A - 1 decoded slots used as a ring:
    every slot writes ring slot step % C at each step, and a row sees the last `position`
    ones, its own. A row starts in a free slot from its first token (drawn with every row's
    up front), so starting costs a copy of the prompt's keys and values, no model pass; rows
    that end at their first token never take a slot."""
    A, G, S = sampling.max_new_tokens, sampling.num_samples, sampling.slots
    B = rows_B.shape[0]
    C = max(A - 1, 1)
    rule, stop_ids = sampling.rule, jnp.asarray(sampling.stop_ids, jnp.int32)
    # The prompts in the decoding layout, Q rows (one decoded slot each, unused).
    source = prompt_cache.for_decoding(copies=1, slots=1, shared=shared)
    done_B = jnp.isin(first_B, stop_ids) | (budget_B <= 1)
    queue_B = jnp.argsort(done_B, stable=True).astype(jnp.int32)  # rows to decode, in order
    pending = B - jnp.sum(done_B, dtype=jnp.int32)

    def empty(x, axes, last):  # S rows of a per-layer cache buffer like x, last axis `last`
        return constrain(jnp.zeros((S, *x.shape[1:-1], last), x.dtype), axes)

    def empty_v(x, last):  # values [E, K, S, H]: the slot axis is the third
        return constrain(jnp.zeros((S, x.shape[1], last, x.shape[3]), x.dtype), DECODE_VALUES_AXES)

    P = source.prompt_mask.shape[1]
    cache = source._replace(
        prompt_k=tuple(empty(k, DECODE_KEYS_AXES, P) for k in source.prompt_k),
        prompt_v=tuple(empty_v(v, P) for v in source.prompt_v),
        prompt_mask=jnp.zeros((S, P), bool),
        k=tuple(empty(k, DECODE_KEYS_AXES, C) for k in source.k),
        v=tuple(empty_v(v, C) for v in source.v),
        positions=jnp.zeros((S,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    ).with_rope(config)

    def put(dst, src_1, slot):  # dst with row `slot` replaced by the one row of src_1
        return jax.lax.dynamic_update_index_in_dim(dst, src_1.astype(dst.dtype), slot, axis=0)

    def start(state: RefillState) -> RefillState:
        """The next row of the queue started in the first free slot."""
        slot = jnp.argmax(state.row == B)
        row = queue_B[state.next]
        take = lambda x: jax.lax.dynamic_index_in_dim(x, row // G, axis=0)  # its prompt's
        position = source.positions[row // G]
        c = state.cache
        rope = rope_tables(config, position[None, None])
        c = c._replace(
            prompt_k=tuple(put(k, take(src), slot) for k, src in zip(c.prompt_k, source.prompt_k)),
            prompt_v=tuple(put(v, take(src), slot) for v, src in zip(c.prompt_v, source.prompt_v)),
            prompt_mask=put(c.prompt_mask, take(source.prompt_mask), slot),
            positions=c.positions.at[slot].set(position),
            rope=tuple(put(x, r, slot) for x, r in zip(c.rope, rope)),
        )
        return state._replace(
            row=state.row.at[slot].set(row),
            position=state.position.at[slot].set(1),
            token=state.token.at[slot].set(first_B[row]),
            next=state.next + 1,
            cache=c,
        )

    can_start = lambda state: jnp.any(state.row == B) & (state.next < pending)

    def step(state: RefillState) -> RefillState:
        ring = state.step % C
        # This row's fed tokens sit in the last `position` ring slots, this step's included.
        visible_SxC = (ring - jnp.arange(C)) % C < state.position[:, None]
        logits_SxV, cache = decode(
            weights,
            config,
            state.token,
            state.cache._replace(index=ring),
            use_lora=sampling.use_lora,
            visible_BxS=visible_SxC,
        )
        active_S = state.row < B
        row_S = jnp.minimum(state.row, B - 1)
        token_S, logp_S = rule(logits_SxV, uniforms(key, rows_B[row_S], state.position))
        drawn_S = state.position + 1
        ended_S = active_S & (jnp.isin(token_S, stop_ids) | (drawn_S >= budget_B[row_S]))
        # Idle slots write out of bounds (row B): dropped.
        state = state._replace(
            step=state.step + 1,
            row=jnp.where(ended_S, B, state.row),
            position=drawn_S,
            token=token_S,
            tokens=state.tokens.at[state.row, state.position].set(token_S, mode="drop"),
            logprobs=state.logprobs.at[state.row, state.position].set(logp_S, mode="drop"),
            lengths=state.lengths.at[jnp.where(ended_S, state.row, B)].set(drawn_S, mode="drop"),
            cache=cache,
        )
        return jax.lax.while_loop(can_start, start, state)

    state = RefillState(
        step=jnp.zeros((), jnp.int32),
        row=jnp.full((S,), B, jnp.int32),
        position=jnp.zeros((S,), jnp.int32),
        token=jnp.zeros((S,), jnp.int32),
        next=jnp.zeros((), jnp.int32),
        tokens=jnp.full((B, A), sampling.pad_id, jnp.int32).at[:, 0].set(first_B),
        logprobs=jnp.zeros((B, A), jnp.float32).at[:, 0].set(first_logp_B),
        lengths=jnp.ones((B,), jnp.int32),  # rows that never start end at their first token
        cache=cache,
    )
    state = jax.lax.while_loop(can_start, start, state)
    state = jax.lax.while_loop(lambda state: jnp.any(state.row < B), step, state)
    return state.tokens, state.logprobs, state.lengths


_LENGTHS_FORMAT = "lognormal:<median>:<sigma>"
_LENGTHS_STREAM = 2**31 - 1  # folded into the key for the lengths, past any row index


def parse_lengths(spec: str) -> tuple[float, float]:
    """(median, sigma) of a benchmark lengths spec "lognormal:<median>:<sigma>"; ValueError
    unless median >= 1 and sigma >= 0."""
    kind, _, rest = spec.partition(":")
    try:
        median, sigma = (float(x) for x in rest.split(":"))
    except ValueError:
        median = sigma = float("nan")
    if kind != "lognormal" or not (median >= 1 and sigma >= 0):
        raise ValueError(f"{spec!r} is not {_LENGTHS_FORMAT!r} with median >= 1, sigma >= 0")
    return median, sigma


def benchmark_budgets(spec: str, key: jax.Array, rows: int, max_new_tokens: int) -> np.ndarray:
    """[rows] int32 response budgets for `sample`'s `budget_B` (benchmarks: random weights never
    draw an end token): lengths from a log-normal distribution of the spec's median and sigma
    (a long tail, as real responses to math problems have), rounded into [1, max_new_tokens],
    drawn from `key` (another stream than the tokens')."""
    median, sigma = parse_lengths(spec)
    normal = np.asarray(jax.random.normal(jax.random.fold_in(key, _LENGTHS_STREAM), (rows,)))
    lengths = np.rint(median * np.exp(sigma * normal.astype(np.float64)))
    return np.clip(lengths, 1, max_new_tokens).astype(np.int32)


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
    slots: int = 0,
) -> SampleOutput:
    """Samples `num_samples` responses for each left-padded prompt.

    Args:
      model: a `Transformer`, or `(weights, config)` as the trainer holds them.
      prompt_tokens_QxP, prompt_mask_QxP: left-padded prompts (mask 1 on real tokens).
      key: PRNG key; the same key gives the same output.
      max_new_tokens, temperature, top_p, num_samples, eos_ids, pad_id, ignore_eos, use_lora,
        slots: see `SamplingConfig` (`slots` below Q * num_samples: the refilling loop, which
        holds a KV cache of that many rows and wastes no step on ended rows while rows wait).
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
        slots=slots,
    )
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)
    return sample(weights, config, tokens, mask, key, settings)
