"""End to end on a tiny random model: every policy update runs, counts its backward passes,
writes its outputs, resumes exactly, and bad configs fail early with a clear message."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from fake_rewards import use_text_rewards

from gxpo.rl.sampler import benchmark_budgets
from gxpo.train.builders import check
from gxpo.train.logging import read_jsonl
from gxpo.train.trainer import Trainer


def _config(name="gxpo", **train):
    from configs.tiny import get_config  # noqa: PLC0415 (configs/ is not a package)

    c = get_config()
    c.policy_update.name = name
    c.policy_update.gate.warmup = 30  # stay active through the test
    c.policy_update.gate.window = 30
    c.train.mini_batches = 2
    for k, v in train.items():
        c.train[k] = v
    return c


@pytest.fixture(autouse=True)
def _configs_on_path(monkeypatch):
    import pathlib

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2]))


@pytest.mark.parametrize("name, evals", [("grpo", 1), ("sfpo", 4), ("gxpo", 3)])
def test_three_steps_complete_and_count_backward_passes(name, evals, tmp_path):
    trainer = use_text_rewards(Trainer(_config(name), tmp_path))
    before = jax.tree.map(np.copy, trainer.state.trainable)
    trainer.run()

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Two mini-batches per step, each 1 (GRPO), K + 1 (SFPO) or 3 (GXPO) evaluations.
    assert [r["backward_passes"] for r in rows] == [2 * evals * s for s in (1, 2, 3)]
    assert all(r["grad_norm"] > 0 for r in rows)
    if name != "grpo":
        assert all(r[f"{name}/active"] == 1 and r[f"{name}/fallback"] == 0 for r in rows)
    assert {"reward_mean", "accuracy", "kl_ref", "clip_frac", "entropy", "wall_seconds"} <= set(
        rows[0]
    )
    evals_rows = read_jsonl(tmp_path / "eval.jsonl")
    assert [r["step"] for r in evals_rows] == [0, 2, 3]
    assert {"pass@1", "pass@2", "maj@n", "n"} <= set(evals_rows[0])
    assert trainer.checkpointer.all_steps() == [2, 3]
    assert json.loads((tmp_path / "config.json").read_text())["policy_update"]["name"] == name
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), trainer.state.trainable, before)
    assert max(jax.tree.leaves(moved)) > 0


def test_sampling_in_chunks_or_refilling_slots_gives_the_same_rollout(tmp_path):
    # A row's draws come from its index in the whole batch: one call, two chunks and the
    # refilling sampler (3 slots for 4 rows) draw the same tokens at temperature 1, and the
    # benchmark's response budgets reach every row alike.
    c = _config()
    c.rollout.benchmark_lengths = "lognormal:3:1.0"
    trainer = Trainer(c, tmp_path)
    examples = next(trainer.train_iter)  # 2 prompts
    sampling = dataclasses.replace(trainer.rollout_sampling, num_samples=2, max_new_tokens=6)
    assert sampling.temperature == 1.0 and sampling.slots == 0
    calls = [
        dict(sampling=sampling),
        dict(sampling=sampling, chunks=2),
        dict(sampling=dataclasses.replace(sampling, slots=3)),
    ]
    whole, *others = [
        trainer._sample(examples, jax.random.key(1), own_rows=True, rollout=True, **call)
        for call in calls
    ]
    budget = benchmark_budgets(c.rollout.benchmark_lengths, jax.random.key(1), 4, 6)
    lengths = np.asarray(whole.out.lengths)
    assert np.all(lengths <= budget) and len(set(budget.tolist())) > 1
    assert np.any(lengths == budget) and np.any(lengths < 6)
    for other in others:
        assert other.texts == whole.texts and np.array_equal(other.lengths_B, whole.lengths_B)
        for a, b in zip(whole.out, other.out):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype != np.float32:  # tokens, masks, lengths
                np.testing.assert_array_equal(a, b)
                continue
            # float32 log-probs from batches of other sizes: each of a layer's ~4 reductions may
            # round differently, <= 4 * L * eps32 relative to |logp|, doubled.
            L = trainer.model_config.num_layers
            atol = 8 * L * np.finfo(np.float32).eps * float(np.max(np.abs(b)))
            np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    straight = use_text_rewards(Trainer(_config(steps=4, checkpoint_every=0), tmp_path / "a"))
    straight.run()

    first = use_text_rewards(Trainer(_config(steps=2, checkpoint_every=0), tmp_path / "b"))
    first.run()
    resumed = use_text_rewards(Trainer(_config(steps=4, checkpoint_every=0), tmp_path / "b"))
    assert resumed.step == 2
    resumed.run()

    # The whole train state (weights, optimizer state, step, data position, backward passes).
    keep = straight.state._replace(wall_seconds=0.0), resumed.state._replace(wall_seconds=0.0)
    assert jax.tree.structure(keep[0]) == jax.tree.structure(keep[1])
    for a, b in zip(*map(jax.tree.leaves, keep)):
        np.testing.assert_array_equal(a, b)
    rows_a = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    rows_b = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["reward_mean"] == rb["reward_mean"] and ra["loss"] == rb["loss"]
        assert ra["backward_passes"] == rb["backward_passes"]


def test_a_run_killed_before_its_first_checkpoint_logs_each_evaluation_once(tmp_path):
    first = use_text_rewards(Trainer(_config(steps=1), tmp_path))
    first.evaluate()  # the evaluation at step 0 is logged, then the run dies before a save
    first.close()
    assert first.checkpointer.latest_step() is None
    again = use_text_rewards(Trainer(_config(steps=1), tmp_path))
    assert again.step == 0
    again.run()
    assert [r["step"] for r in read_jsonl(tmp_path / "eval.jsonl")] == [0, 1]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


BAD_CONFIGS = [
    ("policy_update.name", "gpxo", "policy_update.name"),
    # The policy update's own checks, as the config field: the updates named by the field.
    ("policy_update.gxpo.virtual_depth", 1, r"config\.policy_update\.gxpo\.virtual_depth=1: must"),
    ("policy_update.gxpo.reposition", 1.5, r"config\.policy_update\.gxpo\.reposition=1\.5: must"),
    (
        "policy_update.gxpo.probe_state",
        "reset",
        r"config\.policy_update\.gxpo\.probe_state='reset'",
    ),
    ("policy_update.sfpo.fast_steps", 0, r"config\.policy_update\.sfpo\.fast_steps=0: must"),
    ("policy_update.gate.window", 0, r"config\.policy_update\.gate\.window=0: must"),
    ("rollout.responses_per_prompt", 1, "responses_per_prompt"),
    ("rollout.top_p", 0.9, "top_p"),
    ("rollout.decode_slots", -1, "rollout.decode_slots"),
    ("rollout.benchmark_lengths", "lognormal:0:1", "rollout.benchmark_lengths"),
    ("rollout.benchmark_lengths", "uniform:3", "rollout.benchmark_lengths"),
    ("train.mini_batches", 3, "mini_batches"),
    ("model.path", "/no/such/checkpoint", "model.path"),
    ("model.preset", "gpt5", "model.preset"),
    ("model.dtype", "float16", "model.dtype"),
    ("data.train", "mmlu", "data.train"),
    ("data.eval", ("arith", "aime"), "data.eval"),
    ("data.template", "no placeholder", "data.template"),
    ("loss.kl_estimator", "k2", "kl_estimator"),
    ("loss.aggregation", "mean", "aggregation"),
    ("optimizer.lr", 0.0, "optimizer.lr"),
    ("optimizer.schedule", "step", "schedule"),
    ("eval.pass_k", (1, 8), "pass_k"),
]


@pytest.mark.parametrize("field, value, named", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_raises_naming_the_field(field, value, named):
    c = _config()
    group, _, key = field.rpartition(".")
    node = c
    for part in group.split("."):
        node = node[part]
    node[key] = value
    if group.startswith("policy_update.") and group != "policy_update.gate":
        c.policy_update.name = group.split(".")[1]  # only the policy update in use is built
    with pytest.raises(ValueError, match=named):
        check(c)


def test_missing_data_file_names_the_path(tmp_path):
    c = _config()
    c.data.train = "gsm8k"
    c.data.train_split = "train"
    c.data.data_dir = str(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError), match=str(tmp_path)):
        Trainer(c, tmp_path / "run")


def test_packed_responses_give_the_unpacked_update(tmp_path):
    """`train.pack_responses` runs the same math: one GXPO step (two mini-batches, three
    gradients each, the reference log-probs) moves the adapters the same way."""
    runs = {}
    for pack in (True, False):
        trainer = use_text_rewards(
            Trainer(_config(steps=1, pack_responses=pack), tmp_path / str(pack))
        )
        assert trainer.packed is pack
        before = jax.tree.map(np.copy, trainer.state.trainable)
        trainer.run()
        runs[pack] = trainer
    rows = {p: read_jsonl(tmp_path / str(p) / "metrics.jsonl")[0] for p in runs}
    for key in ("loss", "kl_ref", "entropy", "grad_norm"):
        np.testing.assert_allclose(rows[True][key], rows[False][key], rtol=1e-4, atol=1e-6)
    lr = runs[True].config.optimizer.lr
    for a, b in zip(*(jax.tree.leaves(runs[p].state.trainable) for p in (True, False))):
        # Adam's steps are about lr each: rounding moves them by a small fraction of that.
        np.testing.assert_allclose(a, b, rtol=0, atol=0.05 * lr)
    moved = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), runs[True].state.trainable, before
    )
    assert max(jax.tree.leaves(moved)) > 0.5 * lr
