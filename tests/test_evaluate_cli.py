"""`python -m gxpo.evaluate`: a run's checkpoint on its own config with --config.* overrides,
or a config's initial model; results in their own eval.jsonl, never the run's; one clear error
per bad input."""

import os
import subprocess
import sys

import pytest
from tiny_runs import ROOT, make_run, tiny_config

from gxpo.evaluate import RUN_CONFIG_FILE, _with_run_config, evaluate
from gxpo.train.logging import read_jsonl


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    make_run(workdir, lora_rank=4, steps=(1,))
    return workdir


def _eval_config():
    c = tiny_config()
    c.data.eval = ("arith",)
    c.eval.max_problems = 2
    return c


def test_cli_evaluates_a_checkpoint_with_overrides_and_leaves_the_run_alone(run):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = subprocess.run(
        [sys.executable, "-m", "gxpo.evaluate", f"--workdir={run}"]
        + ["--config.data.eval=arith", "--config.eval.max_problems=2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"Evaluation of {run} at step 1:" in proc.stdout
    table = proc.stdout.split("step 1:\n", 1)[1].splitlines()
    assert table[0].split()[:4] == ["benchmark", "n", "pass@1", "pass@2"]
    assert [line.split()[0] for line in table[2:4]] == ["arith", "Average"]
    rows = read_jsonl(run / "evaluations" / "step_1" / "eval.jsonl")
    # The override's benchmark list and size, on the run's own sampling (tiny: n = 2).
    assert [(r["step"], r["benchmark"], r["problems"], r["n"]) for r in rows] == [
        (1, "arith", 2, 2)
    ]
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # config.json, metrics.jsonl, eval.jsonl untouched


def test_a_configs_initial_model_is_evaluated_at_step_0(tmp_path):
    results, step = evaluate(_eval_config(), tmp_path / "out")
    assert step == 0 and list(results) == ["arith"]
    rows = read_jsonl(tmp_path / "out" / "eval.jsonl")
    assert [(r["step"], r["benchmark"]) for r in rows] == [(0, "arith")]
    assert rows[0]["pass@1"] == results["arith"]["pass@1"]
    assert not (tmp_path / "out" / "config.json").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_bad_inputs_raise_one_clear_error(run, tmp_path):
    c, out = _eval_config(), tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        evaluate(c, out, run=tmp_path / "nowhere")
    fresh = tmp_path / "fresh"  # a run that has not saved yet
    fresh.mkdir()
    (fresh / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint"):
        evaluate(c, out, run=fresh)
    with pytest.raises(ValueError, match=r"no checkpoint of step 5 \(--step\); its steps: \[1\]"):
        evaluate(c, out, run=run, step=5)
    with pytest.raises(ValueError, match=r"--step needs --workdir"):
        evaluate(c, out, step=1)
    with pytest.raises(ValueError, match=r"the run's own work directory"):
        evaluate(c, run, run=run)
    with pytest.raises(ValueError, match=r"holds a training run"):
        evaluate(c, run)  # a config's evaluation into a run's directory
    c.data.eval = ()
    with pytest.raises(ValueError, match=r"config\.data\.eval is empty"):
        evaluate(c, out, run=run)
    assert not out.exists()  # every error came before any writing


def test_workdir_alone_reads_the_runs_config_through_the_config_flag():
    argv = ["evaluate", "--workdir", "runs/a", "--config.eval.n_samples=8"]
    assert _with_run_config(argv) == [
        "evaluate",
        f"--config={RUN_CONFIG_FILE}:runs/a",
        *argv[1:],
    ]
    assert _with_run_config(["e", "--workdir=runs/a"])[1] == f"--config={RUN_CONFIG_FILE}:runs/a"
    both = ["e", "--config=configs/tiny.py", "--workdir=runs/a"]
    assert _with_run_config(both) == both  # main refuses the pair with one line


@pytest.mark.parametrize("bonus", [0.0, 0.2])
def test_a_run_from_before_reward_functions_loads_with_the_same_reward(bonus, tmp_path):
    import json  # noqa: PLC0415

    from gxpo.train.run_state import load_config  # noqa: PLC0415

    values = json.loads(tiny_config().to_json())
    values["loss"]["format_reward"] = bonus  # the field a run wrote before `reward.functions`
    del values["reward"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = load_config(tmp_path)
    assert "format_reward" not in config.loss
    want = (("correct", "boxed_format"), (1.0, bonus)) if bonus else (("correct",), ())
    assert (tuple(config.reward.functions), tuple(config.reward.weights)) == want
