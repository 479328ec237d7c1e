"""The decoder's hyper-parameters (`ModelConfig`) and the names its parameters are built from.

Shape letters, one key for the whole package: tensors are named by shape (x_BxTxD) and einsums
use the same letters.
  Rows     B rows of a batch or cache (sequences), Q distinct prompts, G responses per prompt
           (GRPO's group; B = Q * G).
  Tokens   T tokens of this call, P prompt tokens, A answer tokens (the new tokens a sampler
           decodes; a batch's response window), S key/value slots (T, or a cache's capacity),
           X tokens or slots of a prefix that several rows share, U a row's own tokens after
           such a prefix (T = X + U), C tokens of one chunk of a chunked pass, Y chunks.
  Model    L layers, D model width, V vocabulary, F MLP width, N query heads, K key/value
           heads, J query heads per key/value head (N = K * J), H head dim, R LoRA rank,
           I / O a projection's flattened input / output features.
  Cache    E rows of one part of a cache (1, Q or B), M queries per key/value head of a part
           ((B / E) * J).
  Sampling W width of a vocabulary block, Z vocabulary blocks (V <= Z * W).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

# Each projection's kernel is [L, *in, *out] in these letters; HF stores it as [O, I].
PROJECTIONS: dict[str, tuple[str, str]] = {
    "q_proj": ("D", "NH"),
    "k_proj": ("D", "KH"),
    "v_proj": ("D", "KH"),
    "o_proj": ("NH", "D"),
    "gate_proj": ("D", "F"),
    "up_proj": ("D", "F"),
    "down_proj": ("F", "D"),
}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ARCHITECTURES = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16")


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

    Shapes: the key in `gxpo.models.config` (`sizes` gives the model letters' sizes).

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
    qk_norm: bool = False  # RMSNorm over each head's H features of q and k, before rotary (Qwen3)
    tie_embeddings: bool = True
    max_position_embeddings: int = 8192  # recorded for export; positions are not clipped
    arch: str = "llama"  # HF model_type: "llama" (Llama 3.x, SmolLM2), "qwen2" or "qwen3"
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
        """Size of each shape letter of the model's parameters."""
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
