"""Hugging Face checkpoints in and out: safetensors / GGUF loading, merged and PEFT export.

Loading is one pipeline for both formats: a config.json-style dict -> ModelConfig, then a
stream of (HF tensor name, array in HF/torch layout) -> the stacked NNX parameters. Each stacked
parameter kind is filled in one host buffer (cast to the param dtype on the way) and moved to the
devices as soon as its last layer arrives, so a safetensors load (read kind by kind) never holds
two full copies of the model. Given the weights' shardings (`load_pretrained(..., shardings=)`),
each array is created straight into its sharding, every device receiving only its own slices of
the host buffer: no device ever holds a whole stacked weight (a 7B model's MLP kernels are
over 1 GiB each), and there is no resharding afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from gxpo.models.config import DEFAULT_LORA_TARGETS, DTYPES, PROJECTIONS, ModelConfig
from gxpo.models.lora import fold_lora, lora_weights
from gxpo.models.presets import config_from_hf, config_to_hf
from gxpo.models.transformer import Transformer, init_lora_a

_HF_MODULES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True)
class _HFTensor:
    """Where one HF tensor lives in `Transformer.weights()` and how its layout differs."""

    path: tuple[str, ...]
    layer: int | None  # index on the stacked L axis, None for unstacked parameters
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # ours, per layer
    transpose: bool  # HF [out, in] vs ours [*in, *out]

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return (x.T if self.transpose else x).reshape(self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(self.hf_shape[::-1]).T if self.transpose else x.reshape(self.hf_shape)


def _hf_tensors(config: ModelConfig) -> dict[str, _HFTensor]:
    """Every tensor of the HF checkpoint of `config`, by HF name."""
    cfg = config
    V, D = cfg.vocab_size, cfg.dim
    table = {
        "model.embed_tokens.weight": _HFTensor(("embed",), None, (V, D), (V, D), False),
        "model.norm.weight": _HFTensor(("final_norm",), None, (D,), (D,), False),
    }
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = _HFTensor(("lm_head",), None, (V, D), (D, V), True)
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}."
        for hf, ours in (
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "mlp_norm"),
        ):
            table[f"{prefix}{hf}.weight"] = _HFTensor(("layers", ours), layer, (D,), (D,), False)
        if cfg.qk_norm:
            H = cfg.head_dim
            for name in ("q_norm", "k_norm"):
                table[f"{prefix}self_attn.{name}.weight"] = _HFTensor(
                    ("layers", name), layer, (H,), (H,), False
                )
        for name, (i, o) in PROJECTIONS.items():
            n_in, n_out = math.prod(cfg.shape(i)), math.prod(cfg.shape(o))
            table[f"{prefix}{_HF_MODULES[name]}.weight"] = _HFTensor(
                ("layers", name, "kernel"), layer, (n_out, n_in), cfg.shape(i + o), True
            )
            if cfg.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
                table[f"{prefix}{_HF_MODULES[name]}.bias"] = _HFTensor(
                    ("layers", name, "bias"), layer, (n_out,), cfg.shape(o), False
                )
    return table


def _ignored(name: str, config: ModelConfig) -> bool:
    # Old checkpoints store rotary tables; tied checkpoints may still carry a copy of the head.
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and config.tie_embeddings
    )


# The weights' shardings in the `Transformer.weights()` layout (a nested dict of
# jax.sharding.Sharding), or None: every weight on the default device.
Shardings = dict[str, Any] | None


def _sharding(shardings: Shardings, path: tuple[str, ...]) -> jax.sharding.Sharding | None:
    if shardings is None:
        return None
    node = shardings
    for key in path:
        node = node[key]
    return node


def _put(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """A host array on the devices: whole on the default device, or created straight into
    `sharding`, each device receiving only its slice of `host` (`jax.make_array_from_callback`
    asks for the index of each addressable shard, so several processes work too)."""
    if sharding is None:
        return jax.device_put(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _load_weights(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    source: str,
    shardings: Shardings = None,
) -> dict[tuple[str, ...], jax.Array]:
    """Stacked parameters (by path) from (HF name, array) pairs; checks names and shapes.
    With `shardings`, each parameter is placed straight into its own."""
    table = _hf_tensors(config)
    dtype = jnp.dtype(config.param_dtype)
    remaining = Counter(t.path for t in table.values())
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    loaded: dict[tuple[str, ...], jax.Array] = {}
    seen: set[str] = set()
    for name, array in tensors:
        t = table.get(name)
        if t is None:
            if _ignored(name, config):
                continue
            raise ValueError(
                f"{source}: unexpected tensor {name!r} for a {config.arch} model with "
                f"{config.num_layers} layers (tie_embeddings={config.tie_embeddings}); "
                "do the config and the weights come from the same checkpoint?"
            )
        if name in seen:
            raise ValueError(f"{source}: tensor {name!r} appears twice")
        seen.add(name)
        if tuple(array.shape) != t.hf_shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected "
                f"{t.hf_shape} from the model config"
            )
        if t.layer is None:
            host = np.ascontiguousarray(t.to_ours(array), dtype)
            loaded[t.path] = _put(host, _sharding(shardings, t.path))
            continue
        if t.path not in buffers:
            buffers[t.path] = np.empty((config.num_layers, *t.shape), dtype)
        buffers[t.path][t.layer] = t.to_ours(array)
        remaining[t.path] -= 1
        if remaining[t.path] == 0:
            loaded[t.path] = _put(buffers.pop(t.path), _sharding(shardings, t.path))
    missing = [name for name in table if name not in seen]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensors {shown}{more}")
    return loaded


def _build_model(
    config: ModelConfig,
    weights: dict[tuple[str, ...], jax.Array],
    seed: int,
    shardings: Shardings = None,
) -> Transformer:
    """A Transformer holding `weights`, with fresh LoRA adapters when config asks for them
    (in their `shardings` when given); the random base initialisation is never materialised."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed)))
    for path, value in weights.items():
        owner = model
        for attr in path[:-1]:
            owner = getattr(owner, attr)
        getattr(owner, path[-1]).value = value
    key = jax.random.key(seed)
    for n, name in enumerate(config.lora_targets if config.lora_rank else ()):
        projection = getattr(model.layers, name)
        a_sharding = _sharding(shardings, ("layers", name, "lora_a"))
        b_sharding = _sharding(shardings, ("layers", name, "lora_b"))
        # One jit with out_shardings draws the same numbers as the eager call, each device
        # computing only its own shard.
        init_a = jax.jit(
            lambda k, name=name: init_lora_a(k, config, name), out_shardings=a_sharding
        )
        projection.lora_a.value = init_a(jax.random.fold_in(key, n))
        projection.lora_b.value = _put(
            np.zeros(projection.lora_b.value.shape, np.float32), b_sharding
        )
    return model


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index}: lists shard files that are missing: {missing}")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    hint = f" (found {found})" if found else ""
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or model.safetensors.index.json{hint}; "
        "save the checkpoint with safe_serialization (the default of save_pretrained)"
    )


