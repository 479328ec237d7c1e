"""The policy updates a config can name (`config.policy_update.name`), one registry entry each.

Adding a policy update takes a combinator (an `optax.GradientTransformationExtraArgs`, e.g. in
`gxpo.optim`) and one `register(PolicyUpdate(...))`; the config defaults, the builders, the
schedules, the memory estimate and the comparison's method names all read the entry:

    register(PolicyUpdate(
        name="signsgd_scale",
        factory=lambda inner, gate, *, scale: my_combinator(inner, scale=scale),
        defaults={"scale": 0.5},  # becomes config.policy_update.signsgd_scale.scale
    ))

Register before the config is built (e.g. at the top of a config file), so that
`defaults.base_config()` gives the entry its config group.

The update step hands every `tx.update` a `grad_fn=` (params -> the mini-batch's gradient
there, accumulated over micro-batches where configured), so a policy update needs no loss
function of its own. Its state may hold an `info` NamedTuple of scalar diagnostics, logged as
`<name>/<field>`; `info.grad_evals` is the step's gradient evaluations (1 without it).

A gated policy update may also say, through `plain_step`, what it runs once its gate has shut
extrapolation off for good: its plain inner step as a program of its own, which the Trainer
then runs instead of the update's (whose `lax.cond` still carries the probe branch and its
buffers), so that after shutoff a step costs what a GRPO step costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gxpo.optim import ZScoreGate, adamw_direction, gxpo, sfpo
from gxpo.optim._common import norm_f32

# (inner, gate, **config group) -> the policy update
Factory = Callable[..., optax.GradientTransformationExtraArgs]
_RESERVED = ("name", "gate")  # config.policy_update fields that are not policy updates


@dataclasses.dataclass(frozen=True)
class PlainStep:
    """What a gated policy update runs once its gate has shut extrapolation off for good.

    Attributes:
      tx: the plain inner step as a transformation of its own, on the policy update's own state
        (`tx.init` is the policy update's: the train state and its checkpoints keep their
        structure), returning what the update's plain branch returns (updates, state, `info`)
        bit for bit, without the probe branch. (In a jitted step that adds the updates to the
        params, XLA may fuse that add with the inner step's last multiply, one FMA, where
        under the `lax.cond` the updates leave the branch rounded: the new params may then
        differ by one rounding, as GRPO's step rounds them.)
      is_off: `opt_state -> bool`, read on the host: whether the state is past shutoff for
        good, so that every later step of the policy update is the plain one. The Trainer asks
        it before each step (a resumed run asks its restored state).
    """

    tx: optax.GradientTransformationExtraArgs
    is_off: Callable[[optax.OptState], bool]


# (tx, inner, gate, **config group, **optimizer fields) -> PlainStep, or None
PlainStepFactory = Callable[..., PlainStep | None]


@dataclasses.dataclass(frozen=True)
class PolicyUpdate:
    """One policy update.

    Attributes:
      name: its `config.policy_update.name`.
      factory: `(inner, gate, **group) -> tx`: the policy update around the inner optimizer,
        `gate` a `ZScoreGate` or None (`config.policy_update.gate`), `group` the fields of
        `config.policy_update.<name>`. Its argument checks raise ValueError naming the
        argument in backticks (`owner: \\`argument\\` rule, got value.`), which the builders
        turn into the config field.
      defaults: `config.policy_update.<name>`, the factory's keyword arguments.
      inner_updates: inner-optimizer updates per step while active, an int or a function of
        the group's fields (learning-rate schedules count inner updates).
      step_buffers: parameter-sized float buffers one update step holds beyond the params and
        the optimizer state (gradients, probe points, moment copies): the memory estimate's.
      depth_field: the group field that `<name><K>` method names set in
        `gxpo.experiments.compare` (None: the method name is `<name>` alone).
      optimizer_fields: fields of `config.optimizer` the factory also receives, as keyword
        arguments of the same names (e.g. GXPO's update-space retention needs the learning
        rate and weight decay).
      plain_step: `(tx, inner, gate, **group, **optimizer fields) -> PlainStep | None`, `tx`
        the policy update the factory built from the same arguments: its plain step after
        shutoff, or None where this configuration never shuts off for good (no gate). None
        (the default): the update always runs its own program (GRPO: nothing to shut off).
        `gated_plain_step` serves a combinator shaped like `gxpo` and `sfpo`.
    """

    name: str
    factory: Factory
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    inner_updates: int | Callable[..., int] = 1
    step_buffers: int = 4
    depth_field: str | None = None
    optimizer_fields: tuple[str, ...] = ()
    plain_step: PlainStepFactory | None = None

    def updates_per_step(self, group: Mapping[str, Any]) -> int:
        """Inner-optimizer updates of one active step with these group fields."""
        n = self.inner_updates
        return n if isinstance(n, int) else n(**group)


_REGISTRY: dict[str, PolicyUpdate] = {}


def register(entry: PolicyUpdate, *, replace: bool = False) -> PolicyUpdate:
    """Adds `entry` (under `entry.name`); returns it."""
    if not entry.name.isidentifier() or entry.name in _RESERVED:
        raise ValueError(
            f"register: `name` must be an identifier other than {_RESERVED}, got {entry.name!r}."
        )
    if entry.name in _REGISTRY and not replace:
        raise ValueError(f"register: a policy update {entry.name!r} exists; pass replace=True.")
    if entry.depth_field is not None and entry.depth_field not in entry.defaults:
        raise ValueError(
            f"register: `depth_field` {entry.depth_field!r} is not a field of `defaults` "
            f"{tuple(entry.defaults)}."
        )
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Removes a registered policy update (tests register their own)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered policy updates, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> PolicyUpdate:
    """The entry of `name`; ValueError naming the config field if there is none."""
    if name not in _REGISTRY:
        raise ValueError(
            f"config.policy_update.name={name!r}: allowed values are {names()} "
            "(gxpo.train.updates.register adds one)"
        )
    return _REGISTRY[name]


def gated_plain_step(
    tx: optax.GradientTransformationExtraArgs,
    inner: optax.GradientTransformation,
    gate: ZScoreGate | None,
) -> PlainStep | None:
    """The plain step after shutoff of a combinator shaped like `gxpo` and `sfpo` (one
    mini-batch): a state `(inner_state, gate, info)` around `inner` and a `ZScoreGate`, whose
    plain branch is `inner.update(g0, inner_state, params)` with the gate idling and an `info`
    that is zero but for `grad_evals=1` and `initial_norm=||g0||`. None without a gate.

    The gate is off for good when it is off and either `fallback="permanent"` or its
    `max_active_steps` cap is reached (a temporary gate re-arms only below the cap); it then
    stays off, and its `idle` (which still counts a temporary gate's plain steps) runs here too,
    so the state evolves bit for bit as under the combinator's `lax.cond`.
    """
    if gate is None:
        return None
    cap = gate.max_active_steps

    def is_off(state: optax.OptState) -> bool:
        if bool(state.gate.on):
            return False
        return gate.fallback == "permanent" or (cap is not None and int(state.gate.count) >= cap)

    def update_fn(updates, state, params=None, **unused):
        del unused  # grad_fn & co: a plain step evaluates no other gradient
        new_updates, inner_state = inner.update(updates, state.inner_state, params)
        zeros = jax.tree.map(jnp.zeros_like, state.info)
        info = zeros._replace(
            grad_evals=jnp.ones_like(zeros.grad_evals), initial_norm=norm_f32(updates)
        )
        return new_updates, state._replace(
            inner_state=inner_state, gate=gate.idle(state.gate), info=info
        )

    return PlainStep(optax.GradientTransformationExtraArgs(tx.init, update_fn), is_off)


# ----------------------------------------------------------------------------- built-ins


def _grpo(inner: optax.GradientTransformation, gate: ZScoreGate | None):
    del gate  # one plain inner step: nothing to shut off
    return optax.with_extra_args_support(inner)


def _min_norm(value: float) -> float | None:
    return None if value == 0 else value  # config: 0 = off (the paper)


def _sfpo(
    inner: optax.GradientTransformation,
    gate: ZScoreGate | None,
    *,
    min_initial_norm: float,
    **group: Any,
):
    return sfpo(inner, gate=gate, min_initial_norm=_min_norm(min_initial_norm), **group)


def _sfpo_plain(
    tx: optax.GradientTransformationExtraArgs,
    inner: optax.GradientTransformation,
    gate: ZScoreGate | None,
    *,
    mini_batches: int | None = None,
    **group: Any,
) -> PlainStep | None:
    del group
    if mini_batches is not None and mini_batches > 1:  # a plain step is a pass over them all
        return None
    return gated_plain_step(tx, inner, gate)


def _gxpo_plain(
    tx: optax.GradientTransformationExtraArgs,
    inner: optax.GradientTransformation,
    gate: ZScoreGate | None,
    **group: Any,
) -> PlainStep | None:
    del group  # the plain step is the inner step whatever the retention, depth, ...
    return gated_plain_step(tx, inner, gate)


def _gxpo(
    inner: optax.GradientTransformation,
    gate: ZScoreGate | None,
    *,
    min_initial_norm: float,
    retention: str,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    **group: Any,
):
    # The inner optimizer is AdamW (gxpo.train.builders.inner_optimizer): its update direction
    # is the update itself without weight decay, else adamw_direction removes lr and the decay
    # (exact for a constant learning rate; under a schedule it divides by the peak rate).
    direction = None
    if retention == "update" and weight_decay > 0:
        direction = adamw_direction(lr, weight_decay)
    if retention == "clipped_gradient" and not grad_clip > 0:
        raise ValueError(
            f"config.optimizer.grad_clip={grad_clip!r}: policy_update.gxpo.retention="
            "'clipped_gradient' measures r on the clipped gradients; set a clip > 0 (e.g. 1.0) "
            "or another retention"
        )
    return gxpo(
        inner,
        gate=gate,
        min_initial_norm=_min_norm(min_initial_norm),
        retention=retention,
        grad_clip=grad_clip if grad_clip > 0 else None,
        update_direction=direction,
        **group,
    )


# step_buffers: GRPO's step holds g0 beside the loss's own buffers (XLA's figures on CPU,
# benchmarks/memory_calibration.py); GXPO's 22 more, as its peak over GRPO's on one H100
# (Qwen2.5-1.5B and Llama-3.2-3B, LoRA 128, benchmarks/gpu_step.py). SFPO's is not measured.
register(PolicyUpdate(name="grpo", factory=_grpo, step_buffers=1))
register(
    PolicyUpdate(
        name="sfpo",
        factory=_sfpo,
        defaults={
            "fast_steps": 3,  # K
            "reposition": 0.8,  # alpha
            # ||g0|| non-finite or <= this: the plain step, not shown to the gate; 0 = off
            "min_initial_norm": 0.0,
        },
        inner_updates=lambda fast_steps, **_: fast_steps + 1,
        step_buffers=8,
        depth_field="fast_steps",
        plain_step=_sfpo_plain,
    )
)
register(
    PolicyUpdate(
        name="gxpo",
        factory=_gxpo,
        defaults={
            "virtual_depth": 5,  # K
            "reposition": 0.5,  # alpha
            "active_threshold": 1e-3,
            "ratio_clip": (-2.0, 3.0),
            "scale_clip": (1.0, None),  # None = K/2 + 1
            "probe_state": "keep",  # "keep" (paper) | "restore" (the authors)
            # r from "gradient" (paper) | "clipped_gradient" | "update" (the authors: AdamW's
            # update directions; lr and weight decay come from config.optimizer)
            "retention": "gradient",
            # ||g0|| non-finite or <= this: the plain step, not shown to the gate; 0 = off
            # (the paper; the authors: 1e-8)
            "min_initial_norm": 0.0,
        },
        # "keep": both probes' inner steps count; "restore" rewinds them.
        inner_updates=lambda probe_state, **_: 3 if probe_state == "keep" else 1,
        step_buffers=23,
        depth_field="virtual_depth",
        optimizer_fields=("lr", "weight_decay", "grad_clip"),
        plain_step=_gxpo_plain,
    )
)
