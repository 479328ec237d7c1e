"""A policy update takes one registry entry: a toy one, defined and registered in this file
alone, trains configs/tiny.py end to end with its own config field, checks and diagnostics."""

import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fake_rewards import use_text_rewards

from gxpo.experiments import compare
from gxpo.train import builders, updates
from gxpo.train.logging import read_jsonl
from gxpo.train.trainer import Trainer


class ToyInfo(NamedTuple):
    grad_evals: jax.Array  # [] int32
    scale: jax.Array  # [] float32


class ToyState(NamedTuple):
    inner_state: optax.OptState
    info: ToyInfo


def scaled_extragradient(
    inner: optax.GradientTransformation, *, scale: float
) -> optax.GradientTransformationExtraArgs:
    """One look-ahead inner step, the gradient there, and the inner step from it, scaled."""
    if not scale > 0:
        raise ValueError(f"toy: `scale` must be > 0, got {scale!r}.")

    def init_fn(params):
        info = ToyInfo(jnp.ones((), jnp.int32), jnp.zeros((), jnp.float32))
        return ToyState(inner.init(params), info)

    def update_fn(updates, state, params=None, *, grad_fn, **extra_args):
        del extra_args
        look, _ = inner.update(updates, state.inner_state, params)
        g1 = grad_fn(optax.apply_updates(params, look))
        step, inner_state = inner.update(g1, state.inner_state, params)
        info = ToyInfo(jnp.full((), 2, jnp.int32), jnp.asarray(scale, jnp.float32))
        return jax.tree.map(lambda u: scale * u, step), ToyState(inner_state, info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2]))
    entry = updates.register(
        updates.PolicyUpdate(
            name="toy",
            factory=lambda inner, gate, *, scale: scaled_extragradient(inner, scale=scale),
            defaults={"scale": 0.5},
            step_buffers=6,
        )
    )
    yield entry
    updates.unregister("toy")


def _config(**toy):
    from configs.tiny import get_config  # noqa: PLC0415 (configs/ is not a package)

    c = get_config()  # after the registration: the toy's group is in the defaults
    c.policy_update.name = "toy"
    c.policy_update.toy.update(toy)
    c.data.eval = ()
    c.eval.at_start = False
    c.train.steps = 2
    c.train.mini_batches = 2
    c.train.checkpoint_every = 0
    return c


def test_a_registered_policy_update_trains_the_tiny_config(toy, tmp_path):
    c = _config(scale=0.25)
    assert builders.step_buffers(c) == 6  # what the memory estimate counts
    assert compare.method_overrides("toy") == {"policy_update.name": "toy"}
    trainer = use_text_rewards(Trainer(c, tmp_path))  # nonzero advantages
    before = jax.tree.map(np.copy, trainer.state.trainable)
    trainer.run()

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["toy/scale"] == 0.25 for r in rows)  # the config field reached the combinator
    # Two mini-batches per step, each two gradient evaluations.
    assert [r["grad_evals"] for r in rows] == [2, 2]
    assert [r["backward_passes"] for r in rows] == [4, 8]
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), trainer.state.trainable, before)
    assert max(jax.tree.leaves(moved)) > 0


def test_a_registered_policy_updates_checks_name_its_config_field(toy):
    with pytest.raises(ValueError, match=r"config\.policy_update\.toy\.scale=-1\.0: must be > 0"):
        builders.check(_config(scale=-1.0))
    with pytest.raises(ValueError, match="register: a policy update 'toy' exists"):
        updates.register(toy)
    with pytest.raises(ValueError, match=r"allowed values are \('grpo', 'sfpo', 'gxpo', 'toy'\)"):
        updates.get("toyy")
