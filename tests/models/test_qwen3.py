"""Qwen3 (dense): logits equal transformers' Qwen3ForCausalLM on tiny random checkpoints (tied and
untied, head_dim != hidden / heads), every path of the decoder (shared-prefix forward, cached
decoding, the sampler, LoRA), export through transformers and peft, the presets against the
published models, and an unsupported family's error."""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from hf_tiny import (
    VOCAB,
    WIDTH,
    decoder_terms,
    f32_atol,
    hf_config,
    hf_logits,
    hf_model,
    max_diff_on_real,
    padded_batch,
    save,
)

from gxpo.models import (
    Transformer,
    config_from_hf,
    config_to_hf,
    decode,
    export_merged,
    export_peft_adapter,
    forward,
    get_preset,
    load_pretrained,
    prefill,
    split_trainable,
)
from gxpo.rl.grpo import token_logprobs
from gxpo.rl.sampler import generate

HEAD_DIM = 24  # != hidden_size 64 / 4 heads: Qwen3 states head_dim, and it need not be D / N
LEFT_PADS, RIGHT_PADS = (0, 5, 17), (9,)
LENGTH = 40
# The brief's bound for parity with torch in float32; each test also checks the rounding
# allowance of a 2-layer decoder (hf_tiny), which is the tighter one at these magnitudes.
PARITY = 1e-4


def _atol(reference: np.ndarray) -> float:
    return min(PARITY, f32_atol(np.abs(reference).max(), decoder_terms(2, WIDTH)))


def _randomize_adapters(model: Transformer, seed: int = 0) -> None:
    for i, name in enumerate(model.config.lora_targets):
        b = getattr(model.layers, name).lora_b
        b.value = 0.2 * jax.random.normal(jax.random.key(seed + i), b.value.shape)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """(HF model, its checkpoint directory): tied embeddings, 2 KV heads, head_dim 24."""
    ref_model = hf_model(hf_config("qwen3", tie=True, head_dim=HEAD_DIM))
    return ref_model, save(ref_model, tmp_path_factory.mktemp("qwen3-tied"))


@pytest.mark.parametrize(
    "tie, extra",
    [(True, {}), (False, {"num_key_value_heads": 1})],
    ids=["tied", "untied-mqa"],
)
def test_logits_match_transformers(tmp_path, tie, extra):
    ref_model = hf_model(hf_config("qwen3", tie=tie, head_dim=HEAD_DIM, **extra))
    assert type(ref_model).__name__ == "Qwen3ForCausalLM"
    model, tokenizer = load_pretrained(save(ref_model, tmp_path))
    config = model.config
    assert tokenizer is None  # no tokenizer files in a random checkpoint
    assert (config.arch, config.qk_norm, config.qkv_bias) == ("qwen3", True, False)
    assert (config.head_dim, config.tie_embeddings) == (HEAD_DIM, tie)
    assert model.layers.q_norm.value.shape == (2, HEAD_DIM)
    hf_q_norm = ref_model.model.layers[1].self_attn.q_norm.weight.detach().numpy()
    np.testing.assert_array_equal(model.layers.q_norm.value[1], hf_q_norm)

    tokens, mask = padded_batch(LEFT_PADS, LENGTH, right=RIGHT_PADS)
    ref = hf_logits(ref_model, tokens, mask)
    logits = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.float32 and logits.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small
    assert max_diff_on_real(logits, ref, mask) < _atol(ref)
    # The per-head norms matter: the same weights without them are far off.
    no_norms = dataclasses.replace(config, qk_norm=False)
    other = forward(model.weights(), no_norms, jnp.asarray(tokens), jnp.asarray(mask))
    assert max_diff_on_real(other, ref, mask) > 0.1


