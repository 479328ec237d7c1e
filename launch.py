"""Trains with GRPO / SFPO / GXPO from a config file.

    python launch.py --config=configs/smollm2_arith.py [--config.policy_update.name=grpo]
                     [--workdir=runs/NAME] [--noresume]

A work directory that holds a checkpoint is resumed from its newest intact one (a corrupt newer
one is named and moved aside to checkpoints/<step>.corrupt-<n>) unless --noresume, which deletes
its checkpoints, moved-aside ones included.
A user's error (bad config, missing file, wrong model path) is one line and exit status 2;
--verbose shows its traceback.
"""

import shutil
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags

from gxpo import cli
from gxpo.train.builders import check
from gxpo.train.trainer import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_RESUME = flags.DEFINE_bool("resume", True, "Resume from the work directory's checkpoint.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
    config = _CONFIG.value
    check(config)  # before any loading, compiling or deleting
    name = Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    workdir = Path(_WORKDIR.value or config.train.workdir or f"runs/{name}")
    if not _RESUME.value and (workdir / "checkpoints").exists():
        shutil.rmtree(workdir / "checkpoints")
    Trainer(config, workdir, checked=True).run()


if __name__ == "__main__":
    cli.run(main)
