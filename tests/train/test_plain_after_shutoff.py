"""Once the gate has shut extrapolation off for good, the Trainer runs the plain inner step's own
program. From the same train state it gives what the policy update's `lax.cond` gives: the same
optimizer state, counters and metrics bit for bit, and new weights one rounding apart at most
(it rounds them as GRPO's program does, bit for bit); a resumed run picks it from its restored
state."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fake_rewards import use_text_rewards
from flax import nnx

from gxpo.models import get_preset, init_model
from gxpo.models.lora import split_trainable
from gxpo.optim import GateState, ZScoreGate
from gxpo.train import builders, updates
from gxpo.train import loss as loss_lib
from gxpo.train.defaults import base_config
from gxpo.train.logging import read_jsonl
from gxpo.train.state import init_state
from gxpo.train.trainer import Trainer

B, P, A = 4, 6, 5  # 2 prompts x 2 responses, prompt and response tokens


@pytest.fixture(autouse=True)
def _configs_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2]))


def _gate_state(on: bool, count: int) -> GateState:
    return (
        ZScoreGate(window=2, warmup=0)
        .init()
        ._replace(on=jnp.asarray(on), count=jnp.asarray(count, jnp.int32))
    )


class _State:
    """An opt state's shape as `is_off` reads it."""

    def __init__(self, gate):
        self.gate = gate


@pytest.mark.parametrize(
    "fallback, cap, on, count, off",
    [
        ("permanent", None, True, 5, False),
        ("permanent", None, False, 5, True),  # fired: off for good
        ("temporary", None, False, 5, False),  # fired: re-arms later
        ("temporary", 6, False, 5, False),  # below the cap: re-arms later
        ("temporary", 5, False, 5, True),  # at the cap: off for good
        ("permanent", 5, True, 4, False),
    ],
)
def test_off_for_good_reads_the_gate_and_its_mode(fallback, cap, on, count, off):
    gate = ZScoreGate(window=2, warmup=0, fallback=fallback, max_active_steps=cap)

    plain = updates.gated_plain_step(optax.identity(), optax.identity(), gate)
    assert plain.is_off(_State(_gate_state(on, count))) is off


def test_only_gated_updates_have_a_plain_step():
    c = base_config()
    for name, has in (("grpo", False), ("gxpo", True), ("sfpo", True)):
        c.policy_update.name = name
        assert (builders.plain_step(c, builders.policy_update(c)) is not None) is has
    c.policy_update.gate.enabled = False  # never shuts off
    assert builders.plain_step(c, builders.policy_update(c)) is None

    # SFPO as its authors run it: a plain step is a pass over every mini-batch, not one step.
    entry = updates.get("sfpo")
    assert entry.plain_step(None, optax.sgd(1.0), ZScoreGate(), mini_batches=2) is None


@pytest.mark.parametrize("name", ["gxpo", "sfpo"])
@pytest.mark.parametrize("fallback", ["permanent", "temporary"])
def test_plain_step_is_the_plain_branch_bit_for_bit(name, fallback):
    """On a small problem, `tx.update` (its `lax.cond`) and the plain step after shutoff return
    the same updates and state, the temporary gate at its cap counting its idle steps alike."""
    c = base_config()
    c.optimizer.lr = 1e-2
    c.policy_update.name = name
    c.policy_update.gate.fallback = fallback
    c.policy_update.gate.max_active_steps = 1
    tx = builders.policy_update(c)
    plain = builders.plain_step(c, tx)
    target = {"a": jnp.linspace(-1.0, 1.0, 7), "b": jnp.full((2, 3), 0.5)}
    grad_fn = jax.grad(lambda p: sum(jnp.sum((p[k] - target[k]) ** 4) for k in p))
    params = {"a": jnp.zeros(7), "b": jnp.ones((2, 3))}
    cond_update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))
    plain_update = jax.jit(lambda g, s, p: plain.tx.update(g, s, p, grad_fn=grad_fn))

    state = tx.init(params)
    for step in range(4):
        assert plain.is_off(state) is (step > 0)
        g = grad_fn(params)
        updates, new_state = cond_update(g, state, params)
        if step:
            outs = (updates, new_state), plain_update(g, state, params)
            assert jax.tree.structure(outs[0]) == jax.tree.structure(outs[1])
            for a, b in zip(*map(jax.tree.leaves, outs)):
                np.testing.assert_array_equal(a, b)
        params, state = optax.apply_updates(params, updates), new_state
    assert int(state.gate.off_steps) == (3 if fallback == "temporary" else 0)


def _model_and_batch():
    model_config = get_preset("tiny", lora_rank=4, lora_alpha=8.0)
    _, trainable, frozen = split_trainable(init_model(model_config, seed=0))
    trainable, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
    keys = iter(jax.random.split(jax.random.key(1), 64))  # B != 0: every adapter has a gradient
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), trainable)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_config.vocab_size, (B, P + A)).astype(np.int32)
    tokens[:, :P] = np.repeat(tokens[::2, :P], 2, axis=0)
    response_len = np.array([A, 2, 4, 1])
    pos = np.arange(P + A)
    mask = (pos >= 1) & (pos < P + response_len[:, None])
    response_mask = (pos[P - 1 :] >= P) & (pos[P - 1 :] < P + response_len[:, None])
    old, ref = loss_lib.batch_logprobs(
        trainable, frozen, None, jnp.asarray(tokens), jnp.asarray(mask),
        model_config=model_config, temperature=1.0, window=A + 1, with_old=True,
        reference="adapters_off", group_size=2,
    )  # fmt: skip
    batch = loss_lib.Batch(
        jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(response_mask),
        jnp.asarray([1.0, -1.0, 0.5, -0.5], jnp.float32), old, ref,
    )  # fmt: skip
    return model_config, trainable, frozen, batch


