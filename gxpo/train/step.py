"""The jitted update step and the per-batch log-probs, as pure functions of weight dicts.

Shape key: B responses in a mini-batch (whole prompt groups), T = prompt + response tokens.

Weights are nested dicts of arrays (`Transformer.weights()` layout) split in two: `trainable`
(the LoRA adapters, or every parameter for full fine-tuning) and `frozen` (the rest). Only
`trainable` and the optimizer state are donated and updated; `frozen` is an argument of every
call, never a closure constant, so it is neither copied nor baked into the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gxpo.models.config import ModelConfig
from gxpo.models.transformer import forward
from gxpo.optim import ZScoreGate, gxpo, sfpo
from gxpo.rl import grpo

POLICY_UPDATES = ("grpo", "sfpo", "gxpo")


class Batch(NamedTuple):
    """One mini-batch of rollouts.

    Per-token arrays cover the response window only, `tokens[:, T - W:]`: the last prompt
    token (never in the loss) and the W - 1 response slots. The window's width W is its shape,
    so it is static under jit, and the model computes logits only there.
    """

    tokens: jax.Array  # [B, T] int32: left-padded prompt, response, padding
    mask: jax.Array  # [B, T] bool: real tokens (prompt and response)
    response_mask: jax.Array  # [B, W] bool: tokens the loss sees
    advantages: jax.Array  # [B] float32
    old_logp: jax.Array  # [B, W] float32: rollout-policy log-probs of the window's tokens
    ref_logp: jax.Array  # [B, W] float32: reference log-probs (zeros when kl_coef == 0)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The GRPO loss's settings (GXPO.md, "GRPO loss and advantages"); static under jit."""

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
    weights = merge_weights(trainable, frozen)
    start = batch.tokens.shape[1] - batch.response_mask.shape[1]
    logits_BxWxV = forward(
        weights,
        model_config,
        batch.tokens,
        batch.mask,
        logits_start=start,
        shared_prefix_rows=loss_config.group_size or 1,
    )
    logp_BxW, entropy_BxW = grpo.token_logprobs_and_entropy(
        logits_BxWxV, batch.tokens[:, start:], loss_config.temperature
    )
    c = loss_config
    return grpo.grpo_loss(
        logp_BxW,
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
        entropy_BxT=entropy_BxW,
        group_size=c.group_size,
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
    *,
    model_config: ModelConfig,
    temperature: float,
    window: int,
    with_old: bool,
    reference: str,
    group_size: int = 1,
) -> tuple[jax.Array | None, jax.Array | None]:
    """(old_logp, ref_logp) [B, window] of the last `window` tokens (`Batch`'s response
    window), once per rollout batch; None where not asked for.

    `with_old`: the policy's own log-probs (the rollout point). `reference`: "adapters_off"
    (LoRA: the base model from the same weights), "weights" (full fine-tuning:
    `reference_weights`, a copy of the initial params), or "none". `group_size`: rows come in
    groups of that many responses to one prompt, whose prompt then runs once.
    """
    weights = merge_weights(trainable, frozen)

    start = tokens_BxT.shape[1] - window

    def logp(w, use_lora=True):
        logits = forward(
            w,
            model_config,
            tokens_BxT,
            mask_BxT,
            use_lora=use_lora,
            logits_start=start,
            shared_prefix_rows=group_size,
        )
        return grpo.token_logprobs(logits, tokens_BxT[:, start:], temperature)

    old = logp(weights) if with_old else None
    if reference == "adapters_off":
        return old, logp(weights, use_lora=False)
    if reference == "weights":
        return old, logp(reference_weights)
    return old, None


def make_inner_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW behind an optional global-norm clip. The clip sits inside the inner optimizer, so
    GXPO/SFPO clip every gradient they evaluate, not only the caller's g0."""
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    return adamw


def make_policy_update(
    name: str,
    inner: optax.GradientTransformation,
    loss_fn: Callable[..., Any],
    *,
    gxpo_kwargs: dict | None = None,
    sfpo_kwargs: dict | None = None,
    gate: ZScoreGate | None = None,
) -> optax.GradientTransformationExtraArgs:
    """`inner` itself (GRPO), or `sfpo` / `gxpo` around it, evaluating `loss_fn` at probes."""
    if name == "grpo":
        return optax.with_extra_args_support(inner)
    if name == "sfpo":
        return sfpo(inner, loss_fn, gate=gate, has_aux=True, **(sfpo_kwargs or {}))
    if name == "gxpo":
        return gxpo(inner, loss_fn, gate=gate, has_aux=True, **(gxpo_kwargs or {}))
    raise ValueError(f"policy_update.name={name!r}: allowed values are {POLICY_UPDATES}")


