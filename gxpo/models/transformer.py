"""One Flax NNX decoder for the Llama 3.x / SmolLM2 / Qwen2.x / Qwen3 family: parameters, forward.

Every parameter's shape is a string of shape letters, stored with the logical axis names of
`gxpo.models.sharding.LOGICAL_AXES` as its `out_sharding` metadata; no mesh is needed on one
device. Layers are stacked (leading L axis on every layer parameter) and run by one
`jax.lax.scan`. The model object only holds parameters; the math lives in pure functions of a
weights dict (`forward` here, `prefill` and `decode` in `gxpo.models.decode`), jitted with the
config static, so `model(...)` is fast eagerly and inlines under an outer `jax.jit` / `nnx.jit`.

A layer is `qkv` -> an attention kernel of `gxpo.models.attention` -> `finish` (o_proj, residual,
MLP); each driver (the forward's plain and shared-prefix passes here, the prefill and decoding
step in `gxpo.models.decode`) picks the kernel, that is, where the keys come from.

LoRA: `use_lora=False` (a static flag) runs the base model from the same weights, which is the
reference policy of the KL term without a second copy of the base.

Shapes: the key in `gxpo.models.config`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gxpo.models import attention, packing
from gxpo.models.config import PROJECTIONS, ModelConfig
from gxpo.models.sharding import ACTIVATION_AXES, LOGICAL_AXES, LOGITS_AXES, constrain

_INIT_STD = 0.02

# ----------------------------------------------------------------------------- parameters


def _param(kind: type[nnx.Param], value: jax.Array, letters: str) -> nnx.Param:
    # eager_sharding=False: keep the logical names as metadata only, so no mesh is needed here.
    return kind(value, out_sharding=tuple(LOGICAL_AXES[c] for c in letters), eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: str) -> jax.Array:
    return (_INIT_STD * jax.random.normal(rngs.params(), shape)).astype(dtype)


def init_lora_a(key: jax.Array, config: ModelConfig, name: str) -> jax.Array:
    """LoRA A [L, *in, R] of projection `name`: PEFT's default U(+-1/sqrt(fan_in)). With B = 0
    the adapted model is exactly the base."""
    i, _ = PROJECTIONS[name]
    bound = 1.0 / math.sqrt(math.prod(config.shape(i)))
    return jax.random.uniform(key, config.shape("L" + i + "R"), jnp.float32, -bound, bound)


class Projection(nnx.Module):
    """A linear map of every layer: kernel [L, *in, *out], optional bias and LoRA A/B."""

    def __init__(self, config: ModelConfig, name: str, *, bias: bool, rngs: nnx.Rngs):
        i, o = PROJECTIONS[name]
        dtype = config.param_dtype
        self.kernel = _param(
            nnx.Param, _normal(rngs, config.shape("L" + i + o), dtype), "L" + i + o
        )
        self.bias = (
            _param(nnx.Param, jnp.zeros(config.shape("L" + o), dtype), "L" + o) if bias else None
        )
        lora_a = lora_b = None
        if config.lora_rank and name in config.lora_targets:
            lora_a = _param(nnx.LoRAParam, init_lora_a(rngs.params(), config, name), "L" + i + "R")
            b = jnp.zeros(config.shape("LR" + o), jnp.float32)
            lora_b = _param(nnx.LoRAParam, b, "LR" + o)
        self.lora_a, self.lora_b = lora_a, lora_b


class DecoderLayers(nnx.Module):
    """All decoder layers' parameters, stacked on a leading L axis."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        ones = jnp.ones(config.shape("LD"), config.param_dtype)
        self.attn_norm = _param(nnx.Param, ones, "LD")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bias = config.qkv_bias and name != "o_proj"
            setattr(self, name, Projection(config, name, bias=bias, rngs=rngs))
        # Qwen3's per-head norms of q and k: one weight of H for all heads of a layer.
        head_ones = jnp.ones(config.shape("LH"), config.param_dtype)
        self.q_norm = _param(nnx.Param, head_ones, "LH") if config.qk_norm else None
        self.k_norm = _param(nnx.Param, head_ones, "LH") if config.qk_norm else None
        self.mlp_norm = _param(nnx.Param, ones, "LD")
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, Projection(config, name, bias=False, rngs=rngs))


