"""Work directories of tiny random-model runs, made without a training step (no compile).

`make_run` builds a `Trainer` on a `configs/tiny.py` config and saves checkpoints of states
whose trained weights are moved at random: what a trained run leaves behind (config.json and
`checkpoints/<step>/`, written by the Trainer's own `save`), seconds instead of minutes.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np

from gxpo.train.loss import merge_weights
from gxpo.train.state import advance
from gxpo.train.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(lora_rank: int = 4):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from configs.tiny import get_config  # noqa: PLC0415 (configs/ is not a package)

    c = get_config()
    c.model.lora_rank = lora_rank
    c.policy_update.name = "grpo"
    c.data.eval = ()  # the evaluate tests name their benchmarks with an override
    return c


def make_run(workdir: pathlib.Path, lora_rank: int = 4, steps=(1, 2)) -> dict[int, dict]:
    """Saves one checkpoint per step of `steps`, each with the trained weights moved by fresh
    noise (LoRA B starts at zero: the adapters then change the logits); returns every step's
    full weights (base and trained merged), to compare an export with."""
    trainer = Trainer(tiny_config(lora_rank), workdir)
    weights = {}
    scale = 0.3 if lora_rank else 0.02
    for step in steps:
        leaves, tree = jax.tree.flatten(trainer.state.trainable)
        rng = np.random.default_rng(step)
        moved = [x + scale * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]
        state = trainer.state._replace(trainable=jax.tree.unflatten(tree, moved))
        trainer.state = advance(
            state,
            step=step,
            data=trainer.train_iter.state(),
            seconds=1.0,
            scalar_sharding=trainer.scalar_sharding,
        )
        trainer.save()
        weights[step] = merge_weights(trainer.state.trainable, trainer.frozen)
    trainer.close()
    return weights
