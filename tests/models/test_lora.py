"""LoRA: a fresh adapter is the base model, adapters switch off without a second copy of the
base, the trainable/frozen split trains only the adapters, folding preserves the function."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hf_tiny import WIDTH, decoder_terms, f32_atol, hf_config, hf_model, padded_batch, save

from gxpo.models import (
    fold_lora,
    forward,
    get_preset,
    init_model,
    load_pretrained,
    merge_trainable,
    split_trainable,
)

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(hf_model(hf_config("qwen2", tie=False)), tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def batch():
    tokens, mask = padded_batch((0, 3, 7), 16)
    return jnp.asarray(tokens), jnp.asarray(mask)


def test_fresh_adapters_equal_the_base(checkpoint, batch):
    base, _ = load_pretrained(checkpoint)
    adapted, _ = load_pretrained(checkpoint, lora_rank=8, lora_targets=ALL_TARGETS)
    tokens, mask = batch
    assert jnp.abs(adapted.layers.down_proj.lora_a.value).max() > 0  # A random, B zero
    np.testing.assert_array_equal(
        adapted(tokens, attention_mask=mask), base(tokens, attention_mask=mask)
    )


def test_adapters_off_equal_the_base_after_a_training_step(checkpoint, batch):
    base, _ = load_pretrained(checkpoint)
    model, _ = load_pretrained(checkpoint, lora_rank=4, lora_alpha=16.0)
    tokens, mask = batch
    graphdef, trainable, frozen = split_trainable(model)
    assert {type(v) for v in jax.tree.leaves(trainable, is_leaf=_is_var)} == {nnx.LoRAParam}
    assert nnx.LoRAParam not in {type(v) for v in jax.tree.leaves(frozen, is_leaf=_is_var)}

    @jax.jit
    def loss_fn(trainable, frozen):
        logits = merge_trainable(graphdef, trainable, frozen)(tokens, attention_mask=mask)
        logp_BxTxV = jax.nn.log_softmax(logits[:, :-1])
        logp_BxT = jnp.take_along_axis(logp_BxTxV, tokens[:, 1:, None], -1)[..., 0]
        return -(logp_BxT * mask[:, 1:]).sum() / mask[:, 1:].sum()

    loss_before, grads = jax.value_and_grad(loss_fn)(trainable, frozen)
    optimizer = optax.sgd(0.01)
    updates, _ = optimizer.update(grads, optimizer.init(trainable))
    trainable = optax.apply_updates(trainable, updates)
    model = merge_trainable(graphdef, trainable, frozen)
    assert jnp.abs(model.layers.v_proj.lora_b.value).max() > 0

    @jax.jit
    def both(trainable, frozen):
        model = merge_trainable(graphdef, trainable, frozen)
        on = model(tokens, attention_mask=mask)
        return on, model(tokens, attention_mask=mask, use_lora=False)

    on, off = both(trainable, frozen)
    reference = base(tokens, attention_mask=mask)
    real = np.asarray(mask, bool)
    assert np.abs(np.asarray(on - reference))[real].max() > 1e-3
    # The same math compiled apart, in float32: the rounding allowance of a 2-layer decoder.
    atol = f32_atol(np.abs(np.asarray(reference)).max(), decoder_terms(2, WIDTH))
    np.testing.assert_allclose(off, reference, rtol=0, atol=atol)
    assert loss_fn(trainable, frozen) < loss_before


def _is_var(x):
    return isinstance(x, nnx.Variable)


def test_full_fine_tuning_split_trains_every_param():
    model = init_model(get_preset("tiny"), seed=0)
    graphdef, trainable, frozen = split_trainable(model)
    assert len(jax.tree.leaves(frozen)) == 0
    assert len(jax.tree.leaves(trainable)) == len(jax.tree.leaves(model.weights()))
    rebuilt = merge_trainable(graphdef, trainable, frozen)
    tokens, mask = padded_batch((0, 2), 6, seed=3)
    np.testing.assert_array_equal(rebuilt(jnp.asarray(tokens)), model(jnp.asarray(tokens)))


def test_folded_adapters_compute_the_same_function(checkpoint, batch):
    model, _ = load_pretrained(checkpoint, lora_rank=4, lora_targets=ALL_TARGETS)
    for name in ALL_TARGETS:
        b = getattr(model.layers, name).lora_b
        b.value = 0.2 * jax.random.normal(jax.random.key(len(name)), b.value.shape)
    tokens, mask = batch
    folded = fold_lora(model.weights(), model.config)
    assert all("lora_a" not in p for p in folded["layers"].values() if isinstance(p, dict))
    unfolded = np.asarray(model(tokens, attention_mask=mask))
    # Same math in another order, in float32: the rounding allowance of a 2-layer decoder.
    atol = f32_atol(np.abs(unfolded).max(), decoder_terms(2, WIDTH))
    np.testing.assert_allclose(
        forward(folded, model.config, tokens, mask, use_lora=False), unfolded, rtol=0, atol=atol
    )
