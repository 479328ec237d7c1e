"""Run writer (JSONL + TensorBoard), resume truncation, progress bar and plots."""

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.image import imread

from gxpo.train import plots
from gxpo.train.logging import (
    EVAL_FILE,
    METRICS_FILE,
    STEP_LOGS,
    TENSORBOARD_DIR,
    ProgressBar,
    RunLogger,
    read_jsonl,
)


class Info(NamedTuple):  # stands in for an optimizer's state.info
    active: jnp.ndarray
    gate_z: jnp.ndarray


def step_metrics(step):
    return {
        "reward_mean": jnp.float32(0.25 * step),
        "accuracy": np.float64(0.5),
        "backward_passes": jnp.int32(3 * (step + 1)),
        "wall_seconds": 1.5 * (step + 1),
        "loss": {"pg_loss": jnp.array([0.125]), "kl_ref": jnp.float32(0.0)},
        "gxpo": Info(active=jnp.bool_(True), gate_z=jnp.float32(-0.5)),
    }


def tensorboard_scalars(logdir):
    """(tag, step, value) of every scalar in the event files, read as TFRecords."""
    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, payload, payload crc
            for value in event.summary.value:
                found.append((value.tag, event.step, value.simple_value))
    return found


def test_writer_round_trips_and_writes_tensorboard(tmp_path):
    with RunLogger(tmp_path) as log:
        returned = [log.log_metrics(s, step_metrics(s)) for s in range(3)]
        log.log_eval(2, "gsm8k", {"pass@1": jnp.float32(0.25), "pass@4": 0.5, "maj@4": 0.5, "n": 4})
    rows = read_jsonl(tmp_path / METRICS_FILE)
    assert rows == returned
    assert list(rows[1]) == [
        "step", "reward_mean", "accuracy", "backward_passes", "wall_seconds",
        "loss/pg_loss", "loss/kl_ref", "gxpo/active", "gxpo/gate_z",
    ]  # fmt: skip
    assert rows[1]["reward_mean"] == 0.25 and rows[1]["loss/pg_loss"] == 0.125
    assert rows[2]["backward_passes"] == 9 and type(rows[2]["backward_passes"]) is int
    assert rows[0]["gxpo/active"] is True
    assert read_jsonl(tmp_path / EVAL_FILE) == [
        {"step": 2, "benchmark": "gsm8k", "pass@1": 0.25, "pass@4": 0.5, "maj@4": 0.5, "n": 4}
    ]
    scalars = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert ("reward_mean", 2, 0.5) in scalars
    assert ("gxpo/gate_z", 0, -0.5) in scalars
    assert ("eval/gsm8k/pass_1", 2, 0.25) in scalars


def test_resume_drops_rows_of_the_killed_run(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        for s in range(5):
            log.log_metrics(s, step_metrics(s))
            if s % 2 == 0:
                log.log_eval(s, "math500", {"pass@1": 0.1 * s})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 5, "reward_me')  # torn by the kill
    # The checkpoint was at step 3: the resumed run logs steps 3, 4, 5 again.
    with RunLogger(tmp_path, start_step=3, tensorboard=False) as log:
        assert log.last_metrics["step"] == 2 and log.last_metrics["wall_seconds"] == 4.5
        for s in range(3, 6):
            log.log_metrics(s, step_metrics(s))
        log.log_eval(4, "math500", {"pass@1": 0.9})
    assert [r["step"] for r in read_jsonl(tmp_path / METRICS_FILE)] == [0, 1, 2, 3, 4, 5]
    evals = read_jsonl(tmp_path / EVAL_FILE)
    assert [(r["step"], r["pass@1"]) for r in evals] == [(0, 0.0), (2, 0.2), (4, 0.9)]
    # A fresh run (start_step 0) in the same directory starts clean.
    RunLogger(tmp_path, tensorboard=False).close()
    assert read_jsonl(tmp_path / METRICS_FILE) == []


def test_resume_truncates_every_step_log(tmp_path):
    for name in STEP_LOGS:
        rows = [{"step": s, "x": s} for s in (0, 1, 2, 3)] + [{"no_step": 1}]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    RunLogger(tmp_path, start_step=2, tensorboard=False).close()  # resumed from step 1
    for name in STEP_LOGS:
        assert [r["step"] for r in read_jsonl(tmp_path / name)] == [0, 1], name


def test_only_process_zero_writes(tmp_path):
    log = RunLogger(tmp_path / "run", is_main=False)
    row = log.log_metrics(0, step_metrics(0))
    log.log_eval(0, "amc23", {"pass@1": 0.5})
    log.close()
    assert row["backward_passes"] == 3  # still converted for the caller
    assert not (tmp_path / "run").exists()


def test_non_scalar_metric_is_rejected(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="'lengths' has shape"):
        log.log_metrics(0, {"lengths": jnp.arange(4)})
    log.close()


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    code = (
        "import sys; from gxpo.train.logging import RunLogger;"
        f"RunLogger({str(tmp_path)!r}).close(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_progress_bar_shows_reward_and_accuracy(capsys):
    with ProgressBar(4, start_step=1) as bar:
        bar.update({"reward_mean": 0.5, "accuracy": 0.25, "loss": 1.0})
    err = capsys.readouterr().err
    assert "2/4" in err and "reward=0.500" in err and "acc=0.250" in err
    with ProgressBar(4, quiet=True) as bar:
        bar.update({"reward_mean": 0.5})
    assert capsys.readouterr().err == ""


def fake_run(workdir, policy, reward_slope, seconds_per_step):
    with RunLogger(workdir, tensorboard=False) as log:
        for s in range(12):
            log.log_metrics(
                s,
                {
                    "reward_mean": min(1.0, 0.1 + reward_slope * s + 0.05 * (s % 3)),
                    "backward_passes": (3 if policy == "gxpo" else 1) * (s + 1),
                    "wall_seconds": seconds_per_step * (s + 1),
                },
            )
            if s % 4 == 3:
                for bench, base in (("math500", 0.3), ("gsm8k", 0.5)):
                    log.log_eval(s, bench, {"pass@1": base + reward_slope * s, "n": 4})
    (Path(workdir) / "config.json").write_text(json.dumps({"policy_update": {"name": policy}}))


def test_plots_cli_draws_both_runs(tmp_path, capsys):
    fake_run(tmp_path / "a", "grpo", 0.02, 2.0)
    fake_run(tmp_path / "b", "gxpo", 0.04, 5.0)
    paths = plots.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert sorted(p.name for p in paths) == ["eval_pass1.png", "reward.png"]
    assert all(p.parent == tmp_path / "a" / "plots" for p in paths)
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    for path in paths:
        image = imread(path)
        assert path.stat().st_size > 20_000 and image.shape[1] > 1000
        assert image[..., :3].std() > 0.05  # lines drawn, not a blank canvas
    runs = [plots.load_run(tmp_path / d) for d in "ab"]
    assert [r.label for r in runs] == ["a (grpo)", "b (gxpo)"]
    average = plots._eval_rows(runs[1])["average"]
    # Eval rows carry no backward passes: taken from the training step they follow.
    assert [(r["step"], r["backward_passes"]) for r in average] == [(3, 12), (7, 24), (11, 36)]
    np.testing.assert_allclose(average[0]["pass@1"], 0.4 + 0.04 * 3)
    out = plots.plot_runs([tmp_path / "b"], tmp_path / "elsewhere")
    assert [p.parent for p in out] == [tmp_path / "elsewhere"] * 2


def test_plots_reject_a_directory_without_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_runs([tmp_path])
