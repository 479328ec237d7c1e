"""Named model configs with their real dimensions, and Hugging Face config.json <-> ModelConfig."""

from __future__ import annotations

import dataclasses

from gxpo.models.config import ModelConfig, RopeScaling

_LLAMA32_ROPE = RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=512, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, max_position_embeddings=2048,
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        ffn_dim=1536, rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama3.2-1b": ModelConfig(
        vocab_size=128256, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        ffn_dim=8192, rope_theta=500_000.0, rope_scaling=_LLAMA32_ROPE, norm_eps=1e-5,
        tie_embeddings=True, max_position_embeddings=131072,
    ),
    "llama3.2-3b": ModelConfig(
        vocab_size=128256, dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
        ffn_dim=8192, rope_theta=500_000.0, rope_scaling=_LLAMA32_ROPE, norm_eps=1e-5,
        tie_embeddings=True, max_position_embeddings=131072,
    ),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, dim=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
        ffn_dim=4864, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=True, max_position_embeddings=32768, arch="qwen2",
    ),
    "qwen2.5-1.5b": ModelConfig(
        vocab_size=151936, dim=1536, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
        ffn_dim=8960, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=True, max_position_embeddings=32768, arch="qwen2",
    ),
    "qwen2.5-3b": ModelConfig(
        vocab_size=151936, dim=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128,
        ffn_dim=11008, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=True, max_position_embeddings=32768, arch="qwen2",
    ),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, dim=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
        ffn_dim=18944, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=False, max_position_embeddings=32768, arch="qwen2",
    ),
    # Qwen3 (dense): q/k per-head norms, head_dim 128 whatever the width, no qkv bias.
    "qwen3-0.6b": ModelConfig(
        vocab_size=151936, dim=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        ffn_dim=3072, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True,
        tie_embeddings=True, max_position_embeddings=40960, arch="qwen3",
    ),
    "qwen3-1.7b": ModelConfig(
        vocab_size=151936, dim=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
        ffn_dim=6144, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True,
        tie_embeddings=True, max_position_embeddings=40960, arch="qwen3",
    ),
    "qwen3-4b": ModelConfig(
        vocab_size=151936, dim=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        ffn_dim=9728, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True,
        tie_embeddings=True, max_position_embeddings=40960, arch="qwen3",
    ),
    "qwen3-8b": ModelConfig(
        vocab_size=151936, dim=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        ffn_dim=12288, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True,
        tie_embeddings=False, max_position_embeddings=40960, arch="qwen3",
    ),
}  # fmt: skip


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named config, with any ModelConfig field overridden (e.g. lora_rank=16)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {unknown} for preset {name!r}; "
                         f"valid fields: {sorted(fields)}")  # fmt: skip
    return dataclasses.replace(PRESETS[name], **overrides)


_HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def _rope(config_json: dict, source: str) -> tuple[float, RopeScaling | None]:
    """Reads both rope layouts: legacy `rope_theta` + `rope_scaling` (published Llama 3.2 /
    Qwen2.5 files) and transformers 5's `rope_parameters` (theta inside)."""
    params = config_json.get("rope_parameters")
    if params is not None:
        field, theta = "rope_parameters", params.get("rope_theta", config_json.get("rope_theta"))
    else:
        field, params = "rope_scaling", config_json.get("rope_scaling") or {}
        theta = config_json.get("rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if theta is None:
        raise ValueError(f"{source}: missing field 'rope_theta' (top level or in {field})")
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(
            f"{source}: {field}.rope_type={rope_type!r} is not supported; "
            "supported: 'default', 'llama3'"
        )
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"{source}: {field} of rope_type 'llama3' lacks {e.args[0]!r}") from None
    return float(theta), scaling


def config_from_hf(config_json: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (Llama / SmolLM2 / Qwen2 / Qwen3).

    `source` names the file in error messages; `overrides` set ModelConfig fields
    (dtype, lora_rank, ...).
    """
    arch = config_json.get("model_type")
    if arch is None:
        classes = {v: k for k, v in _HF_CLASSES.items()}
        arch = next(
            (classes[a] for a in config_json.get("architectures", []) if a in classes), None
        )
    if arch not in _HF_CLASSES:
        raise ValueError(
            f"{source}: model_type={config_json.get('model_type')!r} "
            f"(architectures={config_json.get('architectures')}) is not supported; "
            f"supported model_type: {sorted(_HF_CLASSES)}"
        )
    missing = [k for k in _REQUIRED if k not in config_json]
    if missing:
        raise ValueError(f"{source}: missing required fields {missing}")
    if config_json.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={config_json['hidden_act']!r}; only 'silu'")
    for field in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if config_json.get(field):
            raise ValueError(f"{source}: {field}=true is not supported (expected false)")
    theta, scaling = _rope(config_json, source)
    heads = config_json["num_attention_heads"]
    fields = dict(
        vocab_size=config_json["vocab_size"],
        dim=config_json["hidden_size"],
        num_layers=config_json["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config_json.get("num_key_value_heads") or heads,
        head_dim=config_json.get("head_dim") or config_json["hidden_size"] // heads,
        ffn_dim=config_json["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=config_json.get("rms_norm_eps", 1e-6),
        qkv_bias=arch == "qwen2",  # Qwen2 always has them and no field; the others say false
        qk_norm=arch == "qwen3",
        tie_embeddings=bool(config_json.get("tie_word_embeddings", False)),
        max_position_embeddings=config_json.get("max_position_embeddings", 8192),
        arch=arch,
    )
    return ModelConfig(**{**fields, **overrides})


def config_to_hf(config: ModelConfig, dtype: str = "float32", **extra) -> dict:
    """A config.json dict for `config` in the legacy `rope_theta` / `rope_scaling` layout,
    which every transformers version reads (5.x converts it to `rope_parameters`).
    `extra` adds fields such as bos_token_id / eos_token_id."""
    if config.qkv_bias != (config.arch == "qwen2") or config.qk_norm != (config.arch == "qwen3"):
        raise ValueError(
            f"ModelConfig(arch={config.arch!r}, qkv_bias={config.qkv_bias}, "
            f"qk_norm={config.qk_norm}) has no Hugging Face model_type: qkv_bias goes with "
            "'qwen2' and qk_norm with 'qwen3'"
        )
    rope_scaling = None
    if config.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    out = {
        "architectures": [_HF_CLASSES[config.arch]],
        "model_type": config.arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.ffn_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if config.arch == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif config.arch == "qwen3":
        out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return {**out, **extra}
