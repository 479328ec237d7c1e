"""The decoder against Hugging Face transformers, the KV cache against the full forward pass,
presets against the real models' parameter counts, and the sharding metadata."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tiny import (
    LLAMA3_ROPE,
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
    LOGICAL_AXES,
    PRESETS,
    Transformer,
    decode,
    forward,
    get_preset,
    init_model,
    load_pretrained,
    prefill,
)

LEFT_PADS, RIGHT_PADS = (0, 5, 17), (9,)
LENGTH = 40


@pytest.mark.parametrize(
    "arch, tie, rope_scaling, extra",
    [
        ("llama", True, None, {}),
        ("llama", False, LLAMA3_ROPE, {"head_dim": 24}),  # head_dim != hidden / heads
        ("qwen2", True, None, {}),
        ("qwen2", False, None, {"num_key_value_heads": 1}),
    ],
    ids=["llama-tied", "llama3-rope-untied", "qwen2-tied", "qwen2-untied-mqa"],
)
def test_logits_match_transformers(tmp_path, arch, tie, rope_scaling, extra):
    ref_model = hf_model(hf_config(arch, tie=tie, rope_scaling=rope_scaling, **extra))
    model, tokenizer = load_pretrained(save(ref_model, tmp_path))
    assert tokenizer is None  # no tokenizer files in a random checkpoint
    assert model.config.tie_embeddings == tie and model.config.qkv_bias == (arch == "qwen2")
    assert (model.config.rope_scaling is not None) == (rope_scaling is not None)
    tokens, mask = padded_batch(LEFT_PADS, LENGTH, right=RIGHT_PADS)
    ref = hf_logits(ref_model, tokens, mask)
    logits = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.float32 and logits.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small
    # Parity with torch in float32: the rounding allowance of a 2-layer decoder (hf_tiny).
    atol = f32_atol(np.abs(ref).max(), decoder_terms(2, WIDTH))
    assert max_diff_on_real(logits, ref, mask) < atol


def test_sharded_checkpoint_and_legacy_rope_config(tmp_path):
    """Shards listed in model.safetensors.index.json, and a config.json written by hand in the
    layout published Llama 3.2 checkpoints use (top-level rope_theta + rope_scaling)."""
    ref_model = hf_model(hf_config("llama", tie=True, rope_scaling=LLAMA3_ROPE))
    path = tmp_path / "ckpt"
    save(ref_model, path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(config))
    model, _ = load_pretrained(path)
    assert model.config.rope_scaling.factor == LLAMA3_ROPE["factor"]
    tokens, mask = padded_batch(LEFT_PADS, LENGTH)
    logits = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    ref = hf_logits(ref_model, tokens, mask)
    # Parity with torch in float32: the rounding allowance of a 2-layer decoder (hf_tiny).
    atol = f32_atol(np.abs(ref).max(), decoder_terms(2, WIDTH))
    assert max_diff_on_real(logits, ref, mask) < atol


def test_cached_decode_matches_full_forward(tmp_path):
    """Prefill prompts of different lengths (left and right padded), then decode a different
    continuation per row, two rows per prompt, through the decoding loop's cache (each prompt's
    keys and values held once for its rows, every layer's buffers donated at every step, stepped
    eagerly): each step's logits equal the full forward pass over prompt + continuation, with
    nonzero LoRA adapters on. From a prompt cache with empty slots after the prompt, and from one
    of the prompt's size."""
    ref_model = hf_model(hf_config("qwen2", tie=True))
    model, _ = load_pretrained(save(ref_model, tmp_path), lora_rank=4)
    b = model.layers.q_proj.lora_b
    b.value = 0.3 * jax.random.normal(jax.random.key(1), b.value.shape)
    weights, config = model.weights(), model.config
    prompt_len, steps, repeats = 9, 6, 2
    prompts, prompt_mask = padded_batch((0, 3, 8), prompt_len, right=(4,))
    rows = np.repeat(np.arange(len(prompts)), repeats)
    rng = np.random.RandomState(1)
    continuation = rng.randint(0, 96, (len(rows), steps)).astype(np.int32)
    tokens = np.concatenate([prompts[rows], continuation], axis=1)
    mask = np.concatenate([prompt_mask[rows], np.ones_like(continuation)], axis=1)
    full = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    # Same math in another order, in float32 (the model's only full-precision dtype): the
    # rounding allowance of a 2-layer decoder (hf_tiny).
    atol = f32_atol(np.abs(full).max(), decoder_terms(2, WIDTH))

    last_real = prompt_len - 1 - np.argmax(prompt_mask[:, ::-1], axis=1)
    for cache_size in (16, prompt_len):
        logits, cache = prefill(
            weights, config, jnp.asarray(prompts), jnp.asarray(prompt_mask), cache_size
        )
        assert cache.k.shape == (2, 4, cache_size, 2, 16) and not cache.mask[:, prompt_len:].any()
        np.testing.assert_allclose(logits, full[::repeats][np.arange(4), last_real], atol=atol)
        cache = cache.for_decoding(copies=repeats, slots=steps)
        for step in range(steps):
            logits, cache = decode(weights, config, jnp.asarray(continuation[:, step]), cache)
            np.testing.assert_allclose(logits, full[:, prompt_len + step], atol=atol)
        assert int(cache.index) == steps
        np.testing.assert_array_equal(cache.positions, mask.sum(axis=1))


