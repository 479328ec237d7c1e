"""Tiny random Hugging Face (torch) reference models for parity tests."""

from __future__ import annotations

import math

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 96
WIDTH = 96  # the longest sum in these models: intermediate_size (and 4 heads x head_dim 24)
EPS32 = float(np.finfo(np.float32).eps)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Far below the test sequence length, so the scaled frequencies matter.
    "original_max_position_embeddings": 16,
}


def hf_config(arch: str, *, tie: bool, rope_scaling: dict | None = None, **extra):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        rope_theta=10_000.0,
        attn_implementation="eager",
    )
    common.update(extra)
    if arch == "llama":
        return transformers.LlamaConfig(rope_scaling=rope_scaling, **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common)
    return transformers.Qwen2Config(**common)


def hf_model(config, seed: int = 0):
    """A model with all weights random and O(1) logits (the default 0.02 init makes every
    logit tiny, which would let a wrong model pass a small absolute tolerance)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    return model


def save(model, directory, **kwargs) -> str:
    model.save_pretrained(str(directory), **kwargs)
    return str(directory)


def padded_batch(left: tuple[int, ...], length: int, seed: int = 0, right: tuple[int, ...] = ()):
    """tokens, mask [B, T] (int32): row b has left[b] padding tokens on the left; then rows with
    right[b] padding tokens on the right."""
    rng = np.random.RandomState(seed)
    rows = len(left) + len(right)
    tokens = rng.randint(0, VOCAB, (rows, length)).astype(np.int32)
    mask = np.ones_like(tokens)
    for row, pad in enumerate(left):
        mask[row, :pad] = 0
    for row, pad in enumerate(right, start=len(left)):
        mask[row, length - pad :] = 0
    return np.where(mask == 1, tokens, 0), mask


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # HF counts positions from the first column unless told; ours start at each row's first
    # real token, as generate() does.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def max_diff_on_real(ours, ref, mask) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref)[mask.astype(bool)].max())


def f32_atol(magnitude: float, terms: int) -> float:
    """How far two float32 computations of the same math may drift apart, on results of size
    `magnitude` that each depend on `terms` rounded additions: random-walk rounding (eps32 *
    sqrt(terms), relative), times 4 for the largest deviation among many results. The model
    computes in float32 only (bfloat16 is its other dtype), so its comparisons use this, not
    float64."""
    return 4 * EPS32 * math.sqrt(terms) * float(magnitude)


def decoder_terms(layers: int, width: int) -> int:
    """The rounded additions behind one logit: per layer six chained sums of at most `width`
    terms (q/k/v, scores, weighted values, o_proj, gate/up, down_proj), then the output head."""
    return (6 * layers + 1) * width


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of `vocab_size` ids (<unk>, <s>, </s>, w3, w4, ...) to save beside
    a tiny checkpoint."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