class Transformer(nnx.Module):
    """The decoder. `model(tokens_BxT, attention_mask=mask_BxT) -> logits_BxTxV` (float32).

    Parameter paths: embed [V, D]; layers/{attn_norm, mlp_norm} [L, D];
    layers/{q_norm, k_norm} [L, H] when `qk_norm` (Qwen3);
    layers/<proj>/{kernel, bias, lora_a, lora_b} (see `PROJECTIONS`); final_norm [D];
    lm_head [D, V] when embeddings are untied (stored pre-transposed for the matmul).
    Decoding runs on `weights()` through `gxpo.models.decode`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = _param(nnx.Param, _normal(rngs, config.shape("VD"), config.param_dtype), "VD")
        self.layers = DecoderLayers(config, rngs=rngs)
        self.final_norm = _param(nnx.Param, jnp.ones((config.dim,), config.param_dtype), "D")
        self.lm_head = (
            None
            if config.tie_embeddings
            else _param(nnx.Param, _normal(rngs, config.shape("DV"), config.param_dtype), "DV")
        )

    def weights(self) -> dict:
        """The parameters as a nested dict of arrays, the input of the pure functions."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(
        self,
        tokens_BxT: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        use_lora: bool = True,
    ) -> jax.Array:
        return forward(self.weights(), self.config, tokens_BxT, attention_mask, use_lora=use_lora)


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (tests, benchmarks, training from scratch)."""
    return Transformer(config, rngs=nnx.Rngs(seed))


# ----------------------------------------------------------------------------- the pieces


def _rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies [H/2], float32, as Hugging Face computes them."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, H/2]; the size-1 axis broadcasts over the heads (N or K)."""
    angles = positions_BxT[..., None].astype(jnp.float32) * _rope_inv_freq(config)
    return jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]


