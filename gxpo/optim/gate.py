"""The rolling z-score shutoff gate shared by `gxpo` and `sfpo`.

Extrapolation pays while successive gradients on one batch agree; when the
corrective gradient's norm jumps far above its recent history the lookahead has
started to overshoot, and the gate switches the combinator back to its plain
inner optimizer for the rest of training.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gxpo.optim._checks import argument_error, is_int, is_real


class GateState(NamedTuple):
    """State of a `ZScoreGate`; plain arrays, so it checkpoints and shards."""

    values: jax.Array  # [window] float32, ring buffer of observed values
    count: jax.Array  # [] int32, values observed so far (not capped at window)
    on: jax.Array  # [] bool, False once the gate has shut extrapolation off


class ZScoreGate(NamedTuple):
    """Shuts extrapolation off for good on an upward jump of the observed value.

    At each active step the combinator observes v (the global L2 norm of the
    corrective gradient). Before v enters the buffer, with mu and sigma the
    mean and population standard deviation of the last `window` values,

        z = (v - mu) / (sigma + 1e-8).

    While fewer than `warmup` values have been seen the gate only fills its
    buffer. After that, `z > threshold` switches extrapolation off, and it stays
    off. The test is one-sided: a downward jump never shuts it off.

    Attributes:
      window: number of past values the z-score is computed against.
      warmup: values observed before the gate may shut off.
      threshold: z-score above which extrapolation is switched off.
    """

    window: int = 30
    warmup: int = 30
    threshold: float = 2.0

    def validate(self) -> None:
        """Raises ValueError("ZScoreGate: `<field>` <rule>, got <value!r>.") on a bad field."""
        if not (is_int(self.window) and self.window >= 1):
            raise argument_error("ZScoreGate", "window", "must be an int >= 1", self.window)
        if not (is_int(self.warmup) and self.warmup >= 1):
            raise argument_error("ZScoreGate", "warmup", "must be an int >= 1", self.warmup)
        if not (is_real(self.threshold) and self.threshold > 0):
            raise argument_error("ZScoreGate", "threshold", "must be a number > 0", self.threshold)

    def init(self) -> GateState:
        return GateState(
            values=jnp.zeros((self.window,), jnp.float32),
            count=jnp.zeros((), jnp.int32),
            on=jnp.ones((), jnp.bool_),
        )

    def update(self, state: GateState, value: jax.Array) -> tuple[GateState, jax.Array]:
        """Observes `value`; returns the new state and this value's z-score.

        The z-score is 0 while the buffer is empty.
        """
        value = jnp.asarray(value, jnp.float32)
        filled = jnp.minimum(state.count, self.window)
        valid = jnp.arange(self.window) < filled
        n = jnp.maximum(filled, 1).astype(jnp.float32)
        mu = jnp.sum(jnp.where(valid, state.values, 0.0)) / n
        var = jnp.sum(jnp.where(valid, (state.values - mu) ** 2, 0.0)) / n
        z = jnp.where(filled > 0, (value - mu) / (jnp.sqrt(var) + 1e-8), 0.0)
        shut = (state.count >= self.warmup) & (z > self.threshold)
        new_state = GateState(
            values=state.values.at[state.count % self.window].set(value),
            count=state.count + 1,
            on=state.on & ~shut,
        )
        return new_state, z
