"""The policy's GRPO loss on a mini-batch of rollouts, and the per-batch log-probs it needs.

Shapes: the key in `gxpo.models.config`; here B rows of a mini-batch (whole prompt groups of G
rows), T = prompt + response tokens, A the response window (the last prompt token and the
response slots).

Weights are nested dicts of arrays (`Transformer.weights()` layout) split in two: `trainable`
(the LoRA adapters, or every parameter for full fine-tuning) and `frozen` (the rest). `frozen`
is an argument of every call, never a closure constant, so it is neither copied nor baked into
the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gxpo.models import packing
from gxpo.models.config import ModelConfig
from gxpo.models.transformer import forward, forward_packed
from gxpo.rl import grpo


class Batch(NamedTuple):
    """One mini-batch of rollouts.

    Per-token arrays cover the response window only, `tokens[:, T - A:]`: the last prompt
    token (never in the loss) and the A - 1 response slots. The window's width A is its shape,
    so it is static under jit, and the model computes logits only there.
    """

    tokens: jax.Array  # [B, T] int32: left-padded prompt, response, padding
    mask: jax.Array  # [B, T] bool: real tokens (prompt and response)
    response_mask: jax.Array  # [B, A] bool: tokens the loss sees
    advantages: jax.Array  # [B] float32
    old_logp: jax.Array  # [B, A] float32: rollout-policy log-probs of the window's tokens
    ref_logp: jax.Array  # [B, A] float32: reference log-probs (zeros when kl_coef == 0)
    # The responses packed into rows (`gxpo.models.packing.plan`), or None: the forward then
    # runs R * A positions instead of B * A.
    pack_src: jax.Array | None = None  # [R, A] int32
    pack_at: jax.Array | None = None  # [B, A] int32


# Each field's rank: its rows are split over the mesh (`mesh.row_shardings`), the rest is whole.
BATCH_RANKS = Batch(
    tokens=2, mask=2, response_mask=2, advantages=1, old_logp=2, ref_logp=2, pack_src=2, pack_at=2
)


def batch_ranks(packed: bool) -> Batch:
    """`BATCH_RANKS` of a batch with (`packed`) or without a packing plan."""
    return BATCH_RANKS if packed else BATCH_RANKS._replace(pack_src=None, pack_at=None)


def with_packing(batch: Batch) -> Batch:
    """`batch` with a packing plan of its rows (made on the host from its mask). Only for a
    batch whose rows are all on one device: the plan indexes across rows."""
    window = batch.response_mask.shape[1]
    src_RxA, at_BxA = packing.plan(np.asarray(batch.mask), window)
    return batch._replace(pack_src=jnp.asarray(src_RxA), pack_at=jnp.asarray(at_BxA))


def _window_stats(
    weights: dict,
    model_config: ModelConfig,
    tokens_BxT: jax.Array,
    mask_BxT: jax.Array,
    window: int,
    pack: tuple[jax.Array, jax.Array] | None,
    *,
    temperature: float,
    with_entropy: bool,
    use_lora: bool = True,
    group_size: int = 1,
) -> tuple[jax.Array, jax.Array | None]:
    """(log-prob, entropy) [B, A] of the window's tokens, each read from the logits of the
    token before it; 0 at the window's first slot. `pack`: (pack_src, pack_at), the responses
    packed into rows, or None."""
    start = tokens_BxT.shape[1] - window
    if pack is None:
        logits_BxAxV = forward(
            weights,
            model_config,
            tokens_BxT,
            mask_BxT,
            use_lora=use_lora,
            logits_start=start,
            shared_prefix_rows=group_size,
        )
        window_BxA = tokens_BxT[:, start:]
        if with_entropy:
            return grpo.token_logprobs_and_entropy(logits_BxAxV, window_BxA, temperature)
        return grpo.token_logprobs(logits_BxAxV, window_BxA, temperature), None
    src_RxA, at_BxA = pack
    logits_RxAxV, next_RxA = forward_packed(
        weights,
        model_config,
        tokens_BxT,
        mask_BxT,
        src_RxA,
        use_lora=use_lora,
        group_size=group_size,
    )
    logp_RxA, entropy_RxA = grpo.next_token_stats(logits_RxAxV, next_RxA, temperature, with_entropy)
    entropy_BxA = None if entropy_RxA is None else packing.unpack(entropy_RxA, at_BxA)
    return packing.unpack(logp_RxA, at_BxA), entropy_BxA


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The GRPO loss's settings (docs/algorithms.md, "GRPO loss"); static under jit."""

    temperature: float = 1.0
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 1e-3
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    max_len: int | None = None  # Dr.GRPO's constant normaliser (the rollout's max new tokens)
    old_logprobs: str = "rollout"  # "rollout" | "current"
    # G: rows come in groups of G responses to one prompt (the nonzero-advantage-groups metric;
    # the forward pass runs each group's prompt once)
    group_size: int | None = None
    entropy_coef: float = 0.0  # the entropy bonus's weight
    importance_level: str = "token"  # "token" | "sequence" (GSPO)


