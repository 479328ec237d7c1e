"""The training state: one pytree that the jitted update step carries and a checkpoint holds.

The update step (`gxpo.train.step`) advances the device-side fields (the trainable weights,
the optimizer state, the backward-pass count); the loop sets the host-side ones (step, data
position, wall seconds) between steps with `advance`. A checkpoint saves and restores exactly
this pytree, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils


class TrainState(NamedTuple):
    """Everything a run carries from one training step to the next (the frozen weights, which
    never change, are not part of it). The counters are 0-d arrays of fixed dtype and
    placement, so the jitted step sees the same kind of inputs at every call."""

    trainable: dict  # the trained weights: the LoRA adapters, or every weight
    opt_state: optax.OptState  # the policy update's state (the inner optimizer's inside it)
    step: Any  # [] int32: training steps (rollout batches) done
    data: dict[str, Any]  # the data iterator's position (`BatchIterator.state()`), [] int32 each
    backward_passes: Any  # [] int32: gradient evaluations so far, over every update
    wall_seconds: Any  # [] float32: training wall clock so far, evaluations excluded


def init_state(
    trainable: dict,
    opt_state: optax.OptState,
    data: Mapping[str, int],
    scalar_sharding: jax.sharding.Sharding | None = None,
) -> TrainState:
    """The state before the first step; counters placed with `scalar_sharding` (the jitted
    step's sharding for them; None: the default device)."""
    state = TrainState(
        trainable=trainable,
        opt_state=opt_state,
        step=0,
        data={},
        backward_passes=jax.device_put(np.int32(0), scalar_sharding),
        wall_seconds=0.0,
    )
    return advance(state, step=0, data=data, seconds=0.0, scalar_sharding=scalar_sharding)


def advance(
    state: TrainState,
    *,
    step: int,
    data: Mapping[str, int],
    seconds: float,
    scalar_sharding: jax.sharding.Sharding | None = None,
) -> TrainState:
    """`state` with the loop's host-side fields set: the step count, the data position, and
    `seconds` more of wall clock, placed like the step's outputs (`scalar_sharding`)."""
    put = lambda x: jax.device_put(x, scalar_sharding)
    wall = np.float32(state.wall_seconds) + np.float32(seconds)
    if jax.process_count() > 1:  # a replicated value must agree: process 0's clock
        wall = np.float32(multihost_utils.broadcast_one_to_all(wall))
    return state._replace(
        step=put(np.int32(step)),
        data={k: put(np.int32(v)) for k, v in data.items()},
        wall_seconds=put(np.float32(wall)),
    )


def state_shardings(state: TrainState, trainable: Any, opt_state: Any, scalar: Any) -> TrainState:
    """The shardings of `state` for jit: `trainable` and `opt_state` (trees of shardings) for
    those fields, `scalar` (e.g. replicated) for every counter."""
    return TrainState(
        trainable=trainable,
        opt_state=opt_state,
        step=scalar,
        data={k: scalar for k in state.data},
        backward_passes=scalar,
        wall_seconds=scalar,
    )
