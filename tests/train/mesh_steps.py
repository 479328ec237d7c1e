"""Sharded vs single-device update steps and sampling on 8 faked CPU devices (a subprocess of
test_mesh.py: `XLA_FLAGS=--xla_force_host_platform_device_count=8 python mesh_steps.py`).

Prints one JSON object: per mesh shape and policy update, the largest difference from the
single-device step, the params' and optimizer state's shardings, and the compile counts.
Shapes: the key in `gxpo.models.config` (A + 1 = T - P + 1: the update's logits window).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gxpo.models import get_preset, init_model, split_trainable
from gxpo.models.decode import prefill
from gxpo.rl.sampler import SamplingConfig, sample
from gxpo.train import builders
from gxpo.train import loss as loss_lib
from gxpo.train import mesh as mesh_lib
from gxpo.train import rows as rows_lib
from gxpo.train import step as step_lib
from gxpo.train.defaults import base_config
from gxpo.train.state import init_state, state_shardings
from gxpo.train.trainer import batch_logprobs_in_chunks

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
POLICIES = ("grpo", "gxpo")
B, T, P = 8, 16, 8
A = T - P  # response tokens
STEPS = 2

CONFIG = get_preset(
    "tiny", lora_rank=4, lora_alpha=8.0, qkv_bias=True, tie_embeddings=False,
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
)  # fmt: skip


def initial_weights() -> tuple[dict, dict]:
    """Random base and adapters, B != 0 so that every adapter has a gradient."""
    _, trainable, frozen = split_trainable(init_model(CONFIG, seed=0))
    trainable, frozen = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), trainable)
    return trainable, frozen


def make_batch(trainable: dict, frozen: dict) -> loss_lib.Batch:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32)
    tokens[:, :P] = np.repeat(tokens[::2, :P], 2, axis=0)  # groups of 2 responses per prompt
    prompt_len = np.repeat(rng.integers(2, P + 1, B // 2), 2)
    response_len = rng.integers(1, A + 1, B)
    pos = np.arange(T)
    mask = (pos >= P - prompt_len[:, None]) & (pos < P + response_len[:, None])
    response_mask = (pos[P - 1 :] >= P) & (pos[P - 1 :] < P + response_len[:, None])
    old, ref = loss_lib.batch_logprobs(
        trainable, frozen, None, jnp.asarray(tokens), jnp.asarray(mask),
        model_config=CONFIG, temperature=1.0, window=A + 1, with_old=True, reference="adapters_off",
        group_size=2,
    )  # fmt: skip
    advantages = rng.normal(size=B).astype(np.float32)
    # Perturb the old log-probs so the ratio clip binds somewhere.
    old = old + jnp.asarray(rng.normal(scale=0.3, size=old.shape), jnp.float32)
    return loss_lib.Batch(
        jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(response_mask),
        jnp.asarray(advantages), old, ref,
    )  # fmt: skip


def make_tx(name: str):
    loss_fn = functools.partial(
        loss_lib.policy_loss, model_config=CONFIG,
        loss_config=loss_lib.LossConfig(kl_coef=1e-2, max_len=A, group_size=2),
    )  # fmt: skip
    c = base_config()  # adamw(1e-2) behind a 1.0 clip, the gate at (30, 30, 2.0)
    c.policy_update.name, c.optimizer.lr = name, 1e-2
    return builders.policy_update(c), loss_fn


def run_steps(update, state, frozen, batch):
    history = []
    for _ in range(STEPS):
        state, metrics = update(state, frozen, batch)
        history.append((jax.device_get(state.trainable), jax.device_get(metrics)))
    return state.trainable, state.opt_state, history


def max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def spec_of(x) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    trainable0, frozen0 = initial_weights()
    batch0 = make_batch(trainable0, frozen0)
    reference = {}
    for name in POLICIES:
        tx, loss_fn = make_tx(name)
        update = step_lib.make_update_step(tx, loss_fn)
        own = jax.tree.map(jnp.copy, trainable0)
        state = init_state(own, tx.init(own), {"position": 0})
        reference[name] = run_steps(update, state, frozen0, batch0)[2]
    prompt = jnp.asarray(np.asarray(batch0.tokens)[:4, :P])
    prompt_mask = jnp.asarray(np.asarray(batch0.mask)[:4, :P])
    sampling = SamplingConfig(max_new_tokens=6, num_samples=2, temperature=1.0)
    weights0 = loss_lib.merge_weights(trainable0, frozen0)
    sampled = sample(weights0, CONFIG, prompt, prompt_mask, jax.random.key(3), sampling)

    results = {}
    for shape in MESHES:
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(zip(mesh_lib.MESH_AXES, shape))))
        shardings = mesh_lib.weight_shardings(CONFIG, mesh)
        trainable_sh = mesh_lib.like(shardings, trainable0)
        frozen_sh = mesh_lib.like(shardings, frozen0)
        batch_sh = mesh_lib.row_shardings(mesh, B, loss_lib.BATCH_RANKS)
        out = {}
        for name in POLICIES:
            tx, loss_fn = make_tx(name)
            opt_sh = mesh_lib.opt_state_shardings(tx, trainable0, trainable_sh, mesh)
            # A copy: device_put may alias trainable0's buffer, which the step donates.
            trainable = mesh_lib.place(jax.tree.map(jnp.copy, trainable0), trainable_sh)
            frozen = mesh_lib.place(frozen0, frozen_sh)
            opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
            rep = mesh_lib.replicated(mesh)
            state = init_state(trainable, opt_state, {"position": 0}, rep)
            state_sh = state_shardings(state, trainable_sh, opt_sh, rep)
            update = mesh_lib.on_mesh(mesh, step_lib.make_update_step(
                tx, loss_fn,
                in_shardings=(state_sh, frozen_sh, batch_sh),
                out_shardings=(state_sh, rep),
            ))  # fmt: skip
            batch = jax.device_put(batch0, batch_sh)
            trainable, opt_state, history = run_steps(update, state, frozen, batch)
            ref = reference[name]
            adam = opt_state.inner_state if name == "gxpo" else opt_state
            mu = adam[1][0].mu  # chain(clip, adamw): adamw = (scale_by_adam, ...)
            out[name] = {
                "param_diff": max(max_diff(h[0], r[0]) for h, r in zip(history, ref)),
                "metric_diff": {
                    k: max(abs(float(h[1][k]) - float(r[1][k])) for h, r in zip(history, ref))
                    for k in ref[0][1]
                },
                "compiles": update.__wrapped__._cache_size(),
                "out_shardings_kept": all(
                    x.sharding == s
                    for x, s in zip(jax.tree.leaves(trainable), jax.tree.leaves(trainable_sh))
                ),
                "lora_a_q": spec_of(trainable["layers"]["q_proj"]["lora_a"]),
                "lora_b_q": spec_of(trainable["layers"]["q_proj"]["lora_b"]),
                "lora_b_down": spec_of(trainable["layers"]["down_proj"]["lora_b"]),
                "mu_lora_b_q": spec_of(mu["layers"]["q_proj"]["lora_b"]),
                "mu_lora_a_down": spec_of(mu["layers"]["down_proj"]["lora_a"]),
                "count": spec_of(adam[1][0].count),
            }
            if name == "gxpo":
                out[name]["gate_values"] = spec_of(opt_state.gate.values)
                out[name]["active"] = int(history[-1][1]["policy/active"])
        frozen = mesh_lib.place(frozen0, frozen_sh)
        out["kernel_q"] = spec_of(frozen["layers"]["q_proj"]["kernel"])
        out["kernel_down"] = spec_of(frozen["layers"]["down_proj"]["kernel"])
        out["embed"] = spec_of(frozen["embed"])
        out["lm_head"] = spec_of(frozen["lm_head"])
        out["batch_tokens"] = spec_of(jax.device_put(batch0, batch_sh).tokens)
        if shape == MESHES[-1]:  # one compile of the sampler suffices: the richest mesh
            # The sampler on the mesh reads the same (sharded) arrays, draws the same tokens.
            weights = mesh_lib.place(weights0, shardings)
            sharded = mesh_lib.on_mesh(mesh, sample)(
                weights, CONFIG, rows_lib.put_rows(mesh, np.asarray(prompt)),
                rows_lib.put_rows(mesh, np.asarray(prompt_mask)), jax.random.key(3), sampling,
            )  # fmt: skip
            out["sample_tokens_equal"] = bool(np.array_equal(sharded.tokens, sampled.tokens))
            out["sample_logp_diff"] = max_diff(sharded.logprobs, sampled.logprobs)
            # The trainer's log-prob pass in 2 chunks of whole groups, rows over the mesh.
            kw = dict(model_config=CONFIG, temperature=1.0, window=A + 1, with_old=True,
                      reference="adapters_off", group_size=2)  # fmt: skip
            whole = loss_lib.batch_logprobs(trainable0, frozen0, None, batch0.tokens, batch0.mask,
                                            **kw)  # fmt: skip
            chunked = mesh_lib.on_mesh(mesh, batch_logprobs_in_chunks)(
                mesh_lib.place(trainable0, trainable_sh), mesh_lib.place(frozen0, frozen_sh),
                None, rows_lib.put_rows(mesh, np.asarray(batch0.tokens)),
                rows_lib.put_rows(mesh, np.asarray(batch0.mask)), chunks=2, **kw,
            )  # fmt: skip
            out["chunked_logp_diff"] = max(max_diff(a, b) for a, b in zip(chunked, whole))
            # The refilling sampler on the mesh: 8 rows through 4 slots, the same draws.
            refilled = mesh_lib.on_mesh(mesh, sample)(
                weights, CONFIG, rows_lib.put_rows(mesh, np.asarray(prompt)),
                rows_lib.put_rows(mesh, np.asarray(prompt_mask)), jax.random.key(3),
                dataclasses.replace(sampling, slots=4),
            )  # fmt: skip
            out["refill_tokens_equal"] = bool(np.array_equal(refilled.tokens, sampled.tokens))
            out["refill_logp_diff"] = max_diff(refilled.logprobs, sampled.logprobs)
            _, cache = mesh_lib.on_mesh(mesh, prefill)(
                weights, CONFIG, rows_lib.put_rows(mesh, np.asarray(batch0.tokens)),
                rows_lib.put_rows(mesh, np.asarray(batch0.mask)), T + 4,
            )  # fmt: skip
            out["kv_cache"] = spec_of(cache.k)
            out["kv_cache_rule"] = spec_of(
                jax.ShapeDtypeStruct(
                    cache.k.shape, cache.k.dtype,
                    sharding=mesh_lib.kv_cache_sharding(mesh, cache.k.shape),
                )
            )  # fmt: skip
        results["x".join(map(str, shape))] = out
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
