"""Group advantages, token log-probs and the GRPO loss: small pure functions of arrays.

Formulas as in docs/algorithms.md ("GRPO loss and advantages"); where verl (volcengine/verl,
``verl/trainer/ppo/core_algos.py``) fixes a detail the paper leaves open, we match verl and say so.

Shapes: the key in ``gxpo.models.config``. The B = Q * G responses of a batch hold a prompt's
G responses in consecutive rows q*G .. q*G+G-1; a chunked pass walks the T positions in Y chunks
of C.

Dtypes: float32 arithmetic for float32, bf16 and integer inputs; float64 inputs (only under
``jax_enable_x64``) stay float64, so that tests can check the math to float64 precision.

Token alignment: every ``*_BxT`` per-token array is aligned with ``tokens_BxT``: entry ``[b, t]``
belongs to token ``tokens[b, t]`` (its log-prob, its mask bit), and is computed from
``logits[b, t - 1]``, the logits that predicted it. Position 0 has no prediction and holds 0;
it is always a prompt token, so the response mask is 0 there anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCALES = ("std", "none")
STDS = ("unbiased", "population")
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k3", "k1")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# verl clamps log(pi/pi_old) and log(pi_ref/pi) to [-20, 20] before exp() so that one badly
# off-policy token cannot overflow the loss; the k3 value itself is clamped to [-10, 10].
_LOG_RATIO_CLAMP = 20.0
_KL_CLAMP = 10.0


def _float(x: jax.Array) -> jax.Array:
    """``x`` as float32, or as float64 when it is float64."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(allowed)}.")


def _check_groups(batch: int, group_size: int) -> None:
    if group_size < 2:
        raise ValueError(
            f"group_size={group_size}: GRPO needs at least 2 responses per prompt "
            "(set the rollout's responses per prompt G >= 2)."
        )
    if batch % group_size:
        raise ValueError(
            f"batch of {batch} responses is not a whole number of groups of {group_size}; "
            "keep each prompt's responses together (batch = prompts x group_size)."
        )


def group_advantages(
    rewards_B: jax.Array,
    group_size: int,
    scale: str = "std",
    eps: float = 1e-6,
    std: str = "unbiased",
) -> jax.Array:
    """GRPO advantages ``(R - mean_g R) / (std_g R + eps)``, or ``R - mean_g R`` (Dr.GRPO).

    Args:
      rewards_B: one scalar reward per response, groups of ``group_size`` consecutive rows.
      group_size: G, responses per prompt (>= 2).
      scale: ``"std"`` divides by the group's std (GRPO); ``"none"`` does not (Dr.GRPO).
      eps: added to the std, so an (almost) constant group does not blow up.
      std: ``"unbiased"`` (Bessel, ddof = 1: verl's ``torch.std`` and the GXPO authors') or
        ``"population"`` (ddof = 0: a smaller std, so for G = 5 advantages sqrt(5/4) ~
        1.12x larger).

    Returns:
      ``advantages_B`` in float32 (float64 for float64 rewards); exactly 0 for every response
      of a group whose rewards are all equal.
    """
    _check_choice("scale", scale, SCALES)
    _check_choice("std", std, STDS)
    rewards_B = _float(rewards_B)
    _check_groups(rewards_B.shape[0], group_size)
    r_QxG = rewards_B.reshape(-1, group_size)
    centered_QxG = r_QxG - r_QxG.mean(axis=1, keepdims=True)
    # The float mean of G equal values can miss them by an ulp; a constant group carries no
    # learning signal, so make its advantage exactly 0 instead of +-1 ulp / eps.
    constant_Qx1 = r_QxG.max(axis=1, keepdims=True) == r_QxG.min(axis=1, keepdims=True)
    centered_QxG = jnp.where(constant_Qx1, 0.0, centered_QxG)
    if scale == "std":
        # The unbiased default keeps advantage magnitudes (hence effective step sizes)
        # comparable with verl runs, whose compute_grpo_outcome_advantage uses torch.std.
        ddof = 1 if std == "unbiased" else 0
        std_Qx1 = jnp.std(r_QxG, axis=1, ddof=ddof, keepdims=True)
        centered_QxG = centered_QxG / (std_Qx1 + eps)
    return centered_QxG.reshape(-1)


