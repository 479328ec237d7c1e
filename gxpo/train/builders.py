"""Config groups -> the objects a run trains with: the model's weights, the loss, the inner
optimizer and its schedule, the gate, the policy update (from `gxpo.train.updates`) and the
jitted update step.

The Trainer and every benchmark build through these, so a config means the same thing
everywhere. The policy update needs no model: it is built, and its combinator checks its
arguments, before anything is loaded or compiled; a bad value comes back as the config field
that holds it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from gxpo.models.char_tokenizer import char_tokenizer
from gxpo.models.checkpoints import load_pretrained
from gxpo.models.config import ModelConfig
from gxpo.models.lora import split_trainable
from gxpo.models.presets import get_preset
from gxpo.models.transformer import init_model
from gxpo.optim import ZScoreGate
from gxpo.train import mesh as mesh_lib
from gxpo.train import updates
from gxpo.train.config import resolve_model_path, validate
from gxpo.train.loss import LossConfig, policy_loss
from gxpo.train.state import TrainState, init_state, state_shardings
from gxpo.train.step import LossFn, make_update_step

# The combinators' argument errors: "owner: `argument` rule, got value."
# The loss's scalar metrics (gxpo.rl.grpo.grpo_loss) a gate may watch at the corrective point.
LOSS_METRICS = ("entropy", "loss", "pg_loss", "clip_frac", "approx_kl_old", "kl_ref")

_ARGUMENT_ERROR = re.compile(
    r"(?P<owner>\w+):\s*`(?P<arg>\w+)`\s*(?P<rule>.*?)(?:,\s*got .*)?\.?", re.S
)


def check(config: ml_collections.ConfigDict) -> None:
    """Every check of a training config that needs no model or data: `validate`'s, then the
    policy update's own argument checks (by building it). Raises ValueError naming the field."""
    validate(config)
    policy_update(config)


def model(
    m: ml_collections.ConfigDict, seed: int, mesh: jax.sharding.Mesh
) -> tuple[ModelConfig, dict, dict, Any]:
    """(model config, trainable weights, frozen weights, tokenizer) for the config's `model`
    group, placed on `mesh`. No device ever holds more than its shards: a random init runs as
    one jit with out_shardings, and a checkpoint's weights are created straight into their
    shardings from the host copy (`load_pretrained(..., shardings=)`)."""
    options = dict(
        dtype=m.dtype,
        param_dtype=m.param_dtype or m.dtype,
        lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_targets=tuple(m.lora_targets),
        remat=m.remat,
    )
    if m.path == "":
        model_config = get_preset(m.preset, **options)

        def init():
            _, trainable, frozen = split_trainable(init_model(model_config, seed=seed))
            return _pure(trainable), _pure(frozen)

        shardings = mesh_lib.weight_shardings(model_config, mesh)
        trainable, frozen = mesh_lib.init_sharded(init, shardings)
        return model_config, trainable, frozen, char_tokenizer()  # random init: no tokenizer
    loaded, tokenizer = load_pretrained(
        resolve_model_path(m.path),
        seed=seed,
        shardings=lambda config: mesh_lib.weight_shardings(config, mesh),
        **options,
    )
    if tokenizer is None:
        raise ValueError(
            f"config.model.path={m.path!r} has no tokenizer files (tokenizer.json, ...); "
            "training needs the checkpoint's tokenizer"
        )
    _, trainable, frozen = split_trainable(loaded)
    return loaded.config, _pure(trainable), _pure(frozen), tokenizer


