"""The comparison's tables from hand-made runs, and one tiny real comparison end to end."""

import json
import pathlib

import pytest

from gxpo.experiments import compare


def _write_run(root, name, accs, passes_per_step, seconds_per_step, active=None):
    run = root / "runs" / name
    run.mkdir(parents=True)
    evals = [
        {
            "step": 2 * i,
            "benchmark": "arith",
            "pass@1": a,
            "backward_passes": 2 * i * passes_per_step,
            "wall_seconds": 2 * i * seconds_per_step,
        }
        for i, a in enumerate(accs)
    ]
    steps = range(1, 2 * (len(accs) - 1) + 1)
    metrics = [
        {
            "step": s,
            "clip_frac": 0.01 * s,
            "kl_ref": 0.001 * s,
            "gxpo/active": 1 if active is None or s < active else 0,
            "gxpo/retention_mean": 0.9,
            "gxpo/scale_mean": 1.5,
            "gxpo/inactive_fraction": 0.1,
            "gxpo/cos_corrective_initial": 0.97,
        }
        for s in steps
    ]
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))


def test_tables_from_known_curves(tmp_path):
    # GRPO peaks at 0.5 on its last eval (step 6); GXPO reaches 0.5 at step 2.
    for seed in (0, 1):
        _write_run(tmp_path, f"grpo_s{seed}", [0.2, 0.3, 0.4, 0.5], 1, 10.0)
        _write_run(tmp_path, f"gxpo5_s{seed}", [0.2, 0.5, 0.6, 0.6], 3, 20.0, active=4)
    text = compare.analyze(tmp_path, ["grpo", "gxpo5"])
    assert "GRPO's peak (seed-mean curve): 50.0%" in text
    gxpo_row = next(line for line in text.splitlines() if line.startswith("gxpo5"))
    # steps 2 vs 6 (3x), backward passes 6 vs 6 (1x), wall seconds 40 vs 60 (1.5x)
    assert "3.00x" in gxpo_row and "1.00x" in gxpo_row and "1.50x" in gxpo_row
    assert "60.0 ± 0.0" in gxpo_row  # peak accuracy
    assert "4, 4" in text  # the gate shut off at step 4 in both seeds
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 10_000
    assert (tmp_path / "tables.md").read_text() == text


@pytest.mark.parametrize("bad", ["ppo", "gxpo", "sfpo0x"])
def test_bad_method_names(bad):
    with pytest.raises(ValueError, match="--methods"):
        compare.method_overrides(bad)


def test_tiny_comparison_end_to_end(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2]))
    from configs.tiny import get_config

    c = get_config()
    c.train.steps = 1
    c.eval.every = 0
    compare.run_all(c, tmp_path, ["grpo", "gxpo2"], [0])
    compare.run_all(c, tmp_path, ["grpo", "gxpo2"], [0])  # complete runs are skipped
    text = compare.analyze(tmp_path)
    assert "grpo" in text and "gxpo2" in text
    rows = [json.loads(x) for x in (tmp_path / "runs/gxpo2_s0/metrics.jsonl").open()]
    assert [r["backward_passes"] for r in rows] == [3]