def overlong_penalty(
    lengths_B: jax.Array, max_new_tokens: int, buffer: int, penalty: float = 1.0
) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a reward to add, in [-penalty, 0].

    0 for responses of at most ``max_new_tokens - buffer`` tokens, then falling linearly to
    ``-penalty`` at ``max_new_tokens`` (the longest a response can be here):
    ``penalty * (max_new_tokens - buffer - length) / buffer``. ``buffer = 0``: no penalty.
    """
    if buffer < 0 or buffer > max_new_tokens or penalty < 0:
        raise ValueError(
            f"overlong buffer={buffer} must be in [0, max_new_tokens={max_new_tokens}] and "
            f"penalty={penalty} >= 0 (config.reward.overlong_buffer / overlong_penalty)."
        )
    lengths_B = _float(lengths_B)
    if buffer == 0:
        return jnp.zeros_like(lengths_B)
    over_B = jnp.maximum(lengths_B - (max_new_tokens - buffer), 0.0)
    return -penalty * jnp.minimum(over_B / buffer, 1.0)


def nonzero_group_fraction(advantages_B: jax.Array, group_size: int) -> jax.Array:
    """Fraction of prompts whose group has any nonzero advantage (the rest teach nothing)."""
    _check_groups(advantages_B.shape[0], group_size)
    nonzero_Q = jnp.any(advantages_B.reshape(-1, group_size) != 0, axis=1)
    return nonzero_Q.mean(dtype=jnp.float32)


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(
            f"temperature={temperature} must be > 0 (greedy decoding has no log-probs)."
        )


def next_token_stats(
    logits_BxTxV: jax.Array, next_BxT: jax.Array, temperature: float, with_entropy: bool
) -> tuple[jax.Array, jax.Array | None]:
    """Per position: the log-prob of `next_BxT` under softmax(logits / temperature) and, if
    asked, that distribution's entropy ([B, T] float32 each; no shift: position t's logits
    score `next_BxT[:, t]`)."""
    # logsumexp is spelled out so that the entropy reuses its exponentials (half the exp work of
    # a separate softmax): H = lse - sum_v e_v x_v / sum_v e_v with e = exp(x - max x).
    # XLA:CPU keeps x as one float32 [B, T, V] temporary (x and e with entropy); chunk_size
    # bounds them to [B, C, V].
    x_BxTxV = _float(logits_BxTxV) / temperature
    max_BxTx1 = jax.lax.stop_gradient(jnp.max(x_BxTxV, axis=-1, keepdims=True))
    e_BxTxV = jnp.exp(x_BxTxV - max_BxTx1)
    sum_e_BxT = jnp.sum(e_BxTxV, axis=-1)
    lse_BxT = max_BxTx1[..., 0] + jnp.log(sum_e_BxT)
    picked_BxT = jnp.take_along_axis(x_BxTxV, next_BxT[..., None], axis=-1)[..., 0]
    entropy_BxT = None
    if with_entropy:
        entropy_BxT = lse_BxT - jnp.sum(e_BxTxV * x_BxTxV, axis=-1) / sum_e_BxT
    return picked_BxT - lse_BxT, entropy_BxT


def _chunked_next_token_stats(
    logits_BxTxV: jax.Array,
    next_BxT: jax.Array,
    temperature: float,
    with_entropy: bool,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array | None]:
    batch, positions, _ = logits_BxTxV.shape
    num_chunks = -(-positions // chunk_size)
    # The last chunk starts at T - chunk_size and overlaps its neighbour (dynamic_slice clamps
    # the start): no padded copy of the logits; overlapping positions are computed twice.
    starts_Y = jnp.minimum(jnp.arange(num_chunks) * chunk_size, positions - chunk_size)

    # jax.checkpoint keeps only the chunk start as a residual: the backward pass recomputes the
    # chunk's softmax instead of storing all Y of them (the full [B, T, V] again).
    @jax.checkpoint
    def one_chunk(start):
        logits_BxCxV = jax.lax.dynamic_slice_in_dim(logits_BxTxV, start, chunk_size, axis=1)
        next_BxC = jax.lax.dynamic_slice_in_dim(next_BxT, start, chunk_size, axis=1)
        logp_BxC, ent_BxC = next_token_stats(logits_BxCxV, next_BxC, temperature, with_entropy)
        return logp_BxC, (ent_BxC if with_entropy else jnp.zeros_like(logp_BxC))

    logp_YxBxC, ent_YxBxC = jax.lax.map(one_chunk, starts_Y)

    def unchunk(a_YxBxC):  # back to [B, T], keeping the last chunk's new positions only
        first = a_YxBxC[:-1].transpose(1, 0, 2).reshape(batch, -1)  # [B, (Y - 1) * C]
        return jnp.concatenate([first, a_YxBxC[-1, :, first.shape[1] - positions :]], axis=1)

    return unchunk(logp_YxBxC), (unchunk(ent_YxBxC) if with_entropy else None)


def _token_stats(
    logits_BxTxV: jax.Array,
    tokens_BxT: jax.Array,
    temperature: float,
    with_entropy: bool,
    chunk_size: int | None,
) -> tuple[jax.Array, jax.Array | None]:
    _check_temperature(temperature)
    if logits_BxTxV.shape[:2] != tokens_BxT.shape:
        raise ValueError(
            f"logits shape {logits_BxTxV.shape} does not match tokens shape "
            f"{tokens_BxT.shape}: pass the logits of every token position [B, T, V]."
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (or None: no chunking).")
    # logits[:, t] predicts tokens[:, t + 1]. Slicing the logits to [:, :-1] would copy them,
    # so score all T positions against the left-shifted tokens (the last one predicts a dummy
    # token 0) and shift the [B, T] results right instead.
    next_BxT = jnp.pad(tokens_BxT[:, 1:], ((0, 0), (0, 1)))
    if chunk_size is None or chunk_size >= tokens_BxT.shape[1]:
        stats = next_token_stats(logits_BxTxV, next_BxT, temperature, with_entropy)
    else:
        stats = _chunked_next_token_stats(
            logits_BxTxV, next_BxT, temperature, with_entropy, chunk_size
        )

    def align(a_BxT):  # entry t is about tokens[:, t]; position 0 has no prediction
        return jnp.pad(a_BxT[:, :-1], ((0, 0), (1, 0)))

    logp_BxT, entropy_BxT = stats
    return align(logp_BxT), (align(entropy_BxT) if with_entropy else None)


def token_logprobs(
    logits_BxTxV: jax.Array,
    tokens_BxT: jax.Array,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> jax.Array:
    """Log-probs of the given tokens under ``softmax(logits / temperature)``, in float32.

    ``logp_BxT[b, t] = log p(tokens[b, t] | tokens[b, :t])``, read from ``logits[b, t - 1]``;
    ``logp_BxT[:, 0] = 0`` (see the module docstring). ``temperature`` must be the rollout's,
    so that the ratio to the sampler's log-probs is 1 before any update.

    ``chunk_size`` (optional) walks the T axis in chunks of that many positions under
    ``jax.checkpoint``, so float32 temporaries are ``[B, chunk_size, V]``, not ``[B, T, V]``;
    None or ``chunk_size >= T``: one pass, no loop (the default, and the faster one). On GPU
    the one-pass forward fuses completely (no [B, T, V] temporary), but its gradient needs a
    float32 [B, T, V] temporary when the logits are bf16 (none for float32 logits); chunking
    bounds it to [B, chunk_size, V] at some cost in speed. On XLA:CPU the one-pass forward holds
    one or two float32 [B, T, V] values.
    """
    return _token_stats(logits_BxTxV, tokens_BxT, temperature, False, chunk_size)[0]


def token_logprobs_and_entropy(
    logits_BxTxV: jax.Array,
    tokens_BxT: jax.Array,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``token_logprobs`` and the entropy of each predicted distribution, both [B, T] float32.

    ``entropy_BxT[b, t]`` is the entropy of ``softmax(logits[b, t - 1] / temperature)``, the
    distribution ``tokens[b, t]`` was drawn from; 0 at ``t = 0``.
    """
    logp_BxT, entropy_BxT = _token_stats(logits_BxTxV, tokens_BxT, temperature, True, chunk_size)
    return logp_BxT, entropy_BxT


