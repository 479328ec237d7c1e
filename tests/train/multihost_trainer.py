"""One process of test_mesh.py's two-process run: the tiny config trains one GXPO step on an
8-device mesh spanning two processes (4 faked CPU devices each, gloo collectives), started by
`jax.distributed.initialize` from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    python multihost_trainer.py WORKDIR OUT_NPZ [--single]

Process 0 saves the trained adapters to OUT_NPZ. `--single`: the same run in one process on
one device, the reference.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]


def config(multihost: bool):
    sys.path.insert(0, str(REPO))
    from configs.tiny import get_config  # noqa: PLC0415 (configs/ is not a package)

    c = get_config()
    c.policy_update.name = "gxpo"
    c.policy_update.gate.warmup = 30  # stays active
    c.rollout.prompts_per_step = 4  # 4 x 2 = 8 rows: one per device
    c.data.eval = ()
    c.eval.at_start = False
    c.train.steps = 1
    c.train.checkpoint_every = 0  # one collective Orbax save, at the end
    c.mesh.multihost = multihost
    return c


def main(workdir: str, out: str, mode: str = "--multi") -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from gxpo.train import rows as rows_lib  # noqa: PLC0415
    from gxpo.train.trainer import Trainer  # noqa: PLC0415

    sys.path.insert(0, str(REPO / "tests"))
    from fake_rewards import use_text_rewards  # noqa: PLC0415 (rewards from the text)

    multihost = mode != "--single"
    trainer = use_text_rewards(Trainer(config(multihost), workdir))
    if multihost:
        assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    assert trainer.mesh.devices.size == jax.device_count()
    trainer.run()
    flat = jax.tree_util.tree_flatten_with_path(trainer.state.trainable)[0]
    arrays = {jax.tree_util.keystr(path): rows_lib.to_host(x) for path, x in flat}  # collective
    if jax.process_index() == 0:
        np.savez(out, **arrays)
    print(f"process {jax.process_index()} done, rows {trainer.update_rows}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
