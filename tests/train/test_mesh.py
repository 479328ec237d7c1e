"""The device mesh: sharded steps equal single-device ones on 8 faked CPU devices, two processes
train like one, and shardings follow the rules table.

The multi-device checks run in subprocesses (XLA's device count is fixed per process), so the
rest of the suite keeps one device.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from gxpo.models.sharding import logical_spec
from gxpo.train import mesh as mesh_lib
from gxpo.train import rows as rows_lib
from gxpo.train.logging import read_jsonl

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Equivalence, not speed, is under test: a cheaper XLA:CPU backend halves compile times.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env(devices: int, **extra) -> dict:
    flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}


def _mesh_config(**sizes) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, **sizes})


# ----------------------------------------------------------------------------- 8 devices


def _drop_unit_axes(spec: list, sizes: dict) -> list:
    """A spec with size-1 mesh axes removed (XLA drops them from the specs it reports)."""

    def entry(e):
        axes = [a for a in (e if isinstance(e, list) else [e]) if a and sizes[a] > 1]
        return None if not axes else axes[0] if len(axes) == 1 else axes

    out = [entry(e) for e in spec]
    while out and out[-1] is None:
        out.pop()
    return out


def test_sharded_steps_equal_single_device_steps_on_8_devices():
    """One subprocess for every mesh shape (each compile costs seconds): for data x fsdp x
    tensor in 8x1x1, 2x4x1, 2x2x2, two GRPO and two GXPO steps equal the unsharded ones, compile
    once, and params, LoRA and optimizer state carry the shardings of the rules table."""
    out = subprocess.run(
        [sys.executable, str(HERE / "mesh_steps.py")],
        capture_output=True,
        text=True,
        env=_env(8),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads(out.stdout)
    assert sorted(results) == ["2x2x2", "2x4x1", "8x1x1"]
    for shape, r in results.items():
        for policy in ("grpo", "gxpo"):
            p, where = r[policy], f"{shape} {policy}"
            assert p["param_diff"] < 1e-5, (where, p["param_diff"])
            # gate_z divides by the std of a one-value window (0 + 1e-8): float noise, amplified.
            metrics = {k: v for k, v in p["metric_diff"].items() if not k.endswith("gate_z")}
            assert max(metrics.values()) < 1e-4, (where, metrics)
            assert p["compiles"] == 1, where  # two steps, one compile: outputs keep shardings
            assert p["out_shardings_kept"], where
            # LoRA A [L, *in, R] splits like its kernel's input axes, B [L, R, *out] like its
            # output axes; Adam's moments, also inside GXPO's state, like the params they mirror.
            assert p["lora_a_q"] == [None, "fsdp", None], where
            assert p["lora_b_q"] == [None, None, "tensor", None], where
            assert p["lora_b_down"] == [None, None, "fsdp"], where
            assert p["mu_lora_b_q"] == p["lora_b_q"], where
            assert p["mu_lora_a_down"] == [None, "tensor", None], where
            assert p["count"] == [], where
        assert r["gxpo"]["active"] == 1 and r["gxpo"]["gate_values"] == [], shape
        assert r["kernel_q"] == [None, "fsdp", "tensor", None], shape
        assert r["kernel_down"] == [None, "tensor", "fsdp"], shape
        assert r["embed"] == ["tensor", "fsdp"] and r["lm_head"] == ["fsdp", "tensor"], shape
        assert r["batch_tokens"] == [["data", "fsdp"], None], shape
    # The sampler (static and refilling) runs sharded on the same arrays, draws the same
    # tokens, and its KV cache is split over rows and KV heads.
    r = results["2x2x2"]
    assert r["sample_tokens_equal"] and r["sample_logp_diff"] < 1e-5
    assert r["chunked_logp_diff"] < 1e-5  # the trainer's chunked log-prob pass, sharded
    assert r["refill_tokens_equal"] and r["refill_logp_diff"] < 1e-5
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert _drop_unit_axes(r["kv_cache"], sizes) == [None, ["data", "fsdp"], None, "tensor"]
    assert r["kv_cache_rule"] == [None, ["data", "fsdp"], None, "tensor", None]


# ----------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    """Two processes with 4 devices each form one 8-device mesh (jax.distributed, gloo) and
    train one GXPO step like a single process on one device (run beside them)."""
    script = str(HERE / "multihost_trainer.py")
    workdir, out = tmp_path / "multi", tmp_path / "multi.npz"
    coordinator = f"localhost:{_free_port()}"
    multi = [
        ([script, str(workdir), str(out)], _env(4, JAX_COORDINATOR_ADDRESS=coordinator,
                                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
        for i in range(2)
    ]  # fmt: skip
    single = ([script, str(tmp_path / "single"), str(tmp_path / "single.npz"), "--single"], _env(1))
    procs = [
        subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for args, env in (*multi, single)
    ]  # fmt: skip
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
        assert f"process {i % 2} done, rows 8" in log

    got, ref = np.load(out), np.load(tmp_path / "single.npz")
    assert sorted(got.files) == sorted(ref.files) and len(got.files) == 8  # 4 LoRA pairs
    for name in ref.files:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5, rtol=0, err_msg=name)
    assert max(float(np.abs(got[n] - ref[n]).max()) for n in ref.files if "lora_b" in n) > 0

    # Only process 0 wrote logs: one row per step, one TensorBoard event file.
    rows = read_jsonl(workdir / "metrics.jsonl")
    ref = read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["reward_mean"] == ref[0]["reward_mean"]
    assert rows[0]["backward_passes"] == ref[0]["backward_passes"] == 3
    assert abs(rows[0]["loss"] - ref[0]["loss"]) < 1e-5
    assert len(list((workdir / "tensorboard").iterdir())) == 1
    # Orbax wrote the checkpoint collectively: both processes' shards, one committed step.
    state = workdir / "checkpoints" / "1" / "state"
    assert (state / "commit_success.txt").exists() or (state.parent / "commit_success.txt").exists()
    assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}


# ----------------------------------------------------------------------------- rules and sizes


def test_mesh_shape_fills_the_rest_and_rejects_bad_sizes():
    assert mesh_lib.mesh_shape(_mesh_config(), 8) == (8, 1, 1)
    assert mesh_lib.mesh_shape(_mesh_config(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_lib.mesh_shape(_mesh_config(fsdp=-1), 8)
    with pytest.raises(ValueError, match="must equal the 8 devices"):
        mesh_lib.mesh_shape(_mesh_config(data=2, fsdp=2), 8)
    with pytest.raises(ValueError, match=r"do not divide the 8 devices"):
        mesh_lib.mesh_shape(_mesh_config(tensor=3), 8)
    with pytest.raises(ValueError, match=r"config.mesh.fsdp=0"):
        mesh_lib.mesh_shape(_mesh_config(fsdp=0), 8)


def test_logical_spec_uses_each_mesh_axis_once_and_keeps_indivisible_axes_whole():
    sizes = {"data": 2, "fsdp": 2, "tensor": 4}
    rules = mesh_lib.RULES
    # q kernel [L, D, N, H]: D over fsdp, N over tensor.
    assert logical_spec(
        ("layers", "embed", "q_heads", "head_dim"), (2, 64, 8, 16), rules, sizes
    ) == (PartitionSpec(None, "fsdp", "tensor", None))
    # 2 KV heads do not split 4 ways: whole.
    assert logical_spec(
        ("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), rules, sizes
    ) == (PartitionSpec(None, "fsdp", None, None))
    # Rows over both batch axes; a second "batch" dimension cannot reuse them.
    assert logical_spec(("batch", "batch"), (8, 8), rules, sizes) == PartitionSpec(
        ("data", "fsdp"), None
    )
    assert logical_spec(("batch", None), (6, 3), rules, sizes) == PartitionSpec(None, None)


def test_row_shardings_split_rows_at_every_rank():
    mesh = mesh_lib.make_mesh(_mesh_config())
    got = mesh_lib.row_shardings(mesh, 8, {"tokens": 2, "advantages": 1})
    assert got["tokens"].spec == PartitionSpec(("data", "fsdp"), None)
    assert got["advantages"].spec == PartitionSpec(("data", "fsdp"))


def test_rows_must_split_over_the_batch_axes():
    mesh = AbstractMesh((2, 4, 1), mesh_lib.MESH_AXES)
    rows_lib.check_rows(16, mesh, "rows")
    with pytest.raises(ValueError, match=r"12 rows do not split evenly .* 8 devices"):
        rows_lib.check_rows(12, mesh, "config.rollout.prompts_per_step")


# ----------------------------------------------------------------------------- GPU benchmark


def test_gpu_benchmark_runs_on_cpu_with_a_tiny_shape():
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        env=_env(1),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    for kind in ("fwd+bwd", "grpo", "gxpo K=5"):
        assert re.search(rf"^\s*tiny\s+{re.escape(kind)}\s", out.stdout, re.M), out.stdout
