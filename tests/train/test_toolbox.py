"""The GRPO trainer's toolbox on a tiny random model: PPO epochs, truncated responses out of the
loss, and the loss options reaching the update (the math itself: tests/rl/test_grpo.py)."""

import pathlib
import sys
import zlib

import jax
import numpy as np
import pytest

from gxpo.rl.rewards import RewardStats
from gxpo.train.builders import check
from gxpo.train.logging import read_jsonl
from gxpo.train.trainer import Trainer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fake_rewards import use_text_rewards  # noqa: E402
from train.test_trainer import _config  # noqa: E402


def _alternating_rewards(trainer):
    """Rewards 1, 0, 1, 0, ...: every group of the batch has a nonzero advantage."""

    def score_batch(texts, refs, kinds, format_reward=0.0):
        return np.arange(len(texts)) % 2 == 0, RewardStats(count=len(texts))

    trainer.scorer.score_batch = score_batch
    return trainer


def test_a_second_epoch_binds_the_clip(tmp_path):
    """One mini-batch, one epoch: every ratio is 1, nothing clips. A second pass over the same
    batch is off-policy, and with a large step the clip binds."""
    c = _config("grpo", steps=2, mini_batches=1, checkpoint_every=0)
    c.optimizer.lr = 0.5
    c.loss.clip_eps_low = c.loss.clip_eps_high = 0.01
    c.eval.every, c.eval.at_start = 0, False
    c.data.eval = ()
    trainer = _alternating_rewards(Trainer(c, tmp_path))
    first = trainer.train_step()
    trainer.config.unlock()  # the second step takes two passes over its batch
    trainer.config.train.epochs = 2
    second = trainer.train_step()
    assert first["clip_frac"] == 0.0 and first["approx_kl_old"] == 0.0
    assert second["clip_frac"] > 0.0 and second["approx_kl_old"] != 0.0
    assert second["backward_passes"] - first["backward_passes"] == 2  # GRPO: one per pass


def test_later_epochs_shuffle_whole_groups_by_seed_and_step(tmp_path):
    c = _config("grpo", mini_batches=2, epochs=3)
    trainer = Trainer(c, tmp_path)
    G = c.rollout.responses_per_prompt
    B = c.rollout.prompts_per_step * G
    rows = np.arange(B)
    batch = jax.tree.map(lambda _: rows, trainer.batch_sharding)  # row ids stand in for a batch
    orders = [
        np.concatenate([m.tokens for m in trainer._mini_batches(batch, 0, e)]) for e in range(3)
    ]
    np.testing.assert_array_equal(orders[0], rows)  # the first epoch: rollout order
    for order in orders:
        assert sorted(order) == list(rows)
        groups = order.reshape(-1, G)
        assert (groups == groups[:, :1] + np.arange(G)).all()  # groups stay whole, in order
    again = [
        np.concatenate([m.tokens for m in trainer._mini_batches(batch, 0, e)]) for e in range(3)
    ]
    np.testing.assert_array_equal(np.stack(orders), np.stack(again))


def test_truncated_responses_leave_the_loss(tmp_path):
    c = _config("grpo")
    c.loss.mask_truncated = True
    trainer = Trainer(c, tmp_path)
    examples = next(trainer.train_iter)
    samples = trainer._sample(examples, jax.random.key(3), trainer.rollout_sampling, own_rows=True)
    rewards = np.ones(len(samples.lengths_B), np.float32)
    batch = trainer.make_batch(samples, rewards)
    A = c.rollout.max_new_tokens
    last = np.asarray(samples.out.tokens[:, -1])
    truncated = (samples.lengths_B == A) & ~np.isin(last, trainer.eos_ids)
    assert truncated.any()  # a random model rarely stops; the test needs a cut response
    kept = np.asarray(batch.response_mask).any(axis=1)
    np.testing.assert_array_equal(kept, ~truncated)


@pytest.mark.parametrize(
    "field, value",
    [("loss.advantage_std", "sample"), ("loss.importance_level", "group"),
     ("loss.entropy_coef", -1.0), ("train.epochs", 0), ("eval.top_p", 0.0)],
)  # fmt: skip
def test_bad_toolbox_values_name_the_field(field, value):
    c = _config()
    group, key = field.split(".")
    c[group][key] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check(c)


def test_entropy_bonus_and_sequence_ratio_reach_the_update(tmp_path):
    c = _config("grpo", steps=1, mini_batches=1, checkpoint_every=0)
    c.loss.entropy_coef = 0.5
    c.loss.importance_level = "sequence"
    c.eval.every, c.eval.at_start = 0, False
    c.data.eval = ()
    trainer = use_text_rewards(Trainer(c, tmp_path))
    trainer.run()
    row = read_jsonl(tmp_path / "metrics.jsonl")[0]
    # loss = pg + kl_coef * kl - 0.5 * entropy (token-mean): the bonus is in the logged loss.
    want = row["pg_loss"] + c.loss.kl_coef * row["kl_ref"] - 0.5 * row["entropy"]
    np.testing.assert_allclose(row["loss"], want, rtol=1e-4, atol=1e-6)