def test_shared_prefix_decode_matches_full_forward():
    """A prefix prefilled once (one row) and prompts continuing it, decoded through a
    `DecodeCache` holding the prefix once, carrying its rotary tables and grown mid-way:
    each step's logits equal the full forward pass over prefix + prompt + continuation."""
    model = init_model(get_preset("tiny", lora_rank=2), seed=0)
    b = model.layers.v_proj.lora_b
    b.value = 0.3 * jax.random.normal(jax.random.key(1), b.value.shape)
    weights, config = model.weights(), model.config
    rng = np.random.RandomState(2)
    prefix = rng.randint(1, 512, (1, 6)).astype(np.int32)
    rest, rest_mask = padded_batch((0, 3, 4), 5, seed=3)  # rests of 5, 2 and 1 tokens
    copies, steps = 2, 5
    rows = np.repeat(np.arange(3), copies)
    continuation = rng.randint(0, 512, (len(rows), steps)).astype(np.int32)
    # The full sequences, left-padded: padding, prefix, rest, continuation.
    lengths = 6 + rest_mask.sum(axis=1)
    width = 6 + 5 + steps
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(tokens)
    for i, r in enumerate(rows):
        real = np.concatenate([prefix[0], rest[r][rest_mask[r] == 1], continuation[i]])
        tokens[i, width - len(real) :], mask[i, width - len(real) :] = real, 1
    full = np.asarray(forward(weights, config, jnp.asarray(tokens), jnp.asarray(mask)))
    # Same math in another order, in float32 (the model's only full-precision dtype): the
    # rounding allowance of the tiny preset (2 layers, ffn_dim 128).
    atol = f32_atol(np.abs(full).max(), decoder_terms(2, 128))

    _, shared = prefill(weights, config, jnp.asarray(prefix), jnp.ones((1, 6), bool), 6)
    logits, cache = prefill(
        weights, config, jnp.asarray(rest), jnp.asarray(rest_mask), 5, prefix=shared
    )
    np.testing.assert_array_equal(cache.positions, lengths)
    np.testing.assert_allclose(logits, full[::copies, width - steps - 1], atol=atol)
    cache = cache.for_decoding(copies=copies, slots=2, shared=shared).with_rope(config)
    for step in range(steps):
        if step == 2:
            cache = cache.grow(steps)
        logits, cache = decode(weights, config, jnp.asarray(continuation[:, step]), cache)
        np.testing.assert_allclose(logits, full[:, width - steps + step], atol=atol)
    assert cache.k[0].shape[-1] == steps