def _iter_safetensors(
    files: list[Path], order: dict[str, _HFTensor]
) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of all shards, grouped by parameter kind so each stacked buffer completes (and
    leaves host memory) before the next one starts; unknown names come last."""
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="numpy")) for f in files]
        # safe_open handles are not iterable: keys() is their only listing.
        where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118

        def key(name: str):
            t = order.get(name)
            return (0, t.path, t.layer or 0) if t else (1, (name,), 0)

        for name in sorted(where, key=key):
            yield name, where[name].get_tensor(name)


def _load_tokenizer(directory: Path):
    if not any((directory / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _check_vocab(tokenizer, config: ModelConfig, source: str) -> None:
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"vocab_size={config.vocab_size} rows; use the tokenizer of this checkpoint"
        )


def load_pretrained(
    path: str | Path,
    dtype: str = "float32",
    lora_rank: int = 0,
    *,
    param_dtype: str | None = None,
    lora_alpha: float | None = None,
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    remat: bool = False,
    seed: int = 0,
    shardings: Callable[[ModelConfig], dict] | None = None,
):
    """(model, tokenizer) from a Hugging Face checkpoint directory or a .gguf file.

    A directory holds config.json and model.safetensors, or shards listed in
    model.safetensors.index.json. `dtype` is the compute dtype and, unless `param_dtype` is
    given, the dtype the weights are cast to. LoRA adapters (rank > 0) start with B = 0, seeded
    by `seed`. The tokenizer comes from `transformers.AutoTokenizer` when the directory has
    tokenizer files and is None when it has none (e.g. random test checkpoints); a .gguf file
    always carries its tokenizer.

    `shardings`: a function of the checkpoint's ModelConfig giving every weight's sharding in
    the `Transformer.weights()` layout (e.g. `gxpo.train.mesh.weight_shardings` on a mesh).
    Each weight is then created straight into its sharding from the host copy, each device
    receiving only its slices; without it, every weight lands on the default device.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    options = dict(
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=tuple(lora_targets),
        remat=remat,
    )
    if path.is_file() and path.suffix == ".gguf":
        from gxpo.models import gguf

        config = config_from_hf(gguf.read_gguf_config(path), source=str(path), **options)
        tokenizer = gguf.gguf_tokenizer(path)
        _check_vocab(tokenizer, config, str(path))
        tensors = gguf.iter_gguf_tensors(path, jnp.dtype(config.param_dtype))
        return _load_model(config, tensors, str(path), seed, shardings), tokenizer
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path}: expected a directory or a .gguf file")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory")
    config = config_from_hf(json.loads(config_file.read_text()), str(config_file), **options)
    files = _safetensors_files(path)
    tokenizer = _load_tokenizer(path)
    _check_vocab(tokenizer, config, str(path))
    tensors = _iter_safetensors(files, _hf_tensors(config))
    return _load_model(config, tensors, str(path), seed, shardings), tokenizer


