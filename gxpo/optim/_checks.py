"""Argument checks of the combinators and the gate: one error format for all of them,
"<owner>: `<argument>` <rule>, got <value!r>.", with <argument> the exact keyword name, so that
a caller (the trainer's config) can map an error back to its own setting."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def argument_error(owner: str, argument: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"{owner}: `{argument}` {rule}, got {value!r}.")


def is_traced(value: Any) -> bool:
    """True for a hyperparameter traced under jit (`optax.inject_hyperparams` rebuilds the
    combinator inside `update`); its value was checked when `init` built it concretely."""
    return isinstance(value, jax.core.Tracer)


def is_real(value: Any) -> bool:
    """A real number: Python, NumPy, or a scalar array (what `inject_hyperparams` passes)."""
    if isinstance(value, (jax.Array, np.ndarray)):
        dtype = value.dtype
        real = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
        return value.shape == () and bool(real)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
