"""Rewards from a response's text, for tests whose random or untrained model never answers right.

A real scorer gives such a model 0 everywhere: equal rewards in every group, zero advantages,
zero gradient, and a step that cannot show that it trains. `text_rewards` gives each response a
coin from a hash of its text, and breaks each group whose coins all fell alike.
"""

from __future__ import annotations

import zlib

import numpy as np

from gxpo.rl.rewards import RewardStats


def text_rewards(texts: list[str], group_size: int) -> np.ndarray:
    """0/1 per text from its hash; in a batch of whole groups, no group has all rewards equal."""
    rewards = np.array([zlib.crc32(t.encode()) % 2 for t in texts], np.float32)
    if len(rewards) % group_size == 0:  # a rollout batch (an evaluation's need not be)
        groups = rewards.reshape(-1, group_size)  # a view
        groups[groups.min(axis=1) == groups.max(axis=1), 0] += 1
    return rewards


def use_text_rewards(trainer):
    """`trainer` scoring every batch with `text_rewards` (in its rollout groups); returned."""
    G = trainer.config.rollout.responses_per_prompt

    def score_batch(texts, refs, kinds, format_reward=0.0):
        return text_rewards(texts, G), RewardStats(count=len(texts))

    trainer.scorer.score_batch = score_batch
    return trainer
