"""Fault-injection soak: a run killed with SIGKILL at random moments, and with checkpoints
corrupted on the way, ends bit for bit where the uninterrupted run ends (a script, not a test).

    python benchmarks/soak.py                                   # 20 kills, 3 corruptions
    python benchmarks/soak.py --kills=40 --corruptions=5 --steps=40 --seed=1

`configs/tiny.py` trains --steps steps through `launch.py` in a subprocess, with a checkpoint at
every step and an evaluation every --eval-every steps, so that a kill often lands in an
asynchronous save or in an evaluation. First one uninterrupted run, the reference; then the
same run in a second work directory, killed --kills times: for each kill the script waits until
the run has logged a chosen step, then for a moment of a chosen kind (a training step, an
asynchronous save in flight: an ``*.orbax-checkpoint-tmp*`` directory exists, or an
evaluation: its step's metrics row is written and its eval row not yet), sends SIGKILL and
relaunches the same command, which resumes. On --corruptions of the kills, the newest
checkpoint is also corrupted before the relaunch (random bytes into the middle of every array
file), which the relaunched run must name in a warning line, move aside to
``<step>.corrupt-<n>``, and redo from the checkpoint before it.

At the end, every array of the final checkpoint (all of the train state: adapters, optimizer
state, step, data position, backward passes; wall_seconds, a timing, apart) and every row of
metrics.jsonl, eval.jsonl and samples.jsonl (timing fields, ``*_seconds``, apart) must equal the
reference's, bit for bit. A summary table of the kills is printed, and a last line
``soak kills=K corruptions=C bit_identical=True|False`` (exit status 1 if False).

Rewards: a random tiny model never answers right, so every reward would be 0 and nothing would
train. As tests/train/test_trainer.py does, each response's reward is a function of its text
(CRC32 mod 2): deterministic, different across responses, so any divergence of the sampled
tokens changes the weights. The relaunched processes share a JAX compilation cache in the soak
directory, so only the first run compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KINDS = ("step", "save", "eval")
TIMING_SUFFIX = "_seconds"  # wall_seconds, rollout_seconds, update_seconds: differ run to run
POLL_S = 0.002


def launch_flags(workdir: Path, steps: int, eval_every: int) -> list[str]:
    """`launch.py` flags of the soak's run."""
    return [
        "--config=" + str(REPO / "configs" / "tiny.py"),
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        "--config.train.checkpoint_every=1",
        f"--config.eval.every={eval_every}",
    ]


def start(workdir: Path, steps: int, eval_every: int, cache: Path) -> subprocess.Popen:
    """Starts `launch.py` (with the text-hash rewards) on ``workdir``; it resumes if it can."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    cmd = [sys.executable, __file__, "--launch", *launch_flags(workdir, steps, eval_every)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )


def _launch_child(flags: list[str]) -> None:
    """The subprocess: `launch.py`'s main with the rewards of the module docstring."""
    sys.path.insert(0, str(REPO))
    import numpy as np  # noqa: PLC0415

    import launch  # noqa: PLC0415
    from gxpo import cli  # noqa: PLC0415
    from gxpo.rl.rewards import RewardScorer, RewardStats  # noqa: PLC0415

    def score_batch(self, texts, refs, kinds, format_reward=0.0):
        rewards = np.array([zlib.crc32(t.encode()) % 2 for t in texts], np.float32)
        return rewards, RewardStats(count=len(texts))

    RewardScorer.score_batch = score_batch
    sys.argv = [str(REPO / "launch.py"), *flags]
    cli.run(launch.main)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    """Waits for a run to end; returns its stderr, raising if it failed."""
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"launch.py exited with {proc.returncode}:\n{err[-4000:]}")
    return err


# ---------------------------------------------------------------- what a run is doing


def _rows(path: Path) -> list[dict[str, Any]]:
    from gxpo.train.logging import read_jsonl  # noqa: PLC0415

    return read_jsonl(path)


def logged_step(workdir: Path) -> int:
    rows = _rows(workdir / "metrics.jsonl")
    return rows[-1]["step"] if rows else 0


def committed_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    names = [p.name for p in d.iterdir()] if d.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit())


def saving(workdir: Path) -> bool:
    d = workdir / "checkpoints"
    try:
        return any(".orbax-checkpoint-tmp" in p.name for p in d.iterdir())
    except FileNotFoundError:
        return False