def _load_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    source: str,
    seed: int,
    shardings: Callable[[ModelConfig], dict] | None,
) -> Transformer:
    placement = shardings(config) if shardings is not None else None
    weights = _load_weights(config, tensors, source, placement)
    return _build_model(config, weights, seed, placement)


def _token_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {k: v for k, v in ids.items() if v is not None}


def _save_tokenizer(tokenizer, out: Path) -> None:
    """`tokenizer.save_pretrained(out)`, readable by transformers 4 and vLLM too: their
    tokenizer class (transformers 5 writes its own "TokenizersBackend") and the chat template
    inside tokenizer_config.json (transformers 5 writes it to chat_template.jinja only)."""
    tokenizer.save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if getattr(tokenizer, "chat_template", None) and "chat_template" not in config:
        config["chat_template"] = tokenizer.chat_template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def export_merged(
    model: Transformer,
    out_dir: str | Path,
    tokenizer=None,
    *,
    dtype: str | None = None,
    lora: bool = True,
    eos_token_ids: Iterable[int] | None = None,
) -> Path:
    """Writes a HF checkpoint directory (config.json, model.safetensors, and, with a tokenizer,
    its files and generation_config.json) with LoRA folded into the base weights, in `dtype`
    (default: the model's param dtype). `transformers.AutoModelForCausalLM.from_pretrained(
    out_dir)` loads it.

    `lora=False` writes the base weights alone (adapters dropped): the base model a PEFT
    adapter of this model goes onto. `eos_token_ids`: the ids that end a reply (e.g. both
    <|endoftext|> and <|im_end|>), written as generation_config.json's eos_token_id; default
    the tokenizer's eos token."""
    config = model.config
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise ValueError(f"export_merged: dtype={dtype!r}; allowed values are {DTYPES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = model.weights()  # only the HF tensors' paths are written: never an adapter's
    if lora:
        weights = fold_lora(weights, config)
    by_path: dict[tuple[str, ...], list[tuple[str, _HFTensor]]] = {}
    for name, t in _hf_tensors(config).items():
        by_path.setdefault(t.path, []).append((name, t))
    tensors = {}
    for path, entries in by_path.items():
        value = weights
        for attr in path:
            value = value[attr]
        host = np.asarray(value.astype(dtype))  # one kind on the host at a time
        for name, t in entries:
            tensors[name] = np.ascontiguousarray(
                t.to_hf(host if t.layer is None else host[t.layer])
            )
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    token_ids = _token_ids(tokenizer)
    hf_config = config_to_hf(config, dtype, **token_ids)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
        if eos_token_ids:
            token_ids["eos_token_id"] = [int(i) for i in eos_token_ids]
        (out / "generation_config.json").write_text(json.dumps(token_ids, indent=2))
    return out


def export_peft_adapter(
    model: Transformer, out_dir: str | Path, base_model_name_or_path: str | None = None
) -> Path:
    """Writes adapter_config.json + adapter_model.safetensors (float32) that
    `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the HF base model."""
    config = model.config
    if not config.lora_rank:
        raise ValueError("export_peft_adapter: the model has no LoRA adapters (lora_rank=0)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = config.lora_rank
    tensors = {}
    for name, ab in lora_weights(model).items():
        a = np.asarray(ab["lora_a"], np.float32)
        b = np.asarray(ab["lora_b"], np.float32)
        for layer in range(config.num_layers):
            prefix = f"base_model.model.model.layers.{layer}.{_HF_MODULES[name]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[layer].reshape(-1, rank).T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[layer].reshape(rank, -1).T)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": config.lora_scale * rank,
        "lora_dropout": 0.0,
        "target_modules": list(config.lora_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