def _apply_rope(x_BxTxNxH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # HF's rotate_half convention: the two halves of the head dim form the rotated pairs.
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def _rms_norm(x_BxTxD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    # Over the last axis: D of the residual stream, or H of each head (q_norm / k_norm).
    x32 = x_BxTxD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight_D.astype(x_BxTxD.dtype) * normed.astype(x_BxTxD.dtype)


def _project(config: ModelConfig, p: dict, name: str, x: jax.Array, use_lora: bool) -> jax.Array:
    """x [B, T, *in] -> [B, T, *out] through projection `name` of one layer's params `p`.

    As one 2-D matmul over the flattened axes: given `NH,NHD->D`, XLA may transpose the
    [N, H, D] kernel at every call, which in a decoding step costs as much as the matmul."""
    p = p[name]
    dtype = x.dtype
    B, T = x.shape[:2]
    x_BxTxI = x.reshape(B, T, -1)
    y_BxTxO = x_BxTxI @ p["kernel"].astype(dtype).reshape(x_BxTxI.shape[-1], -1)
    if "bias" in p:
        y_BxTxO = y_BxTxO + p["bias"].astype(dtype).reshape(-1)
    if use_lora and "lora_a" in p:
        a_BxTxR = x_BxTxI @ p["lora_a"].astype(dtype).reshape(x_BxTxI.shape[-1], -1)
        a_BxTxR = a_BxTxR * jnp.asarray(config.lora_scale, dtype)
        y_BxTxO = y_BxTxO + a_BxTxR @ p["lora_b"].astype(dtype).reshape(a_BxTxR.shape[-1], -1)
    return y_BxTxO.reshape(B, T, *config.shape(PROJECTIONS[name][1]))


def qkv(
    config: ModelConfig, p: dict, x_BxTxD: jax.Array, rope: tuple, use_lora: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's attention inputs from the residual stream: q [B, T, K, J, H] (normed per head
    when `qk_norm`, scaled by 1/sqrt(H), rotated), k [B, T, K, H] (normed per head when
    `qk_norm`, rotated) and v [B, T, K, H]; `rope` is (cos, sin) of the tokens' positions
    (`rope_tables`)."""
    cfg = config
    h_BxTxD = _rms_norm(x_BxTxD, p["attn_norm"], cfg.norm_eps)
    q_BxTxNxH = _project(cfg, p, "q_proj", h_BxTxD, use_lora)
    k_BxTxKxH = _project(cfg, p, "k_proj", h_BxTxD, use_lora)
    if cfg.qk_norm:  # Qwen3: after the projection, before the rotary (as Hugging Face does)
        q_BxTxNxH = _rms_norm(q_BxTxNxH, p["q_norm"], cfg.norm_eps)
        k_BxTxKxH = _rms_norm(k_BxTxKxH, p["k_norm"], cfg.norm_eps)
    # Scaling q (not the scores) is the cheaper place for 1/sqrt(H).
    q_BxTxNxH = _apply_rope(q_BxTxNxH * jnp.asarray(cfg.head_dim**-0.5, q_BxTxNxH.dtype), *rope)
    k_BxTxKxH = _apply_rope(k_BxTxKxH, *rope)
    v_BxTxKxH = _project(cfg, p, "v_proj", h_BxTxD, use_lora)
    B, T = x_BxTxD.shape[:2]
    J = cfg.num_heads // cfg.num_kv_heads
    q_BxTxKxJxH = q_BxTxNxH.reshape(B, T, cfg.num_kv_heads, J, cfg.head_dim)
    return q_BxTxKxJxH, k_BxTxKxH, v_BxTxKxH


def finish(
    config: ModelConfig, p: dict, x_BxTxD: jax.Array, y_BxTxKxJxH: jax.Array, use_lora: bool
) -> jax.Array:
    """The rest of a layer after attention: o_proj into the residual stream, then the MLP."""
    cfg = config
    B, T = x_BxTxD.shape[:2]
    y_BxTxNxH = y_BxTxKxJxH.reshape(B, T, cfg.num_heads, cfg.head_dim)
    x_BxTxD = x_BxTxD + _project(cfg, p, "o_proj", y_BxTxNxH, use_lora)
    h_BxTxD = _rms_norm(x_BxTxD, p["mlp_norm"], cfg.norm_eps)
    gate_BxTxF = _project(cfg, p, "gate_proj", h_BxTxD, use_lora)
    up_BxTxF = _project(cfg, p, "up_proj", h_BxTxD, use_lora)
    return x_BxTxD + _project(cfg, p, "down_proj", jax.nn.silu(gate_BxTxF) * up_BxTxF, use_lora)


def embed(config: ModelConfig, weights: dict, tokens_BxT: jax.Array) -> jax.Array:
    return jnp.take(weights["embed"], tokens_BxT, axis=0).astype(config.dtype)


def to_logits(config: ModelConfig, weights: dict, x_BxTxD: jax.Array) -> jax.Array:
    """The final norm and the output head: logits [B, T, V] in float32."""
    x_BxTxD = _rms_norm(x_BxTxD, weights["final_norm"], config.norm_eps)
    if config.tie_embeddings:
        embed_VxD = weights["embed"].astype(x_BxTxD.dtype)
        logits = jnp.einsum("BTD,VD->BTV", x_BxTxD, embed_VxD, preferred_element_type=jnp.float32)
    else:
        head_DxV = weights["lm_head"].astype(x_BxTxD.dtype)
        logits = jnp.einsum("BTD,DV->BTV", x_BxTxD, head_DxV, preferred_element_type=jnp.float32)
    return constrain(logits, LOGITS_AXES)


# ----------------------------------------------------------------------------- the forward


def hidden(
    config: ModelConfig,
    weights: dict,
    tokens_BxT: jax.Array,
    mask_BxT: jax.Array,
    use_lora: bool,
    collect_kv: bool,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Runs all layers over this call's tokens; returns x [B, T, D] and, if asked,
    the keys/values of every layer ([L, B, T, K, H] each)."""
    T = tokens_BxT.shape[1]
    positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
    rope = rope_tables(config, positions_BxT)
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    mask_BxTxT = causal_TxT[None] & mask_BxT[:, None, :].astype(bool)

    def body(x_BxTxD, p):
        q_BxTxKxJxH, k_BxTxKxH, v_BxTxKxH = qkv(config, p, x_BxTxD, rope, use_lora)
        y_BxTxKxJxH = attention.plain(q_BxTxKxJxH, k_BxTxKxH, v_BxTxKxH, mask_BxTxT)
        x_BxTxD = finish(config, p, x_BxTxD, y_BxTxKxJxH, use_lora)
        kv = (k_BxTxKxH, v_BxTxKxH) if collect_kv else None
        return constrain(x_BxTxD, ACTIVATION_AXES), kv

    if config.remat:
        body = jax.checkpoint(body)
    x_BxTxD = constrain(embed(config, weights, tokens_BxT), ACTIVATION_AXES)
    return jax.lax.scan(body, x_BxTxD, weights["layers"])


def _hidden_shared_prefix(config, weights, tokens_BxT, mask_BxT, use_lora, prefix: int, rows: int):
    """`hidden(...)[0][:, prefix:]` for rows in groups of G = `rows` consecutive rows whose first
    X = `prefix` tokens (and mask) are equal, the G responses of one prompt: that shared prefix
    runs once per group (a stream of Q = B / G rows), the rest once per row (a stream of B rows
    that attends to its group's prefix). Same math, Q * X + B * U tokens instead of B * T,
    through the same layer weights."""
    B, T = tokens_BxT.shape
    X, G = prefix, rows
    Q, U = B // G, T - X
    mask_BxT = mask_BxT.astype(bool)
    prefix_QxX = tokens_BxT.reshape(Q, G, T)[:, 0, :X]
    prefix_mask_QxX = mask_BxT.reshape(Q, G, T)[:, 0, :X]
    own_mask_BxU = mask_BxT[:, X:]
    before_B = jnp.repeat(jnp.sum(prefix_mask_QxX, axis=1), G)
    own_pos_BxU = jnp.maximum(before_B[:, None] + jnp.cumsum(own_mask_BxU, axis=1) - 1, 0)
    own_causal_BxUxU = jnp.tril(jnp.ones((U, U), bool))[None] & own_mask_BxU[:, None, :]
    return _prefix_and_rows(
        config,
        weights,
        (prefix_QxX, prefix_mask_QxX),
        (tokens_BxT[:, X:], own_pos_BxU, own_causal_BxUxU),
        prefix_mask_QxX,
        use_lora,
    )


def _prefix_and_rows(config, weights, prefix, rows, visible, use_lora: bool) -> jax.Array:
    """x [B, U, D] of rows that attend to prefixes run beside them, once each.

    `prefix`: (tokens [Q, X], mask [Q, X]), left-padded prompts. `rows`: (tokens [B, U],
    rotary positions [B, U], own-keys mask [B, U, U]). `visible`: which prefix keys the rows see,
    [Q, X] (row b sees prefix b // (B / Q)) or, for one flattened prefix stream, [1, B, U, Q * X]
    per query."""
    prefix_QxX, prefix_mask_QxX = prefix
    own_BxU, own_pos_BxU, own_BxUxU = rows
    Q, X = prefix_QxX.shape
    prefix_pos_QxX = jnp.maximum(jnp.cumsum(prefix_mask_QxX, axis=1) - 1, 0)
    prefix_rope = rope_tables(config, prefix_pos_QxX)
    own_rope = rope_tables(config, own_pos_BxU)
    prefix_causal_QxXxX = jnp.tril(jnp.ones((X, X), bool))[None] & prefix_mask_QxX[:, None, :]
    flat = visible.ndim == 4  # one prefix stream of all Q prompts, seen per query

    def body(streams, p):
        x_QxXxD, x_BxUxD = streams
        q_QxXxKxJxH, k_QxXxKxH, v_QxXxKxH = qkv(config, p, x_QxXxD, prefix_rope, use_lora)
        q_BxUxKxJxH, k_BxUxKxH, v_BxUxKxH = qkv(config, p, x_BxUxD, own_rope, use_lora)
        y_QxXxKxJxH = attention.plain(q_QxXxKxJxH, k_QxXxKxH, v_QxXxKxH, prefix_causal_QxXxX)
        if flat:
            k_QxXxKxH, v_QxXxKxH = (
                a.reshape(1, Q * X, *a.shape[2:]) for a in (k_QxXxKxH, v_QxXxKxH)
            )
        y_BxUxKxJxH = attention.shared_prefix(
            q_BxUxKxJxH, k_QxXxKxH, v_QxXxKxH, visible, k_BxUxKxH, v_BxUxKxH, own_BxUxU
        )
        x_QxXxD = finish(config, p, x_QxXxD, y_QxXxKxJxH, use_lora)
        x_BxUxD = finish(config, p, x_BxUxD, y_BxUxKxJxH, use_lora)
        return (constrain(x_QxXxD, ACTIVATION_AXES), constrain(x_BxUxD, ACTIVATION_AXES)), None

    if config.remat:
        body = jax.checkpoint(body)
    x_QxXxD = constrain(embed(config, weights, prefix_QxX), ACTIVATION_AXES)
    x_BxUxD = constrain(embed(config, weights, own_BxU), ACTIVATION_AXES)
    (_, x_BxUxD), _ = jax.lax.scan(body, (x_QxXxD, x_BxUxD), weights["layers"])
    return x_BxUxD


@functools.partial(jax.jit, static_argnames=("config", "use_lora", "group_size"))
def forward_packed(
    weights: dict,
    config: ModelConfig,
    tokens_BxT: jax.Array,
    mask_BxT: jax.Array,
    src_RxA: jax.Array,
    *,
    use_lora: bool = True,
    group_size: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Logits [R, A, V] in float32 of responses packed into R rows (`gxpo.models.packing.plan`'s
    `src_RxA`), and the next token [R, A] each slot predicts.

    The batch is `forward`'s with `logits_start = T - A`: rows in groups of G = `group_size`
    responses to one prompt (the first T - A tokens of a group's rows equal; each prompt runs
    once), prompts left-padded, responses right-padded. Each slot's logits are those `forward`
    gives at the window slot it holds; empty slots' are meaningless."""
    B, T = tokens_BxT.shape
    A = src_RxA.shape[1]
    X, G = T - A, group_size
    Q = B // G
    mask_BxT = mask_BxT.astype(bool)
    tokens_RxA, positions_RxA, next_RxA, group_RxA, own_RxAxA = packing.packed_stream(
        tokens_BxT, mask_BxT, src_RxA, G
    )
    prefix_QxX = tokens_BxT.reshape(Q, G, T)[:, 0, :X]
    prefix_mask_QxX = mask_BxT.reshape(Q, G, T)[:, 0, :X]
    key_group_QX = jnp.repeat(jnp.arange(Q), X)
    visible_1xRxAxQX = (
        (group_RxA[:, :, None] == key_group_QX[None, None, :]) & prefix_mask_QxX.reshape(-1)
    )[None]
    x_RxAxD = _prefix_and_rows(
        config,
        weights,
        (prefix_QxX, prefix_mask_QxX),
        (tokens_RxA, positions_RxA, own_RxAxA),
        visible_1xRxAxQX,
        use_lora,
    )
    return to_logits(config, weights, x_RxAxD), next_RxA


@functools.partial(
    jax.jit, static_argnames=("config", "use_lora", "logits_start", "shared_prefix_rows")
)
def forward(
    weights: dict,
    config: ModelConfig,
    tokens_BxT: jax.Array,
    mask_BxT: jax.Array | None = None,
    *,
    use_lora: bool = True,
    logits_start: int = 0,
    shared_prefix_rows: int = 1,
) -> jax.Array:
    """Logits [B, T - logits_start, V] in float32 of a full sequence.

    `mask_BxT` (1 = real token, 0 = padding; left or right padding) sets the rotary positions
    (cumsum(mask) - 1) and hides padded keys; outputs at padded positions are meaningless.
    `logits_start` skips the output head for the first positions (a training step needs logits
    only where responses are predicted; the head is a large share of a small model's cost).
    `shared_prefix_rows` G > 1 declares that rows come in groups of G consecutive rows whose
    `tokens_BxT[:, :logits_start]` and mask are equal (the G responses to one prompt): that
    prefix (X = logits_start tokens) then runs once per group, not once per row. The caller
    guarantees the equality.
    """
    if mask_BxT is None:
        mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    B, T = tokens_BxT.shape
    if shared_prefix_rows > 1 and 0 < logits_start < T:
        if B % shared_prefix_rows:
            raise ValueError(
                f"forward: shared_prefix_rows={shared_prefix_rows} must divide the {B} rows"
            )
        x_BxUxD = _hidden_shared_prefix(
            config, weights, tokens_BxT, mask_BxT, use_lora, logits_start, shared_prefix_rows
        )
        return to_logits(config, weights, x_BxUxD)
    x_BxTxD, _ = hidden(config, weights, tokens_BxT, mask_BxT, use_lora, collect_kv=False)
    return to_logits(config, weights, x_BxTxD[:, logits_start:])
