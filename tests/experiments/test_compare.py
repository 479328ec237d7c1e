"""The comparison's tables from hand-made runs, and one tiny real comparison end to end."""

import functools
import json
import pathlib
import subprocess
import time

import numpy as np
import pytest
from fake_rewards import text_rewards

from gxpo.experiments import analysis, compare
from gxpo.rl.rewards import RewardScorer, RewardStats
from gxpo.train.logging import read_jsonl
from gxpo.train.surrogate import SurrogateCheck


def _write_run(root, name, accs, passes_per_step, seconds_per_step, active=None, steps=None):
    """A run evaluated every 2 steps with accuracies `accs`; `steps` (default: its last eval
    step) is its config's train.steps, which a run still under way has not reached."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    last = 2 * (len(accs) - 1)
    (run / "config.json").write_text(json.dumps({"train": {"steps": steps or last}}))
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
            "wall_seconds": s * seconds_per_step,
            "reward/correct/timeouts": 0,  # a name with slashes that is no surrogate metric
            "clip_frac": 0.01 * s,
            "kl_ref": 0.001 * s,
            "gxpo/active": 1 if active is None or s < active else 0,
            "gxpo/retention_mean": 0.9,
            "gxpo/scale_mean": 1.5,
            "gxpo/inactive_fraction": 0.1,
            "gxpo/cos_corrective_initial": 0.97,
            "gxpo/gate_z": 0.5 * s,
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
    # A seed still under way (evaluated to step 2 of 6) stays out: it would cut the curve short.
    _write_run(tmp_path, "gxpo5_s2", [0.2, 0.9], 3, 20.0, steps=6)
    text = compare.analyze(tmp_path, ["grpo", "gxpo5"])
    assert "seeds [0, 1]" in text.splitlines()[0]
    assert "GRPO's peak (seed-mean curve): 50.0%" in text
    gxpo_row = next(line for line in text.splitlines() if line.startswith("gxpo5"))
    # steps 2 vs 6 (3x), backward passes 6 vs 6 (1x), wall seconds 40 vs 60 (1.5x)
    assert "3.00x" in gxpo_row and "1.00x" in gxpo_row and "1.50x" in gxpo_row
    assert "60.0 ± 0.0" in gxpo_row  # peak accuracy
    assert "4, 4" in text  # the gate shut off at step 4 in both seeds
    assert "3.00, 3.00" in text  # its largest z-score, at step 6 (0.5 * 6), in both seeds
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 10_000
    assert (tmp_path / "tables.md").read_text() == text


def test_paired_differences_shutoff_and_surrogate_tables(tmp_path):
    finals = {0: 0.6, 1: 0.62, 2: 0.58}
    for seed, final in finals.items():
        _write_run(tmp_path, f"grpo_s{seed}", [0.2, 0.3, 0.4, 0.5], 1, 10.0)
        _write_run(tmp_path, f"gxpo5_s{seed}", [0.2, 0.5, 0.6, final], 3, 20.0)
    # seed 0: a lone plain step (2) inside the active phase, a step half active (4), then off
    path = tmp_path / "runs/gxpo5_s0/metrics.jsonl"
    rows = read_jsonl(path)
    for row, active in zip(rows, [1, 0, 1, 0.5, 0, 0]):
        row["gxpo/active"] = active
    rows[2]["surrogate/seconds"] = 9.0
    for k in (3, 5):
        rows[2].update({f"surrogate/K{k}/rel_err": 0.1 * k, f"surrogate/K{k}/cos_err": 0.01})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = analysis.analyze(tmp_path)

    paired = text.split("### Paired differences against grpo")[1].split("###")[0]
    row = next(line for line in paired.splitlines() if line.startswith("gxpo5"))
    # final eval: +10, +12, +8 points; the 95% interval of their mean lies within [8, 12]
    assert "+10.0 [" in row and "(+10.0, +12.0, +8.0)" in row
    low, high = (float(x) for x in row.split("+10.0 [")[1].split("]")[0].split(","))
    assert 8 <= low < 10 < high <= 12
    # at GRPO's 6 backward passes GXPO has evaluated at step 2 (0.5), GRPO at step 6 (0.5): 0
    assert "+0.0 [+0.0, +0.0] (+0.0, +0.0, +0.0)" in row
    assert analysis.bootstrap_interval([1.0, 1.0]) == (1.0, 1.0, 1.0)

    assert analysis.shutoff_step(rows, "gxpo") == 5
    phases = text.split("### Gate shutoff")[1].split("###")[0]
    assert "5, never, never" in phases and "after shutoff" in phases
    surrogate = text.split("(cf. Table 6)")[1].split("###")[0]
    assert surrogate.count("gxpo5") == 2 and "0.5" in surrogate  # K = 5: 0.1 * 5
    assert (tmp_path / "plots" / "surrogate.png").exists()


@pytest.mark.parametrize(
    "bad", ["ppo", "gxpo", "sfpo0x", "grpo_lr3", "grpo_epochs", "grpo_lr2x_lr3x", "gxpo5_paper"]
)
def test_bad_method_names(bad):
    with pytest.raises(ValueError, match=r"--methods: .* _lr<F>x .* _epochs<N> .* _authors"):
        compare.check_method(bad)
    if "_" not in bad:
        with pytest.raises(ValueError, match="--methods"):
            compare.method_overrides(bad)


def _tiny(monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[2]))
    from configs.tiny import get_config

    return get_config()


def test_the_study_methods_resolve(monkeypatch):
    base = _tiny(monkeypatch)
    base.eval.top_p = 1.0
    c = {m: compare.method_config(base, m, 7, surrogate_every=5) for m in
         ("grpo", "grpo_lr3x", "grpo_epochs3", "sfpo3", "gxpo5", "gxpo5_authors")}  # fmt: skip
    assert all(x.train.seed == 7 for x in c.values())
    assert c["grpo"].optimizer.lr == base.optimizer.lr and c["grpo"].train.epochs == 1
    assert c["grpo_lr3x"].optimizer.lr == pytest.approx(3 * base.optimizer.lr)
    assert c["grpo_lr3x"].policy_update.name == "grpo"
    assert c["grpo_epochs3"].train.epochs == 3 and c["grpo_epochs3"].policy_update.name == "grpo"
    assert c["sfpo3"].policy_update.sfpo.fast_steps == 3
    assert c["gxpo5"].policy_update.gxpo.virtual_depth == 5
    authors = c["gxpo5_authors"]
    assert authors.policy_update.gxpo.virtual_depth == 5
    assert authors.policy_update.gxpo.probe_state == "restore" and authors.train.mini_batches == 4
    assert authors.policy_update.gate.statistic == "entropy" and authors.loss.kl_coef == 0
    assert authors.eval.top_p == 1.0  # evaluated like every other method, not at their 0.7
    # the surrogate check goes to the GXPO methods only
    assert (
        c["gxpo5"].logging.surrogate_every == 5 and c["gxpo5_authors"].logging.surrogate_every == 5
    )
    assert c["grpo"].logging.surrogate_every == 0 and c["sfpo3"].logging.surrogate_every == 0
    assert base.optimizer.lr == c["grpo"].optimizer.lr  # the base config is not modified
    # modifiers compose, the authors' recipe first: its epochs = 1 does not undo _epochs2
    both = compare.method_config(base, "gxpo3_epochs2_authors", 0)
    assert both.train.epochs == 2 and both.train.mini_batches == 4


class _Interrupted(Exception):
    pass


def test_tiny_comparison_resumes_skips_and_commits(tmp_path, monkeypatch):
    c = _tiny(monkeypatch)
    c.train.steps = 2
    c.train.checkpoint_every = 1
    c.eval.at_start, c.eval.every = False, 0  # one evaluation, at the end
    c.policy_update.gate.warmup = 30  # stays on: the surrogate check runs at step 2
    c.logging.surrogate_depths = (2, 3)  # K = 2 predicts theta2 itself: exact by construction
    from gxpo.train.trainer import Trainer

    step, fired = Trainer.train_step, []

    def killed_once(self):  # the run dies at its second step, after the first one's checkpoint
        if self.step == 1 and not fired:
            fired.append(True)
            self.checkpointer.wait()
            raise _Interrupted
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", killed_once)

    def score_batch(self, texts, refs, kinds, format_reward=0.0):
        # A random model scores 0 everywhere: rewards from the text instead, so that the
        # advantages, and so the gradients, are not zero.
        rewards = text_rewards(texts, c.rollout.responses_per_prompt)
        return rewards, RewardStats(count=len(texts))

    monkeypatch.setattr(RewardScorer, "score_batch", score_batch)

    # The check "takes" 1000 s more than it does: the clock jumps while it runs, and it says so.
    jump, clock, check_call = [0.0], time.perf_counter, SurrogateCheck.__call__
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + jump[0])

    def slow_check(self, *args):
        out = check_call(self, *args)
        jump[0] += 1000.0
        return dict(out, **{"surrogate/seconds": out["surrogate/seconds"] + 1000.0})

    monkeypatch.setattr(SurrogateCheck, "__call__", slow_check)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for key, value in (("user.name", "t"), ("user.email", "t@t")):
        subprocess.run(["git", "-C", str(tmp_path), "config", key, value], check=True)
    out = tmp_path / "study"
    run_all = functools.partial(compare.run_all, surrogate_every=2, commit_runs=True)
    with pytest.raises(_Interrupted):
        run_all(c, out, ["gxpo2"], [0])
    run_all(c, out, ["gxpo2"], [0])  # resumes from step 1
    monkeypatch.setattr(Trainer, "__init__", None)  # a complete run builds no Trainer
    run_all(c, out, ["gxpo2"], [0])
    run = out / "runs/gxpo2_s0"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and [r["backward_passes"] for r in rows] == [3, 6]
    log = read_jsonl(run / "harness.jsonl")
    assert [r["event"] for r in log] == ["start", "start", "end"]
    assert log[-1]["from_step"] == 1 and log[-1]["step"] == 2 and len(log[0]["loadavg"]) == 3
    git = ["git", "-C", str(tmp_path)]
    subjects = subprocess.run([*git, "log", "--format=%s"], capture_output=True, text=True).stdout
    assert subjects.split("\n")[:-1] == ["study: gxpo2_s0 done"]  # once, when it finished
    tracked = subprocess.run([*git, "ls-files"], capture_output=True, text=True).stdout
    assert "study/runs/gxpo2_s0/metrics.jsonl" in tracked
    text = compare.analyze(out)
    assert "gxpo2_s0" in text and "  2  " in text  # the runs table: two steps

    # The surrogate check ran at step 2 (not 1), outside the run's clock and backward passes.
    assert "surrogate/K2/rel_err" not in rows[0]
    second = rows[1]
    assert second["surrogate/K2/rel_err"] < 1e-4  # the recorded point is theta_hat, not theta1
    assert 0 < second["surrogate/K3/rel_err"] < 10 and second["surrogate/K3/displacement_norm"] > 0
    assert second["surrogate/seconds"] > 1000 > second["update_seconds"]  # taken off the clock
    np.testing.assert_allclose(
        second["wall_seconds"] - rows[0]["wall_seconds"],
        second["rollout_seconds"] + second["update_seconds"],
        atol=1e-3,
    )
    assert "(cf. Table 6)" in text


def test_commit_refuses_a_directory_outside_git(tmp_path, monkeypatch):
    c = _tiny(monkeypatch)
    with pytest.raises(ValueError, match="--commit: --out=.* not inside a git work tree"):
        compare.run_all(c, tmp_path, ["grpo"], [0], commit_runs=True)
