"""Optional mirroring of a run's metrics to Weights & Biases (`config.logging.wandb_project`).

The run's own records stay metrics.jsonl, eval.jsonl and TensorBoard (`gxpo.train.logging`);
this sends the same rows to a wandb run, which `WANDB_MODE=offline` keeps on disk (under
`<workdir>/wandb/`, for `wandb sync`). A resumed run continues the same wandb run: its id is
kept in `<workdir>/wandb_run_id`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_ID_FILE = "wandb_run_id"


class WandbMirror:
    """One wandb run per work directory; `log` sends one metrics or evaluation row.

    Args:
      project: the wandb project.
      workdir: the run's work directory (wandb's files go under it).
      config: the run's config, recorded with the wandb run.
    """

    def __init__(self, project: str, workdir: str | Path, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ValueError(
                f"config.logging.wandb_project={project!r} needs Weights & Biases: pip install "
                "wandb (or '' for TensorBoard and JSONL only)"
            ) from None
        workdir = Path(workdir)
        id_file = workdir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=project,
            name=workdir.name,
            id=run_id,
            resume="allow",
            dir=str(workdir),
            config=dict(config),
        )

    def log(self, row: Mapping[str, Any], prefix: str = "") -> None:
        """The row's numbers at its `step` (eval rows under `eval/<benchmark>/`)."""
        numbers = {
            prefix + k: v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.run.log(numbers, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()