def test_shared_prefix_forward_equals_the_plain_forward(tied):
    """The training forward's shared-prompt pass (each prompt once per group of rows) gives the
    plain forward's logits on a Qwen3 model with adapters on."""
    _, path = tied
    model, _ = load_pretrained(path, lora_rank=4)
    _randomize_adapters(model)
    Q, G, X, U = 2, 3, 10, 6  # prompts, rows per prompt, prompt columns, response columns
    rng = np.random.default_rng(0)
    prompt_mask = np.arange(X)[None] >= np.array([[0], [4]])  # left padding per prompt
    tokens = np.concatenate(
        [np.repeat(rng.integers(0, VOCAB, (Q, X)), G, axis=0), rng.integers(0, VOCAB, (Q * G, U))],
        axis=1,
    ).astype(np.int32)
    mask = np.concatenate([np.repeat(prompt_mask, G, axis=0), np.ones((Q * G, U), bool)], axis=1)
    args = (model.weights(), model.config, jnp.asarray(tokens), jnp.asarray(mask))
    plain = np.asarray(forward(*args, logits_start=X))
    grouped = np.asarray(forward(*args, logits_start=X, shared_prefix_rows=G))
    # Same math in another order, in float32: the rounding allowance of a 2-layer decoder.
    atol = f32_atol(np.abs(plain).max(), decoder_terms(2, WIDTH))
    np.testing.assert_allclose(grouped, plain, rtol=0, atol=atol)


def test_cached_decode_matches_full_forward(tied):
    """Prefill left- and right-padded prompts, then decode a different continuation per row,
    two rows per prompt, with nonzero adapters on q/k/v/o: each step's logits equal the full
    forward pass over prompt + continuation."""
    _, path = tied
    model, _ = load_pretrained(path, lora_rank=4)
    _randomize_adapters(model)
    weights, config = model.weights(), model.config
    prompt_len, steps, repeats = 9, 5, 2
    prompts, prompt_mask = padded_batch((0, 3), prompt_len, right=(4,))
    rows = np.repeat(np.arange(len(prompts)), repeats)
    continuation = np.random.RandomState(1).randint(0, VOCAB, (len(rows), steps)).astype(np.int32)
    tokens = np.concatenate([prompts[rows], continuation], axis=1)
    mask = np.concatenate([prompt_mask[rows], np.ones_like(continuation)], axis=1)
    full = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    atol = f32_atol(np.abs(full).max(), decoder_terms(2, WIDTH))

    logits, cache = prefill(weights, config, jnp.asarray(prompts), jnp.asarray(prompt_mask), 12)
    assert cache.k.shape == (2, 3, 12, 2, HEAD_DIM)
    last_real = prompt_len - 1 - np.argmax(prompt_mask[:, ::-1], axis=1)
    np.testing.assert_allclose(logits, full[::repeats][np.arange(3), last_real], atol=atol)
    cache = cache.for_decoding(copies=repeats, slots=steps)
    for step in range(steps):
        logits, cache = decode(weights, config, jnp.asarray(continuation[:, step]), cache)
        np.testing.assert_allclose(logits, full[:, prompt_len + step], atol=atol)


def test_fresh_adapters_equal_the_base_and_the_norms_stay_frozen(tied):
    ref_model, path = tied
    base, _ = load_pretrained(path)
    model, _ = load_pretrained(path, lora_rank=4)
    tokens, mask = padded_batch(LEFT_PADS, 16)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    np.testing.assert_array_equal(model(tokens, attention_mask=mask), base(tokens, mask))
    _, trainable, frozen = split_trainable(model)
    trainable_paths = {p for p, _ in nnx.to_flat_state(trainable)}
    frozen_paths = {p for p, _ in nnx.to_flat_state(frozen)}
    assert trainable_paths and all(p[-1] in ("lora_a", "lora_b") for p in trainable_paths)
    assert {("layers", "q_norm"), ("layers", "k_norm")} <= frozen_paths


