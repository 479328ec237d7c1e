"""One Flax NNX decoder for the Llama 3.x / SmolLM2 / Qwen2.x family, with a KV cache.

Shapes are named with the letters of the key in `ModelConfig`'s docstring. Every parameter's
shape is a string of those letters, and `LOGICAL_AXES` maps each letter to the logical axis name
stored as the parameter's `out_sharding` metadata: the one table a mesh module maps to mesh axes
(`nnx.get_partition_spec` under `nnx.logical_axis_rules`). No mesh is needed on one device.
Under a mesh and such rules (`gxpo.train.mesh.use_mesh`), the pure functions also pin their
activations through the same names (`constrain`): rows over "batch", logits over "vocab", the KV
cache over "batch" and "kv_heads"; on one device that is a no-op.

Layers are stacked (leading L axis on every layer parameter) and run by one `jax.lax.scan`.
The model object only holds parameters; the math lives in pure functions of a weights dict
(`forward`, `prefill`, `decode`), jitted with the config static, so `model(...)` is fast eagerly
and inlines under an outer `jax.jit` / `nnx.jit`.

LoRA: `use_lora=False` (a static flag) runs the base model from the same weights, which is the
reference policy of the KL term without a second copy of the base.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core.spmd import get_logical_axis_rules
from jax.sharding import PartitionSpec

LOGICAL_AXES: dict[str, str] = {
    "B": "batch",  # activations only (rows of a batch or of the KV cache)
    "L": "layers",
    "V": "vocab",
    "D": "embed",
    "N": "q_heads",
    "K": "kv_heads",
    "H": "head_dim",
    "F": "mlp",
    "R": "lora_rank",
}

# Each projection's kernel is [L, *in, *out]; HF stores it as [prod(out), prod(in)].
PROJECTIONS: dict[str, tuple[str, str]] = {
    "q_proj": ("D", "NH"),
    "k_proj": ("D", "KH"),
    "v_proj": ("D", "KH"),
    "o_proj": ("NH", "D"),
    "gate_proj": ("D", "F"),
    "up_proj": ("D", "F"),
    "down_proj": ("F", "D"),
}
# Logical axes of the pinned activations: the residual stream, logits, and KV cache k / v.
ACTIVATION_AXES = ("batch", None, None)
LOGITS_AXES = ("batch", None, "vocab")
KV_CACHE_AXES = ("layers", "batch", None, "kv_heads", "head_dim")
# A DecodeCache's per-layer keys [rows, K, H, slots] and values [rows, K, slots, H].
DECODE_KEYS_AXES = ("batch", "kv_heads", "head_dim", None)
DECODE_VALUES_AXES = ("batch", "kv_heads", None, "head_dim")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ARCHITECTURES = ("llama", "qwen2")
DTYPES = ("float32", "bfloat16")

_INIT_STD = 0.02
# Finite, so a query with no visible key (a left-pad row) gets uniform weights instead of NaN,
# which would otherwise leak into gradients through the zero-weighted pad positions.
_MASKED = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent rope scaling (HF `rope_type: "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder hyper-parameters; hashable, so it is a static argument of the jitted functions.

    Shape letters, used in tensor names (x_BxTxD) and einsums across gxpo.models:
      B batch rows, T tokens of this call, S key/value slots (T, or the cache capacity),
      L layers, D model width (dim), N query heads, K key/value heads, G query heads per
      key/value head (N // K), H head_dim, F MLP width (ffn_dim), V vocabulary, R LoRA rank;
      in a `DecodeCache`: Q distinct prompts, C rows per prompt (B = Q * C), P prompt slots,
      X slots of a prefix all rows share, A rows of one of its parts (1, Q or B), M queries per
      key/value head of a part ((B / A) * G); in `forward(shared_prefix_rows=)`: S prefix and U
      own tokens of a row (T = S + U).

    `param_dtype` stores the base weights, `dtype` is the compute dtype of activations and the
    KV cache; norms, softmax and logits run in float32. LoRA parameters are always float32
    (small, and bf16 would swallow small learning-rate updates). `lora_alpha=None` means
    2 * lora_rank (the paper's 128 / 256).
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = True
    max_position_embeddings: int = 8192  # recorded for export; positions are not clipped
    arch: str = "llama"  # HF model_type: "llama" (Llama 3.x, SmolLM2) or "qwen2"
    param_dtype: str = "float32"
    dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    remat: bool = False  # recompute each layer in the backward pass (activation memory)

    def __post_init__(self):
        for field in ("param_dtype", "dtype"):
            name = _dtype_name(getattr(self, field))
            if name not in DTYPES:
                raise ValueError(f"ModelConfig.{field}={name!r}: allowed values are {DTYPES}")
            object.__setattr__(self, field, name)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        for field in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (rotary halves)")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig.arch={self.arch!r}: allowed values are {ARCHITECTURES}")
        if self.lora_rank < 0:
            raise ValueError(f"ModelConfig.lora_rank={self.lora_rank} must be >= 0 (0 = off)")
        unknown = [t for t in self.lora_targets if t not in PROJECTIONS]
        if unknown:
            raise ValueError(
                f"ModelConfig.lora_targets has unknown modules {unknown}; "
                f"allowed: {tuple(PROJECTIONS)}"
            )
        if self.lora_rank and not self.lora_targets:
            raise ValueError("ModelConfig.lora_targets is empty while lora_rank > 0")

    @property
    def lora_scale(self) -> float:
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def sizes(self) -> dict[str, int]:
        """Size of each shape letter."""
        return {
            "L": self.num_layers,
            "V": self.vocab_size,
            "D": self.dim,
            "N": self.num_heads,
            "K": self.num_kv_heads,
            "H": self.head_dim,
            "F": self.ffn_dim,
            "R": self.lora_rank,
        }

    def shape(self, letters: str) -> tuple[int, ...]:
        return tuple(self.sizes[c] for c in letters)


def _dtype_name(dtype) -> str:
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return str(dtype)


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
        self.mlp_norm = _param(nnx.Param, ones, "LD")
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, Projection(config, name, bias=False, rngs=rngs))


class Transformer(nnx.Module):
    """The decoder. `model(tokens_BxT, attention_mask=mask_BxT) -> logits_BxTxV` (float32).

    Parameter paths: embed [V, D]; layers/{attn_norm, mlp_norm} [L, D];
    layers/<proj>/{kernel, bias, lora_a, lora_b} (see `PROJECTIONS`); final_norm [D];
    lm_head [D, V] when embeddings are untied (stored pre-transposed for the matmul).
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
        """The parameters as a nested dict of arrays, the input of the pure functions below."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(
        self,
        tokens_BxT: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        use_lora: bool = True,
    ) -> jax.Array:
        return forward(self.weights(), self.config, tokens_BxT, attention_mask, use_lora=use_lora)

    def prefill(
        self,
        tokens_BxT: jax.Array,
        attention_mask: jax.Array,
        cache_size: int,
        *,
        use_lora: bool = True,
    ) -> tuple[jax.Array, KVCache]:
        """See `prefill`."""
        return prefill(
            self.weights(), self.config, tokens_BxT, attention_mask, cache_size, use_lora=use_lora
        )

    def decode(
        self, tokens_B: jax.Array, cache: KVCache, *, use_lora: bool = True
    ) -> tuple[jax.Array, KVCache]:
        """See `decode`."""
        return decode(self.weights(), self.config, tokens_B, cache, use_lora=use_lora)


# ----------------------------------------------------------------------------- sharding


def logical_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...],
    mesh_sizes: dict[str, int],
) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions carry the logical names `axes`.

    `rules` maps a logical name to mesh axes (a name, a tuple of names, or None). A mesh axis is
    used once per array, and a dimension that its mesh axes do not divide stays whole (e.g. 2 KV
    heads on a tensor axis of 4), so every array of every model fits every mesh.
    """
    table, used, spec = dict(rules), set(), []
    for name, size in zip(axes, shape):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a in mesh_sizes and a not in used)
        if not mesh_axes or size % math.prod(mesh_sizes[a] for a in mesh_axes):
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`x` pinned to the layout its logical `axes` name, under the mesh (`jax.set_mesh`) and
    logical rules (`nnx.logical_axis_rules`) a caller set, e.g. `gxpo.train.mesh.use_mesh`;
    `x` itself otherwise. The mesh is part of jit's cache key, so a function traced without one
    is traced again under one (the rules are read at trace time: keep them fixed per mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    spec = logical_spec(axes, x.shape, rules, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


# ----------------------------------------------------------------------------- KV cache


class KVCache(NamedTuple):
    """Preallocated keys/values of every layer for incremental decoding, as `prefill` makes it.

    All rows write the same slot each step (`index`); rows whose prompt is shorter carry
    padding slots that `mask` hides, and `positions` keeps each row's own rotary position.
    `decode` takes and returns it; a decoding loop is faster on its `for_decoding()` form:

        weights = fold_lora(model.weights(), model.config)  # optional: no adapter matmuls
        logits_QxV, cache = prefill(weights, config, prompt_QxP, mask_QxP, P)
        cache = cache.for_decoding(copies=C, slots=max_new - 1)  # C rows per prompt
        cache = cache.with_rope(config)  # optional: rotary tables once per step
        weights = unstack_layers(weights)  # once, outside the loop
        logits_BxV = jnp.repeat(logits_QxV, C, axis=0)
        for _ in range(max_new):  # or a jax.lax.while_loop carrying the cache
            token_B = pick(logits_BxV)
            logits_BxV, cache = decode(weights, config, token_B, cache)
    """

    k: jax.Array  # [L, B, S, K, H] compute dtype
    v: jax.Array  # [L, B, S, K, H] compute dtype
    mask: jax.Array  # [B, S] bool: slot holds a real token
    positions: jax.Array  # [B] int32: rotary position of the row's next token
    index: jax.Array  # [] int32: next slot to write

    def repeat(self, n: int) -> KVCache:
        """Each row repeated n times in place (row b -> rows b*n .. b*n+n-1), e.g. to draw
        n samples per prompt from one prefill."""
        return KVCache(
            k=jnp.repeat(self.k, n, axis=1),
            v=jnp.repeat(self.v, n, axis=1),
            mask=jnp.repeat(self.mask, n, axis=0),
            positions=jnp.repeat(self.positions, n, axis=0),
            index=self.index,
        )

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
    """Per layer, the keys [rows, K, H, S] and values [rows, K, S, H] of a `KVCache`."""
    keys = lambda k_QxPxKxH: constrain(k_QxPxKxH.transpose(0, 2, 3, 1), DECODE_KEYS_AXES)
    values = lambda v_QxPxKxH: constrain(v_QxPxKxH.transpose(0, 2, 1, 3), DECODE_VALUES_AXES)
    layers = range(cache.k.shape[0])
    return tuple(keys(cache.k[i]) for i in layers), tuple(values(cache.v[i]) for i in layers)


class DecodeCache(NamedTuple):
    """The KV cache as a decoding loop carries it (`KVCache.for_decoding`).

    Per layer, since slicing one layer out of a stacked array copies it at every step. Keys
    [rows, K, H, slots] and values [rows, K, slots, H]: both attention matmuls then read the
    cache as a plain (untransposed) right operand, about twice as fast on CPU as keys stored
    like values. Each prompt's keys and values are held once for its C rows (drawing C samples
    per prompt then reads them once per step, not C times), the decoded tokens' per row; every
    row writes decoded slot `index` at each step, so slots [0, index] are the ones visible.
    A prefix common to all prompts (a system prompt) may be held once for all rows (`shared_*`).
    """

    prompt_k: tuple[jax.Array, ...]  # L x [Q, K, H, P] compute dtype
    prompt_v: tuple[jax.Array, ...]  # L x [Q, K, P, H] compute dtype
    prompt_mask: jax.Array  # [Q, P] bool: slot holds a real prompt token
    k: tuple[jax.Array, ...]  # L x [B, K, H, S] compute dtype: decoded tokens, B = Q * C
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
        every element of q and k (several percent of a small model's step)."""
        return self._replace(rope=_rope_tables(config, self.positions[:, None]))

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


# ----------------------------------------------------------------------------- the math


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


def _rope_tables(config: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, H/2]; the size-1 axis broadcasts over the heads (N or K)."""
    angles = positions_BxT[..., None].astype(jnp.float32) * _rope_inv_freq(config)
    return jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]


def _apply_rope(x_BxTxNxH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # HF's rotate_half convention: the two halves of the head dim form the rotated pairs.
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def _rms_norm(x_BxTxD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    x32 = x_BxTxD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight_D.astype(x_BxTxD.dtype) * normed.astype(x_BxTxD.dtype)


def _project(config: ModelConfig, p: dict, name: str, x: jax.Array, use_lora: bool) -> jax.Array:
    """x [B, T, *in] -> [B, T, *out] through projection `name` of one layer's params `p`.

    As one 2-D matmul over the flattened axes: given `NH,NHD->D`, XLA may transpose the
    [N, H, D] kernel at every call, which in a decoding step costs as much as the matmul."""
    i, o = PROJECTIONS[name]
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
    return y_BxTxO.reshape(B, T, *config.shape(o))


def _attend(
    q_BxTxKxGxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array, mask_BxTxS: jax.Array
) -> jax.Array:
    scores = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    )
    scores = jnp.where(mask_BxTxS[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BxSxKxH)


def _layer(config: ModelConfig, p: dict, x, rope, attend, use_lora: bool):
    """One decoder layer over a residual stream x [B, T, D], or over a tuple of streams that share
    its weights (then `rope` holds one (cos, sin) per stream, and q, k, v reach `attend` as
    tuples). `attend(q, k, v) -> (y, aux)` decides where keys come from (this call's tokens, the
    cache, another stream); aux is passed through."""
    cfg = config
    each = jax.tree.map  # a leaf for one stream, a tuple's items for several
    groups = cfg.num_heads // cfg.num_kv_heads

    def project(name, h):
        return each(lambda h: _project(cfg, p, name, h, use_lora), h)

    h = each(lambda x: _rms_norm(x, p["attn_norm"], cfg.norm_eps), x)
    # Scaling q (not the scores) is the cheaper place for 1/sqrt(H).
    scale = lambda q: q * jnp.asarray(cfg.head_dim**-0.5, q.dtype)
    q = each(lambda q, r: _apply_rope(scale(q), *r), project("q_proj", h), rope)
    k = each(lambda k, r: _apply_rope(k, *r), project("k_proj", h), rope)
    v = project("v_proj", h)
    by_group = lambda q: q.reshape(*q.shape[:2], cfg.num_kv_heads, groups, cfg.head_dim)
    y, aux = attend(each(by_group, q), k, v)
    by_head = lambda y: y.reshape(*y.shape[:2], cfg.num_heads, cfg.head_dim)
    x = each(lambda x, y: x + _project(cfg, p, "o_proj", by_head(y), use_lora), x, y)

    def mlp(x):
        h = _rms_norm(x, p["mlp_norm"], cfg.norm_eps)
        gate = _project(cfg, p, "gate_proj", h, use_lora)
        up = _project(cfg, p, "up_proj", h, use_lora)
        return x + _project(cfg, p, "down_proj", jax.nn.silu(gate) * up, use_lora)

    return each(mlp, x), aux


def _embed(config: ModelConfig, weights: dict, tokens: jax.Array) -> jax.Array:
    return jnp.take(weights["embed"], tokens, axis=0).astype(config.dtype)


def _logits(config: ModelConfig, weights: dict, x_BxTxD: jax.Array) -> jax.Array:
    x_BxTxD = _rms_norm(x_BxTxD, weights["final_norm"], config.norm_eps)
    if config.tie_embeddings:
        embed_VxD = weights["embed"].astype(x_BxTxD.dtype)
        logits = jnp.einsum("BTD,VD->BTV", x_BxTxD, embed_VxD, preferred_element_type=jnp.float32)
    else:
        head_DxV = weights["lm_head"].astype(x_BxTxD.dtype)
        logits = jnp.einsum("BTD,DV->BTV", x_BxTxD, head_DxV, preferred_element_type=jnp.float32)
    return constrain(logits, LOGITS_AXES)


def _hidden(config, weights, tokens_BxT, mask_BxT, use_lora, collect_kv):
    """Runs all layers over this call's tokens; returns x [B, T, D] and, if asked,
    the keys/values of every layer ([L, B, T, K, H] each)."""
    T = tokens_BxT.shape[1]
    positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
    rope = _rope_tables(config, positions_BxT)
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    mask_BxTxT = causal_TxT[None] & mask_BxT[:, None, :].astype(bool)

    def attend(q, k, v):
        return _attend(q, k, v, mask_BxTxT), ((k, v) if collect_kv else None)

    def body(x, p):
        x, aux = _layer(config, p, x, rope, attend, use_lora)
        return constrain(x, ACTIVATION_AXES), aux

    if config.remat:
        body = jax.checkpoint(body)
    x_BxTxD = constrain(_embed(config, weights, tokens_BxT), ACTIVATION_AXES)
    return jax.lax.scan(body, x_BxTxD, weights["layers"])


def _attend_grouped(
    q_BxTxKxGxH: jax.Array,
    pk_QxSxKxH: jax.Array,
    pv_QxSxKxH: jax.Array,
    prefix_mask_QxS: jax.Array,
    k_BxTxKxH: jax.Array,
    v_BxTxKxH: jax.Array,
    mask_BxTxT: jax.Array,
) -> jax.Array:
    """Each row's queries over its group's shared prefix (all of it precedes them) and over its
    own tokens (`mask_BxTxT`), in one softmax. Rows b*C .. b*C + C - 1 share prefix b (Q = 1: one
    prefix for all rows); the prefix's keys are never repeated per row."""
    Q, S = prefix_mask_QxS.shape
    B, T, K, G, H = q_BxTxKxGxH.shape
    C = B // Q
    f32 = jnp.float32
    q_QxCxTxKxGxH = q_BxTxKxGxH.reshape(Q, C, T, K, G, H)
    s_prefix = jnp.einsum(
        "QCTKGH,QSKH->QCKGTS", q_QxCxTxKxGxH, pk_QxSxKxH, preferred_element_type=f32
    )
    s_prefix = jnp.where(prefix_mask_QxS[:, None, None, None, None], s_prefix, _MASKED)
    s_own = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxTxKxH, preferred_element_type=f32)
    s_own = jnp.where(mask_BxTxT[:, None, None], s_own, _MASKED).reshape(Q, C, K, G, T, T)
    probs = jax.nn.softmax(jnp.concatenate([s_prefix, s_own], axis=-1), axis=-1)
    probs = probs.astype(v_BxTxKxH.dtype)
    y_prefix = jnp.einsum("QCKGTS,QSKH->QCTKGH", probs[..., :S], pv_QxSxKxH)
    y_own = jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., S:].reshape(B, K, G, T, T), v_BxTxKxH)
    return y_prefix.reshape(B, T, K, G, H) + y_own