def initial_state(
    tx: optax.GradientTransformation,
    model_config: ModelConfig,
    trainable: dict,
    data: dict[str, int],
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, TrainState]:
    """The train state before the first step, on `mesh`, and its shardings (a `TrainState` of
    shardings: what the jitted update step takes, and the target a checkpoint restores into).
    `data` is the data iterator's state."""
    trainable_sh = mesh_lib.like(mesh_lib.weight_shardings(model_config, mesh), trainable)
    opt_sh = mesh_lib.opt_state_shardings(tx, trainable, trainable_sh, mesh)
    scalar = mesh_lib.replicated(mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    state = init_state(trainable, opt_state, data, scalar)
    return state, state_shardings(state, trainable_sh, opt_sh, scalar)


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
    """The GRPO loss's settings: `config.loss`, with the rollout's temperature, its max new
    tokens (Dr.GRPO's normaliser) and its group size."""
    lo, r = config.loss, config.rollout
    return LossConfig(
        temperature=r.temperature,
        clip_eps_low=lo.clip_eps_low,
        clip_eps_high=lo.clip_eps_high,
        kl_coef=lo.kl_coef,
        kl_estimator=lo.kl_estimator,
        aggregation=lo.aggregation,
        max_len=r.max_new_tokens,
        old_logprobs=lo.old_logprobs,
        group_size=r.responses_per_prompt,
        entropy_coef=lo.entropy_coef,
        importance_level=lo.importance_level,
    )


def loss_fn(config: ml_collections.ConfigDict, model_config: ModelConfig) -> LossFn:
    """`loss(trainable, *, batch, frozen) -> (loss, metrics)` of the config's GRPO loss."""
    return functools.partial(
        policy_loss, model_config=model_config, loss_config=loss_config(config)
    )


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule | float:
    """`config.optimizer`'s learning rate over the run's inner-optimizer updates: train.steps x
    train.epochs x train.mini_batches x the policy update's inner updates per step."""
    opt, pu, tr = config.optimizer, config.policy_update, config.train
    per_step = updates.get(pu.name).updates_per_step(_group(pu))
    total_updates = tr.steps * tr.epochs * tr.mini_batches * per_step
    if opt.schedule == "constant" and not opt.warmup_steps:
        return opt.lr
    decay = max(total_updates - opt.warmup_steps, 1)
    if opt.schedule == "constant":
        main = optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        main = optax.cosine_decay_schedule(opt.lr, decay)
    else:
        main = optax.linear_schedule(opt.lr, 0.0, decay)
    warm = optax.linear_schedule(0.0, opt.lr, opt.warmup_steps)
    return optax.join_schedules([warm, main], [opt.warmup_steps])


def inner_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with the schedule, behind an optional global-norm clip. The clip sits inside the
    inner optimizer, so GXPO/SFPO clip every gradient they evaluate, not only g0."""
    opt = config.optimizer
    adamw = optax.adamw(
        schedule(config), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay
    )
    if opt.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip), adamw)
    return adamw


def gate(config: ml_collections.ConfigDict) -> ZScoreGate | None:
    """`config.policy_update.gate` as a `ZScoreGate`, or None when disabled."""
    g = config.policy_update.gate
    if not g.enabled:
        return None
    if g.statistic != "corrective_norm" and g.statistic not in LOSS_METRICS:
        raise ValueError(
            f"config.policy_update.gate.statistic={g.statistic!r}: allowed values are "
            f"'corrective_norm' or a metric of the loss {LOSS_METRICS} (e.g. 'entropy')"
        )
    return ZScoreGate(
        g.window,
        g.warmup,
        float(g.threshold),
        patience=g.patience,
        fallback=g.fallback,
        rearm_after=g.rearm_after,
        max_active_steps=g.max_active_steps or None,
        statistic="corrective_norm" if g.statistic == "corrective_norm" else ("aux", g.statistic),
    )


def policy_update(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """The registered policy update `config.policy_update.name` around the inner optimizer.

    Its combinator checks its own arguments here; a ValueError naming an argument in backticks
    is raised again naming the config field (`config.policy_update.gxpo.virtual_depth=1: ...`).
    """
    pu = config.policy_update
    entry = updates.get(pu.name)
    group = _group(pu)
    the_gate = gate(config)
    settings = {f: config.optimizer[f] for f in entry.optimizer_fields}
    try:
        return entry.factory(inner_optimizer(config), the_gate, **group, **settings)
    except ValueError as e:
        raise _config_error(e, config, pu.name, group, the_gate) from None


def plain_step(
    config: ml_collections.ConfigDict, tx: optax.GradientTransformationExtraArgs
) -> updates.PlainStep | None:
    """The plain step `tx` (the config's policy update, from `policy_update`) runs once its gate
    has shut extrapolation off for good (`gxpo.train.updates.PlainStep`), or None where it has
    none (GRPO, no gate). Build its jitted step with `update_step(config, model_config,
    plain.tx)`: it takes and gives the same train state as `tx`'s."""
    pu = config.policy_update
    entry = updates.get(pu.name)
    if entry.plain_step is None:
        return None
    settings = {f: config.optimizer[f] for f in entry.optimizer_fields}
    # The same inner optimizer and gate as `tx` wraps (pure functions of the config).
    return entry.plain_step(tx, inner_optimizer(config), gate(config), **_group(pu), **settings)


def update_step(
    config: ml_collections.ConfigDict,
    model_config: ModelConfig,
    tx: optax.GradientTransformationExtraArgs,
    **jit_kwargs: Any,
) -> Callable:
    """The jitted, donating `update(state, frozen, batch) -> (state, metrics)` of the config's
    loss and gradient accumulation (`gxpo.train.step.make_update_step`); diagnostics are logged
    as `<policy_update.name>/<field>`."""
    return make_update_step(
        tx,
        loss_fn(config, model_config),
        info_prefix=config.policy_update.name,
        micro_batches=config.train.micro_batches,
        group_size=config.rollout.responses_per_prompt,
        aggregation=config.loss.aggregation,
        **jit_kwargs,
    )


def step_buffers(config: ml_collections.ConfigDict) -> int:
    """The memory estimate's parameter-sized buffers of the config's policy update."""
    return updates.get(config.policy_update.name).step_buffers


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def _group(pu: ml_collections.ConfigDict) -> dict[str, Any]:
    """The fields of `config.policy_update.<name>` ({} when the update has none)."""
    group = pu.get(pu.name)
    return {} if group is None else group.to_dict()


def _config_error(
    error: ValueError, config: Any, name: str, group: dict, the_gate: ZScoreGate | None
) -> ValueError:
    """`error` restated as the config field its argument comes from, when there is one."""
    m = _ARGUMENT_ERROR.fullmatch(str(error))
    if m is None:
        return error
    argument = m["arg"]
    if the_gate is not None and m["owner"] == type(the_gate).__name__:
        field, value = f"policy_update.gate.{argument}", config.policy_update.gate.get(argument)
    elif argument in group:
        field, value = f"policy_update.{name}.{argument}", group[argument]
    else:
        return error
    return ValueError(f"config.{field}={value!r}: {m['rule']}")