def test_sampled_logprobs_equal_a_trainer_forward_pass(tied):
    """The sampler's decoding loop (unstacked layers, rotary tables carried) on a Qwen3 model:
    the log-probs it returns are the trainer's forward pass's."""
    _, path = tied
    model, _ = load_pretrained(path, lora_rank=4)
    _randomize_adapters(model)
    tokens, mask = padded_batch((0, 4, 7), 9)
    out = generate(model, tokens, mask, jax.random.key(1), max_new_tokens=8, num_samples=2)
    assert out.tokens.shape == (6, 32 + 8)  # prompts bucketed to 32, 2 samples per prompt
    logits = forward(model.weights(), model.config, out.tokens, out.attention_mask)
    logp = np.asarray(token_logprobs(logits, out.tokens, temperature=1.0))
    real = np.asarray(out.response_mask)
    assert real.sum() == 6 * 8
    # Two float32 roundings of the same logits (2-layer decoder), then a log-softmax over V.
    atol = 2 * f32_atol(np.abs(np.asarray(logits)).max(), decoder_terms(2, WIDTH) + VOCAB)
    assert np.abs(np.where(real, logp - np.asarray(out.logprobs), 0.0)).max() < atol


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_merged_export_loads_in_transformers(tmp_path, tie):
    ref_model = hf_model(hf_config("qwen3", tie=tie, head_dim=HEAD_DIM))
    model, _ = load_pretrained(save(ref_model, tmp_path / "in"), lora_rank=4)
    _randomize_adapters(model)
    tokens, mask = padded_batch((0, 6), 24)
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    assert np.abs(ours - hf_logits(ref_model, tokens, mask)).max() > 1e-2  # adapters matter

    out = export_merged(model, tmp_path / "merged")
    hf_json = json.loads((out / "config.json").read_text())
    assert hf_json["model_type"] == "qwen3" and hf_json["architectures"] == ["Qwen3ForCausalLM"]
    assert hf_json["head_dim"] == HEAD_DIM and hf_json["tie_word_embeddings"] == tie
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert type(exported).__name__ == "Qwen3ForCausalLM"
    real = mask.astype(bool)
    assert np.abs(hf_logits(exported, tokens, mask) - ours)[real].max() < _atol(ours[real])
    again, _ = load_pretrained(out)  # and back into gxpo: the same weights
    reloaded = again(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert np.abs(np.asarray(reloaded) - ours)[real].max() < _atol(ours[real])


def test_peft_adapter_loads_onto_the_base(tmp_path, tied):
    _, path = tied
    model, _ = load_pretrained(path, lora_rank=3, lora_alpha=5.0)
    _randomize_adapters(model)
    out = export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    tokens, mask = padded_batch((0, 6), 24)
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(hf_logits(peft_model, tokens, mask) - ours)[real].max() < _atol(ours[real])


@pytest.mark.parametrize(
    "model_type, architecture",
    [("mistral", "MistralForCausalLM"), ("qwen3_moe", "Qwen3MoeForCausalLM")],
)
def test_unsupported_family_fails_with_one_clear_message(tmp_path, tied, model_type, architecture):
    _, path = tied
    shutil.copytree(path, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type=model_type, architectures=[architecture])
    config_file.write_text(json.dumps(config))
    message = (
        rf"{config_file}: model_type='{model_type}' \(architectures=\['{architecture}'\]\) is "
        r"not supported; supported model_type: \['llama', 'qwen2', 'qwen3'\]$"
    )
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path / "ckpt")


QWEN3_PRESETS = ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b")


@pytest.mark.parametrize("name", QWEN3_PRESETS)
def test_presets_are_what_transformers_builds(name):
    """Each preset's config.json is a Qwen3Config that transformers accepts and reads back to
    the preset, and Qwen3ForCausalLM built from it (on the meta device: no memory) has as many
    parameters as ours (the published counts are checked in test_transformer)."""
    preset = get_preset(name)
    hf = transformers.Qwen3Config(**config_to_hf(preset))
    assert config_from_hf(hf.to_dict()) == preset
    with torch.device("meta"):
        theirs = transformers.Qwen3ForCausalLM(hf)
    abstract = nnx.eval_shape(lambda: Transformer(preset, rngs=nnx.Rngs(0)))
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.weights()))
    assert ours == theirs.num_parameters()


def test_export_refuses_a_config_without_a_hugging_face_family():
    with pytest.raises(ValueError, match=r"qk_norm=True\) has no Hugging Face model_type"):
        config_to_hf(get_preset("tiny", qk_norm=True))  # arch "llama"