def test_bfloat16_compute_runs_and_stays_close(tmp_path):
    ref_model = hf_model(hf_config("llama", tie=True))
    path = save(ref_model, tmp_path)
    tokens, mask = padded_batch(LEFT_PADS, LENGTH)
    f32, _ = load_pretrained(path)
    bf16, _ = load_pretrained(path, dtype="bfloat16")
    assert bf16.embed.value.dtype == jnp.bfloat16
    ref = np.asarray(f32(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    logits = bf16(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert logits.dtype == jnp.float32
    real = mask.astype(bool)
    err = np.abs(np.asarray(logits) - ref)[real]
    assert np.isfinite(err).all()
    assert err.mean() < 0.05 * np.abs(ref[real]).mean()
    # Same argmax almost everywhere: bf16 noise, not a different model.
    agree = (np.asarray(logits).argmax(-1) == ref.argmax(-1))[real].mean()
    assert agree > 0.9


def test_remat_gives_the_same_gradients():
    config = get_preset("tiny", num_layers=3)
    model = init_model(config, seed=0)
    tokens, mask = padded_batch((0, 4), 12)

    def loss(weights, config):
        return forward(weights, config, jnp.asarray(tokens), jnp.asarray(mask)).std()

    weights = model.weights()
    plain = jax.grad(loss)(weights, config)
    remat = jax.grad(loss)(weights, get_preset("tiny", num_layers=3, remat=True))
    # The same ops recomputed, in float32: per leaf, the rounding allowance of the forward and
    # backward through 3 layers (ffn_dim 128) and of the sums over the 2 x 12 x 512 logits.
    terms = 2 * decoder_terms(3, 128) + tokens.size * 512
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=f32_atol(np.abs(a).max(), terms))


# Published parameter counts of the real checkpoints (HF model cards / safetensors metadata).
REAL_PARAMETER_COUNTS = {
    "smollm2-135m": 134_515_008,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    # Tied, counted once (transformers' num_parameters; the card's 1.4B without embeddings):
    # its safetensors also store an unused lm_head copy, 2_031_739_904 with it.
    "qwen3-1.7b": 1_720_574_976,
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
}


@pytest.mark.parametrize("name", sorted(REAL_PARAMETER_COUNTS))
def test_presets_have_the_real_dimensions(name):
    model = nnx.eval_shape(lambda: Transformer(get_preset(name), rngs=nnx.Rngs(0)))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(model.weights()))
    assert count == REAL_PARAMETER_COUNTS[name]


def test_every_parameter_has_logical_axes():
    config = get_preset("tiny", qkv_bias=True, tie_embeddings=False, lora_rank=4,
                        lora_targets=("q_proj", "o_proj", "down_proj"))  # fmt: skip
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    names = set(LOGICAL_AXES.values())
    specs = nnx.get_partition_spec(state)
    for (path, var), (_, spec) in zip(nnx.to_flat_state(state), nnx.to_flat_state(specs)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.value.ndim and set(axes) <= names, path
        assert tuple(spec.value) == axes, path
        assert (axes[0] == "layers") == (path[0] == "layers"), path
    lora_b = model.layers.o_proj.lora_b.get_metadata()["out_sharding"]
    assert lora_b == ("layers", "lora_rank", "embed")


def test_preset_errors():
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt2'.*smollm2-135m"):
        get_preset("gpt2")
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['layers'\]"):
        get_preset("tiny", layers=3)
    with pytest.raises(ValueError, match=r"dtype='float16'"):
        get_preset("tiny", dtype="float16")
    with pytest.raises(ValueError, match=r"lora_targets has unknown modules \['qkv'\]"):
        get_preset("tiny", lora_rank=2, lora_targets=("qkv",))
    with pytest.raises(ValueError, match="num_kv_heads"):
        get_preset("tiny", num_kv_heads=3)
    assert set(PRESETS) >= set(REAL_PARAMETER_COUNTS) | {"tiny"}


@pytest.mark.parametrize("remat", [False, True])
def test_shared_prefix_rows_equal_the_plain_forward(remat):
    """Rows in groups with one prompt each: running the prompt once per group gives the same
    logits and the same LoRA gradients as running every row whole."""
    config = get_preset("tiny", lora_rank=4, qkv_bias=True, remat=remat)
    weights = init_model(config, seed=0).weights()
    lora_b = lambda w: jax.random.normal(jax.random.key(1), w.shape, w.dtype) * 0.1
    weights = jax.tree_util.tree_map_with_path(
        lambda path, w: lora_b(w) if "lora_b" in jax.tree_util.keystr(path) else w, weights
    )
    Q, C, S, U = 3, 4, 10, 7  # groups, rows per group, prompt columns, response columns
    rng = np.random.default_rng(0)
    prompt_mask = np.arange(S)[None] >= np.array([[0], [3], [7]])  # left padding per prompt
    lengths = rng.integers(1, U + 1, size=Q * C)  # responses right-padded per row
    tokens = np.concatenate(
        [
            np.repeat(rng.integers(1, 500, (Q, S)), C, axis=0),
            rng.integers(1, 500, (Q * C, U)),
        ],
        axis=1,
    )
    mask = np.concatenate(
        [np.repeat(prompt_mask, C, axis=0), np.arange(U)[None] < lengths[:, None]], axis=1
    )
    tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)

    def loss(trainable, rows):
        merged = {**weights, "layers": {**weights["layers"], **trainable}}
        logits = forward(merged, config, tokens, mask, logits_start=S, shared_prefix_rows=rows)
        real = mask[:, S:, None]
        return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0.0)) / 1e4, logits

    trainable = {k: v for k, v in weights["layers"].items() if k == "q_proj" or k == "v_proj"}
    (plain, plain_logits), plain_grads = jax.value_and_grad(loss, has_aux=True)(trainable, 1)
    (grouped, grouped_logits), grouped_grads = jax.value_and_grad(loss, has_aux=True)(trainable, C)
    real = np.asarray(mask[:, S:])
    magnitude = np.abs(np.asarray(plain_logits)[real]).max()
    assert magnitude > 0.1
    # Same math in another order, in float32 (the model's only full-precision dtype): the
    # rounding allowance of the tiny preset (2 layers, ffn_dim 128) for the logits; plus the
    # loss's sum over the response logits; for gradients, forward and backward plus the sum
    # over all positions.
    terms = decoder_terms(2, 128)
    np.testing.assert_allclose(
        np.asarray(grouped_logits)[real],
        np.asarray(plain_logits)[real],
        rtol=0,
        atol=f32_atol(magnitude, terms),
    )
    loss_atol = f32_atol(abs(plain), terms + real.size * config.vocab_size)
    np.testing.assert_allclose(grouped, plain, rtol=0, atol=loss_atol)
    grad_terms = 2 * terms + tokens.size
    for a, b in zip(jax.tree.leaves(grouped_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=f32_atol(np.abs(b).max(), grad_terms))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain_grads)) > 1e-4
    with pytest.raises(ValueError, match="shared_prefix_rows=5 must divide the 12 rows"):
        forward(weights, config, tokens, mask, logits_start=S, shared_prefix_rows=5)
