"""LoRA adapters: the trainable/frozen split, and folding adapters into the base weights.

The adapters themselves are `nnx.LoRAParam`s `lora_a` [L, *in, R] and `lora_b` [L, R, *out]
inside each targeted `Projection` (ModelConfig.lora_rank / lora_alpha / lora_targets); each adds
scale * (x @ A) @ B with scale = alpha / rank. B starts at zero, so a fresh adapter leaves the
base model unchanged, and the base parameter paths are the same with or without LoRA.

Switching adapters off (the reference policy of the KL term) needs no second copy of the base:
`model(tokens, attention_mask=mask, use_lora=False)`, also inside a jitted function of the same
parameters (the flag is static). A training step uses the split below:

    graphdef, trainable, frozen = split_trainable(model)

    @jax.jit
    def loss_fn(trainable, frozen, batch):
        model = merge_trainable(graphdef, trainable, frozen)
        logits = model(batch.tokens, attention_mask=batch.mask)
        ref_logits = model(batch.tokens, attention_mask=batch.mask, use_lora=False)
        ...

    grads = jax.grad(loss_fn)(trainable, frozen, batch)   # grads only for the trainable part
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gxpo.models.config import PROJECTIONS, ModelConfig
from gxpo.models.transformer import Transformer


def split_trainable(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen): trainable is every LoRAParam when LoRA is on, else every
    Param (full fine-tuning; frozen is then empty)."""
    trainable = nnx.LoRAParam if model.config.lora_rank else nnx.Param
    return nnx.split(model, trainable, ...)


def merge_trainable(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State) -> Transformer:
    """The inverse of `split_trainable`."""
    return nnx.merge(graphdef, trainable, frozen)


def fold_lora(weights: dict, config: ModelConfig) -> dict:
    """Weights (as from `Transformer.weights()`) with every adapter folded into its kernel,
    kernel + scale * A @ B, and the adapter entries removed; in the kernels' dtype.

    For export, and for sampling many tokens from a fixed policy: the folded model computes the
    same function with no adapter matmuls per token."""
    layers = dict(weights["layers"])
    for name, (i, o) in PROJECTIONS.items():
        p = dict(layers[name])
        if "lora_a" in p:
            delta = jnp.einsum(f"L{i}R,LR{o}->L{i}{o}", p.pop("lora_a"), p.pop("lora_b"))
            kernel = p["kernel"]
            p["kernel"] = (kernel.astype(jnp.float32) + config.lora_scale * delta).astype(
                kernel.dtype
            )
        layers[name] = p
    return {**weights, "layers": layers}


def lora_weights(model: Transformer) -> dict[str, dict[str, jax.Array]]:
    """{target: {"lora_a": [L, *in, R], "lora_b": [L, R, *out]}} of the model's adapters."""
    layers = model.weights()["layers"]
    return {
        name: {"lora_a": layers[name]["lora_a"], "lora_b": layers[name]["lora_b"]}
        for name in PROJECTIONS
        if "lora_a" in layers[name]
    }