def _hidden_grouped(config, weights, tokens_BxT, mask_BxT, use_lora, split: int, group: int):
    """`_hidden(...)[0][:, split:]` for rows in groups of `group` consecutive rows whose first
    `split` tokens (and mask) are equal, the G responses of one prompt: that shared prefix runs
    once per group (a stream of Q = B / group rows), the rest once per row (a stream of B rows
    that attends to its group's prefix). Same math, Q * split + B * (T - split) tokens instead of
    B * T, through the same layer weights (`_layer` over two streams)."""
    B, T = tokens_BxT.shape
    Q = B // group
    mask_BxT = mask_BxT.astype(bool)
    prefix_QxS = tokens_BxT.reshape(Q, group, T)[:, 0, :split]
    prefix_mask_QxS = mask_BxT.reshape(Q, group, T)[:, 0, :split]
    own_mask_BxU = mask_BxT[:, split:]
    before_B = jnp.repeat(jnp.sum(prefix_mask_QxS, axis=1), group)
    prefix_pos = jnp.maximum(jnp.cumsum(prefix_mask_QxS, axis=1) - 1, 0)
    own_pos = jnp.maximum(before_B[:, None] + jnp.cumsum(own_mask_BxU, axis=1) - 1, 0)
    rope = (_rope_tables(config, prefix_pos), _rope_tables(config, own_pos))
    S, U = split, T - split
    prefix_causal_QxSxS = jnp.tril(jnp.ones((S, S), bool))[None] & prefix_mask_QxS[:, None, :]
    own_causal_BxUxU = jnp.tril(jnp.ones((U, U), bool))[None] & own_mask_BxU[:, None, :]

    def attend(q, k, v):
        (q_p, q_o), (k_p, k_o), (v_p, v_o) = q, k, v
        y_p = _attend(q_p, k_p, v_p, prefix_causal_QxSxS)
        y_o = _attend_grouped(q_o, k_p, v_p, prefix_mask_QxS, k_o, v_o, own_causal_BxUxU)
        return (y_p, y_o), None

    def body(x, p):
        x, _ = _layer(config, p, x, rope, attend, use_lora)
        return tuple(constrain(s, ACTIVATION_AXES) for s in x), None

    if config.remat:
        body = jax.checkpoint(body)
    x = (_embed(config, weights, prefix_QxS), _embed(config, weights, tokens_BxT[:, split:]))
    (_, x_BxUxD), _ = jax.lax.scan(
        body, tuple(constrain(s, ACTIVATION_AXES) for s in x), weights["layers"]
    )
    return x_BxUxD


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
    `shared_prefix_rows` C > 1 declares that rows come in groups of C consecutive rows whose
    `tokens_BxT[:, :logits_start]` and mask are equal (the C responses to one prompt): that
    prefix then runs once per group, not once per row. The caller guarantees the equality.
    """
    if mask_BxT is None:
        mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    B, T = tokens_BxT.shape
    if shared_prefix_rows > 1 and 0 < logits_start < T:
        if B % shared_prefix_rows:
            raise ValueError(
                f"forward: shared_prefix_rows={shared_prefix_rows} must divide the {B} rows"
            )
        x = _hidden_grouped(
            config, weights, tokens_BxT, mask_BxT, use_lora, logits_start, shared_prefix_rows
        )
        return _logits(config, weights, x)
    x, _ = _hidden(config, weights, tokens_BxT, mask_BxT, use_lora, collect_kv=False)
    return _logits(config, weights, x[:, logits_start:])


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
    `cache_size` slots (>= T) holding the prompt in slots [0, T).

    Size the cache as T + the number of tokens to decode: a decode past the last slot
    overwrites it (dynamic_update_slice clamps; it cannot raise under jit).

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
        x, (k, v) = _hidden(config, weights, tokens_BxT, mask_BxT, use_lora, collect_kv=True)
        start_B = jnp.zeros((B,), jnp.int32)
    else:
        x, (k, v) = _hidden_after(config, weights, prefix, tokens_BxT, mask_BxT, use_lora)
        start_B = jnp.broadcast_to(prefix.positions, (B,))
    last_B = T - 1 - jnp.argmax(mask_BxT[:, ::-1], axis=1)
    x_Bx1xD = jnp.take_along_axis(x, last_B[:, None, None], axis=1)
    logits_BxV = _logits(config, weights, x_Bx1xD)[:, 0]
    pad = cache_size - T
    kv_pad = ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))
    cache = KVCache(
        k=constrain(jnp.pad(k, kv_pad), KV_CACHE_AXES),
        v=constrain(jnp.pad(v, kv_pad), KV_CACHE_AXES),
        mask=jnp.pad(mask_BxT, ((0, 0), (0, pad))),
        positions=start_B + mask_BxT.sum(axis=1, dtype=jnp.int32),
        index=jnp.asarray(T, jnp.int32),
    )
    return logits_BxV, cache


def _hidden_after(config, weights, prefix: KVCache, tokens_BxT, mask_BxT, use_lora):
    """`_hidden` (keys and values collected) for tokens that continue `prefix`'s rows (one, or
    B): each layer attends over the prefix's slots and this call's own, in one softmax."""
    B, T = tokens_BxT.shape
    positions_BxT = prefix.positions[:, None] + jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
    rope = _rope_tables(config, positions_BxT)
    own_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & mask_BxT[:, None, :]

    def body(x, layer):
        p, k_AxSxKxH, v_AxSxKxH = layer

        def attend(q, k, v):
            y = _attend_grouped(q, k_AxSxKxH, v_AxSxKxH, prefix.mask, k, v, own_BxTxT)
            return y, (k, v)

        x, kv = _layer(config, p, x, rope, attend, use_lora)
        return constrain(x, ACTIVATION_AXES), kv

    x_BxTxD = constrain(_embed(config, weights, tokens_BxT), ACTIVATION_AXES)
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


def _attend_cached(q_BxKxGxH: jax.Array, parts: list[tuple]) -> jax.Array:
    """One query per row and head over the parts of a cache, one softmax across them all.

    A part is (keys [A, K, H, S], values [A, K, S, H], visible: bool broadcasting to
    [A, 1, 1, S], or None) whose A rows each serve B / A consecutive query rows: those query it
    together (M = (B / A) * G queries per key/value head in one matmul), so keys shared by
    several rows (a prompt's, a common prefix's) are read once per step.
    Each part is normalised by its own maximum (no relayout of the scores), the parts' sums then
    rescaled to the common one on [B, K, G]; the weights stay unnormalised until the
    [B, K, G, H] output, the smallest place to divide."""
    B, K, G, _ = q_BxKxGxH.shape
    f32 = jnp.float32

    def grouped(x_BxKxG, A):  # [B, K, G, ...] -> [A, K, M, ...]
        rest = x_BxKxG.shape[3:]
        x = x_BxKxG.reshape(A, B // A, K, G, *rest).swapaxes(1, 2)
        return x.reshape(A, K, -1, *rest)

    def ungrouped(x_AxKxM):  # [A, K, M, ...] -> [B, K, G, ...]
        A, rest = x_AxKxM.shape[0], x_AxKxM.shape[3:]
        x = x_AxKxM.reshape(A, K, B // A, G, *rest).swapaxes(1, 2)
        return x.reshape(B, K, G, *rest)

    maxes, sums, totals = [], [], []
    for k_AxKxHxS, v_AxKxSxH, visible in parts:
        q_AxKxMxH = grouped(q_BxKxGxH, k_AxKxHxS.shape[0])
        s_AxKxMxS = jnp.einsum("AKMH,AKHS->AKMS", q_AxKxMxH, k_AxKxHxS, preferred_element_type=f32)
        if visible is not None:
            s_AxKxMxS = jnp.where(visible, s_AxKxMxS, _MASKED)
        max_AxKxMx1 = jnp.max(s_AxKxMxS, axis=-1, keepdims=True)
        e_AxKxMxS = jnp.exp(s_AxKxMxS - max_AxKxMx1)
        p_AxKxMxS = e_AxKxMxS.astype(v_AxKxSxH.dtype)
        y_AxKxMxH = jnp.einsum("AKMS,AKSH->AKMH", p_AxKxMxS, v_AxKxSxH, preferred_element_type=f32)
        maxes.append(ungrouped(max_AxKxMx1[..., 0]))
        sums.append(ungrouped(y_AxKxMxH))
        totals.append(ungrouped(jnp.sum(e_AxKxMxS, axis=-1)))
    max_BxKxG = functools.reduce(jnp.maximum, maxes)
    scales = [jnp.exp(m_BxKxG - max_BxKxG) for m_BxKxG in maxes]
    y_BxKxGxH = sum(y * c[..., None] for y, c in zip(sums, scales))
    total_BxKxG = sum(t * c for t, c in zip(totals, scales))
    return (y_BxKxGxH / total_BxKxG[..., None]).astype(q_BxKxGxH.dtype)


def _decode_layer_attend(slot, visible_S, parts, k_cache, v_cache, q, k, v):
    """`_layer`'s attend for one layer of a `DecodeCache`: writes this token's keys and values
    in decoded slot `slot`, then attends over the cache's other `parts` and the decoded slots
    (q [B, 1, K, G, H], k and v [B, 1, K, H])."""
    zero = jnp.zeros((), jnp.int32)
    k_BxKxHx1 = k.transpose(0, 2, 3, 1).astype(k_cache.dtype)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_BxKxHx1, (zero, zero, zero, slot))
    v_BxKx1xH = v.swapaxes(1, 2).astype(v_cache.dtype)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_BxKx1xH, (zero, zero, slot, zero))
    y_BxKxGxH = _attend_cached(q[:, 0], [*parts, (k_cache, v_cache, visible_S)])
    k_cache = constrain(k_cache, DECODE_KEYS_AXES)
    v_cache = constrain(v_cache, DECODE_VALUES_AXES)
    return y_BxKxGxH[:, None], (k_cache, v_cache)


@functools.partial(jax.jit, static_argnames=("config", "use_lora"), donate_argnames=("cache",))
def decode(
    weights: dict,
    config: ModelConfig,
    tokens_B: jax.Array,
    cache: KVCache | DecodeCache,
    *,
    use_lora: bool = True,
) -> tuple[jax.Array, KVCache | DecodeCache]:
    """Feeds one token per row; returns the next-token logits [B, V] and the updated cache, of
    the kind given. The cache is updated in place (donated when called eagerly; inside a jitted
    loop, carry it).

    A `KVCache` takes the token at slot `cache.index`. A decoding loop should carry a
    `DecodeCache` instead and pass `unstack_layers(weights)`, both made once before the loop
    (see `KVCache`): the layers are then unrolled, each reading its own weights and cache
    without a copy; `weights` stacked still works, at the cost of that copy per step."""
    if isinstance(cache, KVCache):
        return _decode_into(weights, config, tokens_B, cache, use_lora)
    weights = unstack_layers(weights)
    slot = cache.index
    visible_S = jnp.arange(cache.v[0].shape[2]) <= slot
    rope = _rope_tables(config, cache.positions[:, None]) if cache.rope is None else cache.rope
    x = constrain(_embed(config, weights, tokens_B[:, None]), ACTIVATION_AXES)
    k, v = [], []
    for i, p in enumerate(weights["layers"]):
        parts = [(cache.prompt_k[i], cache.prompt_v[i], cache.prompt_mask[:, None, None])]
        if cache.shared_k:
            shared = (cache.shared_k[i], cache.shared_v[i], cache.shared_mask[:, None, None])
            parts.insert(0, shared)
        attend = functools.partial(
            _decode_layer_attend, slot, visible_S, parts, cache.k[i], cache.v[i]
        )
        x, (k_cache, v_cache) = _layer(config, p, x, rope, attend, use_lora)
        k.append(k_cache)
        v.append(v_cache)
    positions = cache.positions + 1
    new_cache = cache._replace(
        k=tuple(k),
        v=tuple(v),
        positions=positions,
        index=slot + 1,
        rope=None if cache.rope is None else _rope_tables(config, positions[:, None]),
    )
    return _logits(config, weights, x)[:, 0], new_cache


def _decode_into(weights, config, tokens_B, cache: KVCache, use_lora):
    """`decode` on a `KVCache`: its slots serve as the prompt of a one-slot `DecodeCache`, whose
    new keys and values then go to slot `index`."""
    logits_BxV, step = decode(
        weights, config, tokens_B, cache.for_decoding(copies=1, slots=1), use_lora=use_lora
    )
    new_k = jnp.stack(step.k).transpose(0, 1, 4, 2, 3)  # [L, B, 1, K, H]
    new_v = jnp.stack(step.v).transpose(0, 1, 3, 2, 4)
    slot, zero = cache.index, jnp.zeros((), jnp.int32)
    at = (zero, zero, slot, zero, zero)
    B = tokens_B.shape[0]
    new_cache = KVCache(
        k=constrain(jax.lax.dynamic_update_slice(cache.k, new_k, at), KV_CACHE_AXES),
        v=constrain(jax.lax.dynamic_update_slice(cache.v, new_v, at), KV_CACHE_AXES),
        mask=jax.lax.dynamic_update_slice(cache.mask, jnp.ones((B, 1), bool), (zero, slot)),
        positions=cache.positions + 1,
        index=slot + 1,
    )
    return logits_BxV, new_cache


def init_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (tests, benchmarks, training from scratch)."""
    return Transformer(config, rngs=nnx.Rngs(seed))
