"""The rolling z-score shutoff gate shared by `gxpo` and `sfpo`.

Extrapolation pays while successive gradients on one batch agree; when the watched statistic
(the corrective gradient's norm, or e.g. the policy entropy at the corrective point) jumps far
above its recent history the lookahead has started to overshoot, and the gate switches the
combinator back to its plain inner optimizer: for good, or for a while.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gxpo.optim._checks import argument_error, is_int, is_real

_FALLBACKS = ("permanent", "temporary")
_STATISTIC_RULE = (
    "must be 'corrective_norm', ('aux', <key of the loss's aux mapping>) or a callable "
    "aux -> scalar"
)

# What the gate watches: "corrective_norm", ("aux", key), or a callable of the loss's aux output.
Statistic = str | tuple[str, str] | Callable[[Any], jax.Array]


class GateState(NamedTuple):
    """State of a `ZScoreGate`; plain arrays, so it checkpoints and shards."""

    values: jax.Array  # [window] float32, ring buffer of the values observed since warm-up
    count: jax.Array  # [] int32, values observed so far (warm-up included, never reset)
    filled: jax.Array  # [] int32, values stored in the buffer since the warm-up ended
    streak: jax.Array  # [] int32, consecutive values above the threshold (open streak)
    frozen: jax.Array  # [2] float32, (mean, std) the open streak is scored against
    on: jax.Array  # [] bool, False while extrapolation is shut off
    off_steps: jax.Array  # [] int32, plain steps taken since the gate last fired


class ZScoreGate(NamedTuple):
    """Shuts extrapolation off on a sustained upward jump of the observed value.

    At each active step the combinator observes one value v of the gate's
    ``statistic``. With mu and sigma the mean and population standard deviation
    of the ``window`` values observed before v (the preceding window; v is never
    scored against itself),

        z = (v - mu) / (sigma + 1e-8).

    The first ``warmup`` values can never fire the gate and are then discarded:
    the window starts empty after warm-up, and a value is scored only once the
    full preceding window has been observed (z = 0 before). ``z > threshold`` is
    a hit (one-sided: a downward jump never is); ``patience`` consecutive hits
    fire the gate. The first hit of a streak freezes (mu, sigma): the rest of the
    streak is scored against that baseline, not against a window that has
    absorbed the excursion (the values still enter the window). A value below
    the threshold ends the streak. The step whose value fires the gate keeps its
    own (extrapolated) update; the next step is the first plain one.

    Once fired, ``fallback="permanent"`` keeps extrapolation off for good;
    ``"temporary"`` takes ``rearm_after`` plain steps, then re-arms with the
    window it had (no new warm-up). ``max_active_steps`` caps the values the gate
    observes (its active steps, warm-up included): at the cap extrapolation goes
    off for good in either mode.

    Statistic (``statistic``):
      - ``"corrective_norm"``: the global L2 norm of the corrective gradient
        (the paper; the authors' gradient gate),
      - ``("aux", key)``: ``aux[key]`` of the loss's aux output at the corrective
        point, e.g. ``("aux", "entropy")`` (the authors' entropy gate),
      - a callable ``aux -> scalar`` of that aux output.
      The last two need the aux output: a ``loss_fn`` with ``has_aux=True``, or
      an ``aux_grad_fn`` (params -> (grads, aux)) given to ``update``.

    Attributes:
      window: number of preceding values the z-score is computed against.
      warmup: values observed (and discarded) before the gate may fire; 0 = none.
      threshold: z-score above which a value is a hit.
      patience: consecutive hits that fire the gate (1: the paper; the authors: 3).
      fallback: ``"permanent"`` (the paper) or ``"temporary"``.
      rearm_after: plain steps before a ``"temporary"`` gate re-arms.
      max_active_steps: cap on the values observed (None: no cap).
      statistic: what is observed, see above.
    """

    window: int = 30
    warmup: int = 30
    threshold: float = 2.0
    patience: int = 1
    fallback: str = "permanent"
    rearm_after: int = 10
    max_active_steps: int | None = None
    statistic: Statistic = "corrective_norm"

    def validate(self) -> None:
        """Raises ValueError("ZScoreGate: `<field>` <rule>, got <value!r>.") on a bad field."""
        if not (is_int(self.window) and self.window >= 1):
            raise argument_error("ZScoreGate", "window", "must be an int >= 1", self.window)
        if not (is_int(self.warmup) and self.warmup >= 0):
            raise argument_error("ZScoreGate", "warmup", "must be an int >= 0", self.warmup)
        if not (is_real(self.threshold) and self.threshold > 0):
            raise argument_error("ZScoreGate", "threshold", "must be a number > 0", self.threshold)
        if not (is_int(self.patience) and self.patience >= 1):
            raise argument_error("ZScoreGate", "patience", "must be an int >= 1", self.patience)
        if self.fallback not in _FALLBACKS:
            rule = f"must be one of {_FALLBACKS}"
            raise argument_error("ZScoreGate", "fallback", rule, self.fallback)
        if not (is_int(self.rearm_after) and self.rearm_after >= 1):
            rule = "must be an int >= 1"
            raise argument_error("ZScoreGate", "rearm_after", rule, self.rearm_after)
        cap = self.max_active_steps
        if cap is not None and not (is_int(cap) and cap >= 1):
            raise argument_error(
                "ZScoreGate", "max_active_steps", "must be an int >= 1 or None", cap
            )
        s = self.statistic
        aux_key = isinstance(s, tuple) and len(s) == 2 and s[0] == "aux" and isinstance(s[1], str)
        if not (s == "corrective_norm" or aux_key or (callable(s) and not isinstance(s, str))):
            raise argument_error("ZScoreGate", "statistic", _STATISTIC_RULE, s)

    @property
    def needs_aux(self) -> bool:
        """Whether the statistic reads the loss's aux output."""
        return not (isinstance(self.statistic, str) and self.statistic == "corrective_norm")

    def observed_value(self, corrective_norm: jax.Array, aux: Any) -> jax.Array:
        """This step's value of the statistic, float32."""
        s = self.statistic
        if isinstance(s, str):
            value = corrective_norm
        elif isinstance(s, tuple):
            if not isinstance(aux, Mapping) or s[1] not in aux:
                keys = tuple(aux) if isinstance(aux, Mapping) else type(aux).__name__
                rule = f"names a key the loss's aux output lacks (it has {keys})"
                raise argument_error("ZScoreGate", "statistic", rule, s)
            value = aux[s[1]]
        else:
            value = s(aux)
        return jnp.asarray(value, jnp.float32).reshape(())

    def init(self) -> GateState:
        return GateState(
            values=jnp.zeros((self.window,), jnp.float32),
            count=jnp.zeros((), jnp.int32),
            filled=jnp.zeros((), jnp.int32),
            streak=jnp.zeros((), jnp.int32),
            frozen=jnp.zeros((2,), jnp.float32),
            on=jnp.ones((), jnp.bool_),
            off_steps=jnp.zeros((), jnp.int32),
        )

    def update(self, state: GateState, value: jax.Array) -> tuple[GateState, jax.Array]:
        """Observes `value` at an active step; returns the new state and its z-score (0 during
        warm-up and while the preceding window is not full)."""
        value = jnp.asarray(value, jnp.float32)
        warm = state.count >= self.warmup
        full = warm & (state.filled >= self.window)
        mu = jnp.mean(state.values)  # the buffer is full whenever the z-score counts
        sigma = jnp.sqrt(jnp.mean((state.values - mu) ** 2))
        open_streak = state.streak > 0
        mu = jnp.where(open_streak, state.frozen[0], mu)
        sigma = jnp.where(open_streak, state.frozen[1], sigma)
        z = jnp.where(full, (value - mu) / (sigma + 1e-8), 0.0)
        hit = full & (z > self.threshold)
        streak = jnp.where(hit, state.streak + 1, 0)
        frozen = jnp.where(hit & ~open_streak, jnp.stack([mu, sigma]), state.frozen)
        fire = streak >= self.patience
        on = state.on & ~fire
        if self.max_active_steps is not None:
            on = on & (state.count + 1 < self.max_active_steps)
        new_state = GateState(
            values=jnp.where(warm, state.values.at[state.filled % self.window].set(value), 0.0),
            count=state.count + 1,
            filled=jnp.where(warm, state.filled + 1, 0),
            streak=jnp.where(fire, 0, streak),
            frozen=frozen,
            on=on,
            off_steps=jnp.zeros((), jnp.int32),
        )
        return new_state, z

    def idle(self, state: GateState) -> GateState:
        """Advances the gate over a plain step: a ``"temporary"`` gate that is off counts it and
        re-arms after ``rearm_after`` of them (never past ``max_active_steps``). A permanent
        gate, or one that is on, is returned as it is."""
        if self.fallback == "permanent":
            return state
        off_steps = jnp.where(state.on, state.off_steps, state.off_steps + 1)
        rearm = ~state.on & (off_steps >= self.rearm_after)
        if self.max_active_steps is not None:
            rearm = rearm & (state.count < self.max_active_steps)
        return state._replace(
            on=state.on | rearm, off_steps=jnp.where(rearm, 0, off_steps).astype(jnp.int32)
        )