def test_the_authors_switch_sets_their_recipe_and_checks():
    from configs import qwen2p5_1p5b, smollm2_arith  # noqa: PLC0415

    paper, authors = smollm2_arith.get_config(), smollm2_arith.get_config("authors")
    check(authors)
    changed = {
        "train.mini_batches": (1, 4),
        "policy_update.gxpo.probe_state": ("keep", "restore"),
        "policy_update.gxpo.retention": ("gradient", "update"),
        "policy_update.gate.statistic": ("corrective_norm", "entropy"),
        "policy_update.gate.patience": (1, 3),
        "loss.kl_coef": (1e-3, 0.0),
        "loss.entropy_coef": (0.0, 1e-3),
        "optimizer.weight_decay": (0.0, 0.01),
        "eval.top_p": (1.0, 0.7),
    }
    for path, values in changed.items():
        group, field = path.rsplit(".", 1)
        got = tuple(c[group.split(".")[0]] for c in (paper, authors))
        for part in group.split(".")[1:]:
            got = tuple(g[part] for g in got)
        assert tuple(g[field] for g in got) == values, path
    # The model's own launcher values go on top of the common recipe, and the GPU presets
    # take the new batch: 64 x 8 in 4 updates.
    gpu = qwen2p5_1p5b.get_config("h100x1,authors")
    check(gpu)
    assert (gpu.rollout.prompts_per_step, gpu.rollout.responses_per_prompt) == (64, 8)
    with pytest.raises(ValueError, match="allowed parts are h100x4"):
        qwen2p5_1p5b.get_config("h100x2,authors")
    with pytest.raises(ValueError, match="authors"):
        smollm2_arith.get_config("paper")


def test_filter_groups_refills_the_batch_and_overlong_penalty_scores(tmp_path):
    """The first round's groups are all uniform, the next one's all vary: one resampling round
    fills the batch with varied groups only. The overlong penalty is a logged reward part."""
    c = _config("grpo")
    c.rollout.filter_groups = True
    c.reward.overlong_buffer, c.reward.overlong_penalty = 4, 0.5
    trainer = Trainer(c, tmp_path)
    calls = []

    def score_batch(texts, refs, kinds, format_reward=0.0):
        calls.append(len(texts))
        varied = len(calls) > 1
        return (np.arange(len(texts)) % 2 == 0) & varied, RewardStats(count=len(texts))

    trainer.scorer.score_batch = score_batch
    position = trainer.train_iter.state()
    examples = next(trainer.train_iter)
    batch, metrics = trainer.rollout(examples, jax.random.key(0))
    assert metrics["filtered_fraction"] == 1.0 and metrics["resample_rounds"] == 1
    assert metrics["varied_groups"] == 1.0 and len(calls) == 2
    G = c.rollout.responses_per_prompt
    adv = np.asarray(batch.advantages).reshape(-1, G)
    assert (np.ptp(adv, axis=1) > 0).all()  # every group of the batch teaches something
    assert trainer.train_iter.state() != position  # the extra prompts came from the data
    # The overlong part: -0.5 * (length - 4) / 4 beyond 4 of the 8 new tokens, in the mean.
    samples = trainer._sample(examples, jax.random.key(1), trainer.rollout_sampling, own_rows=True)
    _, m, _ = trainer.score(examples, samples)
    want = -0.5 * np.clip((samples.lengths_B - 4) / 4, 0, 1)
    np.testing.assert_allclose(m["reward/overlong"], want.mean(), rtol=1e-6)


def _some_flat_groups(trainer):
    """`use_text_rewards` with every third group of a rollout batch flattened to 0: groups the
    filter drops (the resampled rows draw anew, so a round can pass)."""
    G = trainer.config.rollout.responses_per_prompt
    score = use_text_rewards(trainer).scorer.score_batch

    def score_batch(texts, refs, kinds, format_reward=0.0):
        rewards, stats = score(texts, refs, kinds, format_reward)
        if len(rewards) % G == 0:
            groups = rewards.reshape(-1, G)  # a view
            groups[[zlib.crc32(t.encode()) % 3 == 0 for t in texts[::G]]] = 0.0
        return rewards, stats

    trainer.scorer.score_batch = score_batch
    return trainer


def test_resume_is_bit_exact_with_epochs_and_filtering(tmp_path):
    def config(steps):
        c = _config("gxpo", steps=steps, checkpoint_every=0, epochs=2)
        c.rollout.filter_groups = True
        c.eval.every, c.eval.at_start = 0, False
        c.data.eval = ()
        return c

    straight = _some_flat_groups(Trainer(config(3), tmp_path / "a"))
    straight.run()
    _some_flat_groups(Trainer(config(2), tmp_path / "b")).run()
    resumed = _some_flat_groups(Trainer(config(3), tmp_path / "b"))
    assert resumed.step == 2
    resumed.run()
    keep = straight.state._replace(wall_seconds=0.0), resumed.state._replace(wall_seconds=0.0)
    for a, b in zip(*map(jax.tree.leaves, keep)):
        np.testing.assert_array_equal(a, b)
    rows = [read_jsonl(tmp_path / d / "metrics.jsonl") for d in "ab"]
    assert [r["step"] for r in rows[1]] == [1, 2, 3]
    assert any(r["filtered_fraction"] > 0 for r in rows[0])  # the filter did drop groups
    for ra, rb in zip(*rows):
        assert ra["loss"] == rb["loss"] and ra["resample_rounds"] == rb["resample_rounds"]