def _steps(c, model_config, tx):
    return builders.update_step(c, model_config, tx)


def test_plain_program_gives_the_cond_programs_step_and_grpos():
    model_config, trainable, frozen, batch = _model_and_batch()
    c = base_config()
    c.rollout.responses_per_prompt, c.rollout.max_new_tokens = 2, A
    c.optimizer.lr, c.loss.kl_coef = 1e-2, 1e-2
    c.policy_update.gate.max_active_steps = 1  # one extrapolating step, then off for good
    c.policy_update.name = "grpo"
    grpo_update = _steps(c, model_config, builders.policy_update(c))
    c.policy_update.name = "gxpo"
    tx = builders.policy_update(c)
    plain = builders.plain_step(c, tx)
    cond_update, plain_update = _steps(c, model_config, tx), _steps(c, model_config, plain.tx)

    own = jax.tree.map(jnp.copy, trainable)  # the steps donate their state
    state = init_state(own, tx.init(own), {"position": 0})
    assert not plain.is_off(state.opt_state)
    state, metrics = cond_update(state, frozen, batch)
    assert int(metrics["gxpo/active"]) == 1 and plain.is_off(state.opt_state)

    for i in range(2):  # each program steps from the same state (the cond program's)
        before = jax.device_get(state)
        plain_in, grpo_in = (jax.tree.map(jnp.copy, state) for _ in range(2))
        plain_state, plain_m = jax.device_get(plain_update(plain_in, frozen, batch))
        grpo_in = grpo_in._replace(opt_state=grpo_in.opt_state.inner_state)
        grpo_state, grpo_m = jax.device_get(grpo_update(grpo_in, frozen, batch))
        state, cond_m = cond_update(state, frozen, batch)
        cond_state = jax.device_get(state)

        # The same optimizer state (inner moments, gate, info), counters and metrics, bit for
        # bit; the policy update's diagnostics as its plain branch reports them.
        same = (cond_state._replace(trainable=None), plain_state._replace(trainable=None))
        assert jax.tree.structure(same[0]) == jax.tree.structure(same[1])
        for a, b in zip(*map(jax.tree.leaves, same)):
            np.testing.assert_array_equal(a, b)
        assert cond_m.keys() == plain_m.keys()
        for key in cond_m:
            np.testing.assert_array_equal(cond_m[key], plain_m[key], err_msg=key)
        assert int(plain_m["gxpo/active"]) == 0 and int(plain_m["grad_evals"]) == 1
        assert int(plain_state.backward_passes) == 3 + i + 1
        # The new weights: under the cond the update u leaves the branch rounded, then the step
        # adds it; the plain program fuses theta + u into one FMA, as GRPO's does. One rounding
        # apart at most: |delta| <= eps32 (|theta'| + |u|) (observed: 1 ulp on a fifth of them).
        for new, cond_new, old in zip(
            *(jax.tree.leaves(s.trainable) for s in (plain_state, cond_state, before))
        ):
            bound = np.finfo(np.float32).eps * (np.abs(cond_new) + np.abs(cond_new - old))
            assert np.all(np.abs(new - cond_new) <= bound)
            assert np.any(new != old)  # it did train
        # ... and the plain program is GRPO's step, bit for bit, on the inner optimizer's state.
        for a, b in zip(
            *map(
                jax.tree.leaves,
                (grpo_state, plain_state._replace(opt_state=plain_state.opt_state.inner_state)),
            )
        ):
            np.testing.assert_array_equal(a, b)
        for key in grpo_m:
            np.testing.assert_array_equal(grpo_m[key], plain_m[key], err_msg=key)


def _tiny_config(steps):
    from configs.tiny import get_config  # noqa: PLC0415 (configs/ is not a package)

    c = get_config()
    c.policy_update.name = "gxpo"
    c.policy_update.gate.max_active_steps = 1  # the first update extrapolates, then plain
    c.train.mini_batches = 2
    c.train.steps = steps
    c.data.eval = ()
    return c


def _trainer(c, workdir):
    trainer = use_text_rewards(Trainer(c, workdir))  # rewards from the text: gradients
    programs = []
    for attr in ("update", "update_plain"):  # which program runs each update
        fn = getattr(trainer, attr)
        setattr(trainer, attr, lambda *a, fn=fn, attr=attr: programs.append(attr) or fn(*a))
    return trainer, programs


def test_trainer_runs_the_plain_program_after_shutoff_and_after_resume(tmp_path):
    first, programs = _trainer(_tiny_config(steps=2), tmp_path)
    first.run()
    # Step 1: the first update extrapolates and reaches the cap, the second is the cond's plain
    # branch; from step 2 on, the plain program.
    assert programs == ["update", "update", "update_plain", "update_plain"]
    resumed, programs = _trainer(_tiny_config(steps=3), tmp_path)
    assert resumed.step == 2
    resumed.run()
    assert programs == ["update_plain", "update_plain"]  # from the restored state

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["gxpo/active"] for r in rows] == [0.5, 0.0, 0.0]
    assert [r["grad_evals"] for r in rows] == [2.0, 1.0, 1.0]
    assert [r["backward_passes"] for r in rows] == [4, 6, 8]
    assert all(r["gxpo/initial_norm"] > 0 for r in rows)