def _masked_mean(x_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask_BxT, x_BxT, 0.0)) / jnp.maximum(jnp.sum(mask_BxT), 1)


def aggregate_loss(
    loss_BxT: jax.Array, mask_BxT: jax.Array, aggregation: str, max_len: int | None = None
) -> jax.Array:
    """Reduce per-token losses to a scalar, as verl's ``agg_loss`` (core_algos.py) does.

    - ``token-mean``: sum over the batch's response tokens / their number.
    - ``seq-mean-token-mean``: mean over tokens within each response, then over responses
      (responses with no token are left out, as in current verl).
    - ``seq-mean-token-sum-norm`` (Dr.GRPO): sum over the batch's response tokens / ``max_len``,
      a constant (default T, verl's ``loss_mask.shape[-1]``). Like verl it is a *sum* over
      responses, not a mean: its scale grows with B, so tune the learning rate per batch size.

    Masked entries contribute exactly 0 whatever they hold (NaN included).
    """
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    mask_BxT = mask_BxT.astype(bool)
    if aggregation == "token-mean":
        return _masked_mean(loss_BxT, mask_BxT)
    token_sum_B = jnp.sum(jnp.where(mask_BxT, loss_BxT, 0.0), axis=1)
    if aggregation == "seq-mean-token-mean":
        count_B = jnp.sum(mask_BxT, axis=1)
        seq_mean_B = token_sum_B / jnp.maximum(count_B, 1)
        return _masked_mean(seq_mean_B, count_B > 0)
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1 (the rollout's max new tokens).")
    return jnp.sum(token_sum_B) / (max_len or loss_BxT.shape[1])


def kl_to_reference(logp_BxT: jax.Array, ref_logp_BxT: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    ``k3`` ("low_var_kl", Schulman 2020): ``exp(ref - logp) - (ref - logp) - 1``, unbiased and
    >= 0, clamped to [-10, 10] as in verl's ``kl_penalty``; ``k1``: ``logp - ref``.
    """
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    if estimator == "k1":
        return logp_BxT - ref_logp_BxT
    d_BxT = jnp.clip(ref_logp_BxT - logp_BxT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(d_BxT) - d_BxT - 1.0, -_KL_CLAMP, _KL_CLAMP)


def _check_loss_args(
    logp_BxT: jax.Array,
    others: dict[str, jax.Array | None],
    advantages_B: jax.Array,
    clip_eps_low: float,
    clip_eps_high: float,
    kl_coef: float,
) -> None:
    for name, a in others.items():
        if a is not None and a.shape != logp_BxT.shape:
            raise ValueError(f"{name} has shape {a.shape}; expected logp's {logp_BxT.shape}.")
    if advantages_B.shape != logp_BxT.shape[:1]:
        raise ValueError(
            f"advantages have shape {advantages_B.shape}; expected one per response "
            f"({logp_BxT.shape[0]},)."
        )
    if not 0 <= clip_eps_low < 1 or clip_eps_high < 0:
        raise ValueError(
            f"clip eps (low={clip_eps_low}, high={clip_eps_high}) must satisfy "
            "0 <= low < 1 and high >= 0 (loss.clip_eps, 0.2 in the paper)."
        )
    if kl_coef < 0:
        raise ValueError(f"kl_coef={kl_coef} must be >= 0 (loss.kl_coef, 1e-3 in the paper).")


def grpo_loss(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array | None,
    ref_logp_BxT: jax.Array | None,
    advantages_B: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 1e-3,
    kl_estimator: str = "k3",
    aggregation: str = "token-mean",
    max_len: int | None = None,
    entropy_BxT: jax.Array | None = None,
    group_size: int | None = None,
    entropy_coef: float = 0.0,
    importance_level: str = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped GRPO surrogate plus a KL penalty to the reference policy.

    Per response token (``mask_BxT`` true), with ``ratio = exp(logp - old_logp)``:

      pg = -min(ratio * A, clip(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * A)
      loss = agg(pg) + kl_coef * agg(kl(logp, ref_logp)) - entropy_coef * agg(entropy)

    with ``agg`` = :func:`aggregate_loss` and ``kl`` = :func:`kl_to_reference`.

    ``importance_level="sequence"`` (GSPO, Zheng et al. 2025) replaces every token's ratio by
    its response's length-normalised one, ``s = exp(mean_t (logp - old_logp))``, written as
    ``exp(logp - sg(logp) + sg(log s))`` per token (as verl does): its value is ``s`` at every
    token, its gradient ``s * grad logp``, so the clip keeps or drops whole responses. GSPO's
    paper pairs it with ``seq-mean-token-mean``; the aggregation stays the caller's choice.

    Args:
      logp_BxT: log-probs of the sampled tokens under the params being differentiated.
      old_logp_BxT: log-probs at the rollout policy ("rollout" mode: fixed for every gradient
        evaluation of a step, so the ratio moves at GXPO's probe points); ``None`` selects
        "current" mode, ``old = stop_gradient(logp)``: ratio 1 and the plain policy gradient at
        every point, like re-anchoring the old policy there, without a forward pass.
      ref_logp_BxT: reference-policy log-probs; ``None`` only together with ``kl_coef=0``.
      advantages_B: one advantage per response (:func:`group_advantages`).
      mask_BxT: true on response tokens; other entries contribute exactly 0, even if
        non-finite.
      clip_eps_low, clip_eps_high: PPO clip range (asymmetric allowed, as in DAPO).
      kl_coef, kl_estimator: KL penalty weight and ``"k3"`` | ``"k1"``.
      aggregation, max_len: see :func:`aggregate_loss`.
      entropy_BxT: token entropies (:func:`token_logprobs_and_entropy`), reported if given;
        needed, and differentiated, when ``entropy_coef > 0``.
      group_size: G; if given, reports the fraction of groups with a nonzero advantage.
      entropy_coef: weight of the entropy bonus (0: none; the GXPO authors' recipe: 1e-3).
      importance_level: ``"token"`` (PPO / GRPO) or ``"sequence"`` (GSPO), see above.

    Returns:
      ``(loss, metrics)``: the scalar to differentiate, and float32 scalars ``loss``,
      ``pg_loss``, ``clip_frac`` (tokens where the clipped term is taken), ``approx_kl_old``
      (token mean of ``old - logp``), ``kl_ref`` (token mean of the KL estimate, if ref given),
      ``entropy`` (token mean, if given), ``nonzero_adv_groups`` (if ``group_size`` given).
    """
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("importance_level", importance_level, IMPORTANCE_LEVELS)
    if entropy_coef < 0 or (entropy_coef > 0 and entropy_BxT is None):
        raise ValueError(
            f"entropy_coef={entropy_coef} must be >= 0, and > 0 needs entropy_BxT "
            "(token_logprobs_and_entropy)."
        )
    _check_loss_args(
        logp_BxT,
        {"old_logp": old_logp_BxT, "ref_logp": ref_logp_BxT, "mask": mask_BxT},
        advantages_B,
        clip_eps_low,
        clip_eps_high,
        kl_coef,
    )
    if ref_logp_BxT is None and kl_coef > 0:
        raise ValueError(
            f"kl_coef={kl_coef} needs reference log-probs; pass ref_logp or set kl_coef=0."
        )
    mask_BxT = mask_BxT.astype(bool)

    def masked(x_BxT):  # sanitise masked entries so that neither value nor gradient sees them
        return jnp.where(mask_BxT, _float(x_BxT), 0.0)

    logp_BxT = masked(logp_BxT)
    old_BxT = jax.lax.stop_gradient(logp_BxT) if old_logp_BxT is None else masked(old_logp_BxT)
    log_ratio_BxT = jnp.clip(logp_BxT - old_BxT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if importance_level == "token":
        ratio_BxT = jnp.exp(log_ratio_BxT)
    else:
        count_Bx1 = jnp.maximum(jnp.sum(mask_BxT, axis=1, keepdims=True), 1)
        seq_log_ratio_Bx1 = jnp.sum(logp_BxT - old_BxT, axis=1, keepdims=True) / count_Bx1
        seq_log_ratio_Bx1 = jnp.clip(seq_log_ratio_Bx1, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        sg = jax.lax.stop_gradient
        ratio_BxT = jnp.exp(logp_BxT - sg(logp_BxT) + sg(seq_log_ratio_Bx1))
    a_Bx1 = _float(advantages_B)[:, None]
    unclipped_BxT = -a_Bx1 * ratio_BxT
    clipped_BxT = -a_Bx1 * jnp.clip(ratio_BxT, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg_loss = aggregate_loss(
        jnp.maximum(unclipped_BxT, clipped_BxT), mask_BxT, aggregation, max_len
    )
    loss = pg_loss
    metrics = {
        "pg_loss": pg_loss,
        "clip_frac": _masked_mean((clipped_BxT > unclipped_BxT).astype(jnp.float32), mask_BxT),
        "approx_kl_old": _masked_mean(-log_ratio_BxT, mask_BxT),
    }
    if ref_logp_BxT is not None:
        kl_BxT = kl_to_reference(logp_BxT, masked(ref_logp_BxT), kl_estimator)
        if kl_coef > 0:
            loss = loss + kl_coef * aggregate_loss(kl_BxT, mask_BxT, aggregation, max_len)
        metrics["kl_ref"] = _masked_mean(kl_BxT, mask_BxT)
    if entropy_BxT is not None:
        entropy_BxT = masked(entropy_BxT)
        if entropy_coef > 0:
            loss = loss - entropy_coef * aggregate_loss(entropy_BxT, mask_BxT, aggregation, max_len)
        metrics["entropy"] = _masked_mean(entropy_BxT, mask_BxT)
    if group_size is not None:
        metrics["nonzero_adv_groups"] = nonzero_group_fraction(advantages_B, group_size)
    metrics["loss"] = loss
    return loss, metrics