def logging_since(workdir: Path, wall: float) -> bool:
    """The run started at ``wall`` has opened its logs (after truncating them on a resume), so
    they show its own progress, not the killed run's."""
    try:
        return (workdir / "metrics.jsonl").stat().st_mtime >= wall
    except FileNotFoundError:
        return False


def evaluating(workdir: Path, steps: int, eval_every: int) -> bool:
    """An evaluation is under way: its step's metrics row is there (for the evaluation at
    step 0, no row yet), its eval row not yet."""
    s = logged_step(workdir)
    if s and not (s % eval_every == 0 or s == steps):
        return False
    return not any(r.get("step") == s for r in _rows(workdir / "eval.jsonl"))


def moment(workdir: Path, steps: int, eval_every: int) -> str:
    if saving(workdir):
        return "save"
    return "eval" if evaluating(workdir, steps, eval_every) else "step"


def corrupt(step_dir: Path, rng: random.Random) -> int:
    """32 random bytes into the middle of every array file of a checkpoint; returns the count."""
    files = sorted((step_dir / "state").glob("ocdbt.process_*/d/*"))
    for path in files:
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.seek(size // 2)
            f.write(rng.randbytes(min(32, size - size // 2)))
    return len(files)


# ---------------------------------------------------------------- the soak


@dataclasses.dataclass
class Kill:
    target: str  # the kind of moment aimed at
    at: str  # the kind of moment observed when the signal went
    step: int  # the last logged step then
    newest: int | None  # the newest committed checkpoint then
    corrupted: int | None = None  # the checkpoint corrupted after the kill
    detected: bool | None = None  # the relaunch named it and moved it aside
    seconds: float = 0.0  # from launch to kill


def soak(
    root: Path,
    *,
    steps: int,
    kills: int,
    corruptions: int,
    eval_every: int = 2,
    seed: int = 0,
    echo: Any = print,
) -> tuple[list[Kill], list[str]]:
    """Runs the reference and the killed run under ``root``; returns the kills and the
    differences between the two runs' final checkpoints and logs ([] if bit-identical)."""
    if not 1 <= kills <= steps - 2:
        raise ValueError(f"--kills={kills} must be in [1, --steps - 2]: one after each step")
    if corruptions > kills:
        raise ValueError(f"--corruptions={corruptions} must be <= --kills={kills}")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    cache, ref, run = root / "jax_cache", root / "reference", root / "killed"
    rng = random.Random(seed)

    t0 = time.monotonic()
    finish(start(ref, steps, eval_every, cache))
    echo(f"reference: {steps} steps in {time.monotonic() - t0:.0f} s")

    # Kill i after step target[i] (spread over the run, never past its last step), at a
    # moment of kind kinds[i]; the first during the evaluation at step 0, before any
    # checkpoint. Corrupt after the kills in `corrupt_at` (never the first).
    targets = [0, *sorted(rng.sample(range(1, steps - 2), kills - 1))]
    kinds = [KINDS[i % len(KINDS)] for i in range(1, kills)]
    rng.shuffle(kinds)
    kinds = ["eval", *kinds]
    corrupt_at = set(rng.sample(range(1, kills), corruptions)) if corruptions else set()
    done: list[Kill] = []
    pending: Kill | None = None  # a corruption to find named in the next relaunch's stderr
    proc = start(run, steps, eval_every, cache)
    launched, wall = time.monotonic(), time.time()
    while len(done) < kills:
        i = len(done)
        target, kind = targets[i], kinds[i]
        reached = None  # when the run first logged `target`
        resumed = None  # the step this launch resumed from: kill only after it logged another
        while True:
            if proc.poll() is not None:
                _check_relaunch(proc, pending, run)
                raise RuntimeError(f"the run ended before kill {i + 1}; use more --steps")
            step = logged_step(run)
            if resumed is None and logging_since(run, wall):
                resumed = step
            ready = resumed is not None and step >= target and (step > resumed or target == 0)
            if i in corrupt_at:  # a checkpoint before the corrupted one to fall back to
                ready = ready and len(committed_steps(run)) >= 2
            if ready:
                reached = reached or time.monotonic()
                waited = time.monotonic() - reached
                now = moment(run, steps, eval_every)
                # Aim at the kind; a step with no save or evaluation to catch kills anyway.
                # No such moment caught (a save of a tiny state is brief): kill anyway, while
                # the run still has steps to go.
                missed = waited > 15 or step >= target + 2
                if now == kind or (kind == "step" and waited > rng.uniform(0, 0.5)) or missed:
                    break
            time.sleep(POLL_S)
        at, newest = moment(run, steps, eval_every), (committed_steps(run) or [None])[-1]
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        kill = Kill(kind, at, logged_step(run), newest, seconds=time.monotonic() - launched)
        if pending is not None:  # the previous relaunch ran long enough to be killed
            pending.detected = _named(err, pending.corrupted, run)
            pending = None
        committed = committed_steps(run)
        if i in corrupt_at and len(committed) >= 2:
            kill.corrupted = committed[-1]
            corrupt(run / "checkpoints" / str(kill.corrupted), rng)
            pending = kill
        done.append(kill)
        echo(_row(len(done), kill))
        proc = start(run, steps, eval_every, cache)
        launched, wall = time.monotonic(), time.time()
    _check_relaunch(proc, pending, run)
    echo(f"killed run: {time.monotonic() - t0:.0f} s in all")
    return done, compare(ref, run)


def _named(stderr: str, step: int | None, workdir: Path) -> bool:
    """The relaunch named the corrupt checkpoint in one warning line and moved it aside."""
    d = workdir / "checkpoints"
    line = f"warning: checkpoint {d.resolve() / str(step)} "
    aside = [p for p in d.iterdir() if p.name.startswith(f"{step}.corrupt-")]
    return any(x.startswith(line) for x in stderr.splitlines()) and bool(aside)


def _check_relaunch(proc: subprocess.Popen, pending: Kill | None, workdir: Path) -> None:
    err = finish(proc)
    if pending is not None:
        pending.detected = _named(err, pending.corrupted, workdir)


def compare(ref: Path, run: Path) -> list[str]:
    """Differences between two runs' final checkpoints (arrays, bit for bit) and step logs
    (rows, timing fields apart)."""
    from gxpo.train.checkpoint import Checkpointer  # noqa: PLC0415
    from gxpo.train.logging import STEP_LOGS  # noqa: PLC0415

    diffs = []
    with Checkpointer(ref) as a, Checkpointer(run) as b:
        if a.latest_step() != b.latest_step():
            return [f"final checkpoint: step {a.latest_step()} vs {b.latest_step()}"]
        arrays_a, arrays_b = a.read(), b.read()
    if arrays_a.keys() != arrays_b.keys():
        diffs.append(f"checkpoint leaves differ: {sorted(arrays_a.keys() ^ arrays_b.keys())}")
    for name in sorted(arrays_a.keys() & arrays_b.keys()):
        x, y = arrays_a[name], arrays_b[name]
        if name.endswith("wall" + TIMING_SUFFIX):
            continue
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            diffs.append(f"checkpoint array {name} differs")
    for file in STEP_LOGS:
        rows_a, rows_b = (
            [{k: v for k, v in r.items() if not k.endswith(TIMING_SUFFIX)} for r in _rows(d / file)]
            for d in (ref, run)
        )
        if rows_a != rows_b:
            steps_a, steps_b = [r.get("step") for r in rows_a], [r.get("step") for r in rows_b]
            diffs.append(f"{file} differs: steps {steps_a} vs {steps_b}")
    return diffs


def _row(n: int, k: Kill) -> str:
    corrupted = "-" if k.corrupted is None else str(k.corrupted)
    return (
        f"{n:>4}  {k.target:<6} {k.at:<6} {k.step:>6} {_opt(k.newest):>7} {corrupted:>9}"
        f"  {k.seconds:7.1f}"
    )


def _opt(x: int | None) -> str:
    return "-" if x is None else str(x)


HEADER = "kill  aimed  at     logged  newest  corrupted  seconds"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--launch":
        _launch_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--corruptions", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default="/tmp/gxpo_soak", help="scratch directory (replaced)")
    args = parser.parse_args()
    print(HEADER)
    kills, diffs = soak(
        Path(args.dir),
        steps=args.steps,
        kills=args.kills,
        corruptions=args.corruptions,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    at = {kind: sum(k.at == kind for k in kills) for kind in KINDS}
    corrupted = [k for k in kills if k.corrupted is not None]
    detected = sum(bool(k.detected) for k in corrupted)
    print(
        "kills by moment: "
        + ", ".join(f"{kind} {n}" for kind, n in at.items())
        + f"; corruptions detected and moved aside: {detected}/{len(corrupted)}"
    )
    for d in diffs:
        print("DIFFERENCE:", d)
    print(
        f"soak kills={len(kills)} corruptions={len(corrupted)} detected={detected} "
        f"bit_identical={not diffs}"
    )
    sys.exit(0 if not diffs and detected == len(corrupted) else 1)


if __name__ == "__main__":
    main()
