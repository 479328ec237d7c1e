"""benchmarks/gpu_e2e.py runs its CPU setting: the real Trainer on tiny shapes, GRPO then GXPO,
and writes every number it prints."""

import json
import math
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
NUMBERS = ("rollout_tok_s", "bandwidth_fraction", "limit_tok_s", "sampling_s", "rollout_s",
           "grpo_update_s", "gxpo_update_s", "gxpo_over_grpo", "estimate_gib",
           "estimate_grpo_gib", "response_tokens_mean")  # fmt: skip


def test_gpu_e2e_cpu_smoke(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_e2e.py"), "--cpu-smoke",
         f"--out={tmp_path}", "--bandwidth=0.02"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "tiny" in out.stdout and "GXPO s" in out.stdout, out.stdout
    (result,) = json.loads((tmp_path / "cpu.json").read_text())
    assert (tmp_path / "cpu.md").read_text().count("tiny") >= 2
    for name in NUMBERS:
        assert isinstance(result[name], float) and math.isfinite(result[name]), name
        assert result[name] > 0, name
    assert 0 < result["bandwidth_fraction"] < 1  # nothing beats the bandwidth limit
    assert (
        result["rows"] == 4 and result["sampling_calls"] == 1
    )  # 2 chunks' rows: 2 refilling slots
    assert result["grpo_grad_evals"] == 1 and result["gxpo_grad_evals"] == 3  # GXPO extrapolated
    assert result["peak_gib"] is None  # CPU devices report no memory statistics
