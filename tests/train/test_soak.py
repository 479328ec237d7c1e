"""The fault-injection soak (benchmarks/soak.py), short: configs/tiny.py through launch.py,
killed during the evaluation at step 0 and once more later, the newest checkpoint corrupted
after that kill; the resumed run must name and move aside the corrupt checkpoint and end bit
for bit where the uninterrupted run ends. The full soak (20 kills, 3 corruptions) is the
script's default."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_killed_and_corrupted_run_ends_bit_identical(tmp_path):
    soak = _soak_module()
    kills, diffs = soak.soak(tmp_path, steps=4, kills=2, corruptions=1, seed=0, echo=print)
    assert diffs == []
    assert [k.at for k in kills][0] == "eval" and kills[0].newest is None  # before any save
    corrupted = [k for k in kills if k.corrupted is not None]
    assert len(corrupted) == 1 and corrupted[0].detected
    aside = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert f"{corrupted[0].corrupted}.corrupt-1" in aside