def _micro_batches(batch: Batch, count: int, group_size: int) -> Batch:
    """[count, B / count, ...] micro-batches of whole prompt groups, prompt q going to micro-batch
    q % count: rows of every device (rows are split over devices in contiguous blocks) land in
    every micro-batch, so each one keeps all devices busy."""

    def split(x):
        x = x.reshape(-1, count, group_size, *x.shape[1:])  # [Q / count, count, G, ...]
        return jnp.swapaxes(x, 0, 1).reshape(count, -1, *x.shape[3:])

    return jax.tree.map(split, batch)


def _micro_weight(batch: Batch, aggregation: str) -> jax.Array:
    """How much a micro-batch's loss counts in the mini-batch's: its share of the aggregation's
    denominator (response tokens, or non-empty responses), so that the weighted sum of
    micro-batch losses is exactly the loss of the whole mini-batch."""
    if aggregation == "token-mean":
        return jnp.sum(batch.response_mask).astype(jnp.float32)
    if aggregation == "seq-mean-token-mean":
        return jnp.sum(jnp.any(batch.response_mask, axis=1)).astype(jnp.float32)
    return jnp.ones((), jnp.float32)  # seq-mean-token-sum-norm: a sum over the batch's rows


def accumulated_value_and_grad(
    loss_fn: Callable[..., Any],
    params: dict,
    batch: Batch,
    frozen: dict,
    *,
    micro_batches: int,
    group_size: int,
    aggregation: str,
) -> tuple[dict, dict]:
    """(metrics, grads) of `loss_fn` over `batch`, one micro-batch at a time under `lax.scan`
    (activations of one micro-batch alive at once); equal to the whole batch's up to float
    rounding. Metrics are the same weighted averages."""
    micro = _micro_batches(batch, micro_batches, group_size)
    weights = jax.vmap(functools.partial(_micro_weight, aggregation=aggregation))(micro)
    if aggregation != "seq-mean-token-sum-norm":
        weights = weights / jnp.maximum(jnp.sum(weights), 1.0)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)

    def body(acc, xs):
        mb, w = xs
        (_, metrics), grads = value_and_grad(params, batch=mb, frozen=frozen)
        return jax.tree.map(lambda a, b: a + w * b, acc, (metrics, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: value_and_grad(params, batch=first, frozen=frozen))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][1], shapes[1]))
    (metrics, grads), _ = jax.lax.scan(body, zeros, (micro, weights))
    return metrics, grads


def make_update_step(
    tx: optax.GradientTransformationExtraArgs,
    loss_fn: Callable[..., Any],
    *,
    info_prefix: str = "policy",
    micro_batches: int = 1,
    group_size: int = 1,
    aggregation: str = "token-mean",
    **jit_kwargs,
) -> Callable[..., tuple[dict, Any, dict]]:
    """`update(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)`, jitted,
    donating `trainable` and `opt_state`.

    g0 = grad(loss_fn) at `trainable` (the one backward pass GRPO has), then
    `tx.update(g0, ...)` which, for GXPO / SFPO, evaluates `loss_fn` at its probe points with
    the same batch. Their `state.info` diagnostics come back as `<info_prefix>/<field>`.
    With `micro_batches > 1` every gradient, g0 and the probes', is accumulated over that many
    micro-batches of whole groups of `group_size` rows (gradient accumulation: the memory of
    one micro-batch, the update of the whole batch); the combinators get it as `grad_fn=`.
    `jit_kwargs` (e.g. in/out shardings) go to `jax.jit`.
    """

    def update(trainable, opt_state, frozen, batch):
        if micro_batches == 1:
            (_, metrics), g0 = jax.value_and_grad(loss_fn, has_aux=True)(
                trainable, batch=batch, frozen=frozen
            )
            extra = {}
        else:
            accumulate = functools.partial(
                accumulated_value_and_grad,
                loss_fn,
                batch=batch,
                frozen=frozen,
                micro_batches=micro_batches,
                group_size=group_size,
                aggregation=aggregation,
            )
            metrics, g0 = accumulate(trainable)
            extra = {"grad_fn": lambda p: accumulate(p)[1]}
        updates, opt_state = tx.update(
            g0, opt_state, trainable, batch=batch, frozen=frozen, **extra
        )
        trainable = optax.apply_updates(trainable, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(g0))
        info = getattr(opt_state, "info", None)
        if info is not None:
            metrics.update({f"{info_prefix}/{k}": v for k, v in info._asdict().items()})
            metrics["grad_evals"] = info.grad_evals
        else:
            metrics["grad_evals"] = jnp.ones((), jnp.int32)
        return trainable, opt_state, metrics

    return jax.jit(update, donate_argnums=(0, 1), **jit_kwargs)
