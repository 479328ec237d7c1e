"""Bring your own reward function and dataset: the config checks that name the field, and one
tiny run that trains on a JSONL file with its own field names, scores with the README's
length-penalty reward (reading a column of the data), evaluates on a file and a registered
benchmark, writes samples.jsonl and mirrors its metrics to Weights & Biases (offline)."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import wandb

from gxpo.train.builders import check
from gxpo.train.logging import read_jsonl
from gxpo.train.trainer import Trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # configs/ and examples/, as from the repo root


def _config():
    from configs.tiny import get_config  # noqa: PLC0415 (configs/ is not a package)

    return get_config()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(n, offset=0):
    return [
        {"q": f"{i} + {i + 1}", "a": 2 * i + 1, "max_chars": 2 + i % 3}
        for i in range(offset, offset + n)
    ]


@pytest.fixture
def files(tmp_path):
    return _jsonl(tmp_path / "sums.jsonl", _rows(6)), _jsonl(tmp_path / "held.jsonl", _rows(4, 6))


def _bad(c, field, message):
    with pytest.raises(ValueError, match=message) as e:
        check(c)
    assert str(e.value).startswith(f"config.{field}=")


def test_config_errors_name_the_field(files, tmp_path, monkeypatch):
    train, held = files
    c = _config()
    c.reward.functions = ("correct", "boxed_format")
    c.reward.weights = (1.0,)
    _bad(c, "reward.weights", r"one weight per entry of config\.reward\.functions \(2\)")
    c.reward.weights = ()
    check(c)  # () = 1.0 each
    c.reward.functions = ("correct", "no_such_module_xyz:f")
    _bad(c, "reward.functions", "'no_such_module_xyz' does not import")
    c.reward.functions = ("examples.rewards:DEFAULT_BUDGET",)
    _bad(c, "reward.functions", "non-callable 'DEFAULT_BUDGET'")
    c.reward.functions = ("accuracy",)
    _bad(c, "reward.functions", "neither a built-in")
    c.reward.functions = ("examples.rewards:length_penalty",)
    check(c)  # imported here, before any model load

    c = _config()
    with c.unlocked():
        c.loss.format_reward = 0.1  # an old config's field
    _bad(c, "loss.format_reward", r"'boxed_format'.*weights=\(1\.0, 0\.1\)")

    c = _config()
    c.data.train = str(tmp_path / "absent.jsonl")
    _bad(c, "data.train", "no such file")
    c.data.train = str(tmp_path / "sums.csv")
    _bad(c, "data.train", r"not a dataset: give 'arith', a registered name")
    c.data.train, c.data.eval = train, (held, "arith", str(tmp_path / "x" / "held.jsonl"))
    (tmp_path / "x").mkdir()
    _jsonl(tmp_path / "x" / "held.jsonl", _rows(1))
    _bad(c, "data.eval", "two benchmarks would be logged as 'held'")
    c.data.eval = (held, "arith")
    check(c)
    c.data.answer_field = ""  # no answers: neither `correct` nor evaluation on a file
    _bad(c, "reward.functions", "'correct' needs reference answers")
    c.reward.functions = ("examples.rewards:length_penalty",)
    _bad(c, "data.answer_field", "data.eval cannot name a file")
    c.data.eval = ("arith",)
    check(c)

    c = _config()
    c.logging.samples_per_step = -1
    _bad(c, "logging.samples_per_step", "must be >= 0")
    c.logging.samples_per_step = 4
    c.logging.wandb_project = "gxpo-test"
    check(c)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    _bad(c, "logging.wandb_project", "pip install wandb")


def test_train_on_a_file_with_a_user_reward(files, tmp_path, monkeypatch):
    train, held = files
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    c = _config()
    c.data.train, c.data.eval = train, (held, "arith")
    c.data.question_field, c.data.answer_field, c.data.answer_kind = "q", "a", "numeric"
    c.data.template = "What is {question}? Answer with just the number."
    c.reward.functions = ("correct", "boxed_format", "examples.rewards:length_penalty")
    c.reward.weights = (1.0, 0.1, 0.5)
    c.logging.samples_per_step = 3
    c.logging.wandb_project = "gxpo-test"
    c.policy_update.name = "grpo"  # the smallest update step to compile: not what is tested
    c.eval.at_start = False
    c.train.steps = 2
    c.train.checkpoint_every = 0
    logged = []  # what reached wandb's own API (offline: it writes a file for `wandb sync`)
    real_log = wandb.sdk.wandb_run.Run.log

    def log(self, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    trainer = Trainer(c, tmp_path / "run")
    assert list(trainer.eval_sets) == ["held", "arith"]  # a file under its stem
    held_examples = trainer.eval_sets["held"]
    assert held_examples[0].question == "6 + 7" and held_examples[0].answer == "13"
    trainer.run()

    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        parts = r["reward/correct"], r["reward/boxed_format"], r["reward/length_penalty"]
        assert r["reward_mean"] == pytest.approx(np.dot((1.0, 0.1, 0.5), parts), abs=1e-6)
        assert r["accuracy"] == r["reward/correct"]
        assert r["reward/length_penalty/errors"] == r["reward/length_penalty/timeouts"] == 0
        assert -1.0 <= r["reward/length_penalty"] <= 0.0
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 1, 2, 2, 2]
    budgets = {f"{r['q']}": r["max_chars"] for r in _rows(6)}
    for s in samples:
        assert set(s) == {
            "step", "prompt", "completion", "answer", "reward", "reward/correct",
            "reward/boxed_format", "reward/length_penalty", "length", "truncated",
        }  # fmt: skip
        budget = budgets[s["prompt"]]  # the reward read the row's max_chars column
        over = max(len(s["completion"]) - budget, 0) / budget
        assert s["reward/length_penalty"] == pytest.approx(-min(over, 1.0))
        assert 1 <= s["length"] <= c.rollout.max_new_tokens
        assert s["truncated"] == (s["length"] == c.rollout.max_new_tokens)  # no end token drawn
        assert str(int(s["prompt"].split()[0]) * 2 + 1) == s["answer"]
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert [(e["step"], e["benchmark"]) for e in evals] == [(2, "held"), (2, "arith")]
    # Weights & Biases got the same numbers, and wrote its offline run.
    assert [step for step, _ in logged] == [1, 2, 2, 2]
    for (_, data), row in zip(logged, rows):
        assert data == {k: v for k, v in row.items() if k != "step"}
    for (_, data), row in zip(logged[2:], evals):
        name = row["benchmark"]
        assert data == {
            f"eval/{name}/{k}": v for k, v in row.items() if k not in ("step", "benchmark")
        }
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    (run_file,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    assert run_file.stat().st_size > 0