def merge_weights(trainable: dict, frozen: dict) -> dict:
    """One nested dict from two with disjoint leaves (the inverse of the trainable split)."""
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = merge_weights(value, out.get(key, {})) if isinstance(value, dict) else value
    return out


def policy_loss(
    trainable: dict,
    *,
    batch: Batch,
    frozen: dict,
    model_config: ModelConfig,
    loss_config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss of the policy `trainable + frozen` on `batch`, and its metrics."""
    pack = None if batch.pack_src is None else (batch.pack_src, batch.pack_at)
    logp_BxA, entropy_BxA = _window_stats(
        merge_weights(trainable, frozen),
        model_config,
        batch.tokens,
        batch.mask,
        batch.response_mask.shape[1],
        pack,
        temperature=loss_config.temperature,
        with_entropy=True,
        group_size=loss_config.group_size or 1,
    )
    c = loss_config
    return grpo.grpo_loss(
        logp_BxA,
        batch.old_logp if c.old_logprobs == "rollout" else None,
        batch.ref_logp if c.kl_coef > 0 else None,
        batch.advantages,
        batch.response_mask,
        clip_eps_low=c.clip_eps_low,
        clip_eps_high=c.clip_eps_high,
        kl_coef=c.kl_coef,
        kl_estimator=c.kl_estimator,
        aggregation=c.aggregation,
        max_len=c.max_len,
        entropy_BxT=entropy_BxA,
        group_size=c.group_size,
        entropy_coef=c.entropy_coef,
        importance_level=c.importance_level,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_config",
        "temperature",
        "window",
        "with_old",
        "reference",
        "group_size",
    ),
)
def batch_logprobs(
    trainable: dict,
    frozen: dict,
    reference_weights: dict | None,
    tokens_BxT: jax.Array,
    mask_BxT: jax.Array,
    pack: tuple[jax.Array, jax.Array] | None = None,
    *,
    model_config: ModelConfig,
    temperature: float,
    window: int,
    with_old: bool,
    reference: str,
    group_size: int = 1,
) -> tuple[jax.Array | None, jax.Array | None]:
    """(old_logp, ref_logp) [B, A] of the last A = `window` tokens (`Batch`'s response
    window), once per rollout batch; None where not asked for.

    `with_old`: the policy's own log-probs (the rollout point). `reference`: "adapters_off"
    (LoRA: the base model from the same weights), "weights" (full fine-tuning:
    `reference_weights`, a copy of the initial params), or "none". `group_size`: rows come in
    groups of that many responses to one prompt, whose prompt then runs once. `pack`:
    (pack_src, pack_at) of `Batch`, the responses packed into rows, or None.
    """
    weights = merge_weights(trainable, frozen)

    def logp(w, use_lora=True):
        return _window_stats(
            w,
            model_config,
            tokens_BxT,
            mask_BxT,
            window,
            pack,
            temperature=temperature,
            with_entropy=False,
            use_lora=use_lora,
            group_size=group_size,
        )[0]

    old = logp(weights) if with_old else None
    if reference == "adapters_off":
        return old, logp(weights, use_lora=False)
    if reference == "weights":
        return old, logp(reference_weights)
    return old, None
