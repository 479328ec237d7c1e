"""The memory estimate against XLA's own buffer sizes (`compiled.memory_analysis()`) for the
programs it models, on a small shape compiled on CPU in float32 (XLA:CPU's figures; see
benchmarks/memory_calibration.py for the SmolLM2 shapes and the update steps)."""

import importlib.util
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _calibration():
    spec = importlib.util.spec_from_file_location(
        "memory_calibration", REPO / "benchmarks" / "memory_calibration.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_estimate_is_within_10_percent_of_xla():
    cal = _calibration()
    case = cal.CASES["small-long"]  # 8 rows in groups of 4, 128 prompt + 256 response tokens
    xla = cal.measure(case, policies=())  # fwd+bwd, the log-prob pass, the sampler
    est = cal.estimate(case, "grpo")
    pairs = {
        "fwd+bwd": (xla["fwd+bwd"], est.activations + max(est.logits, est.layer)),
        "log-probs": (xla["log-probs"], est.logprob_pass),
        "sampler": (xla["sampler"], est.kv_cache + est.sampler),
    }
    for name, (measured, estimated) in pairs.items():
        assert estimated == pytest.approx(measured, rel=0.10), (name, measured, estimated)
    # What makes them so: the logits' buffers dominate the update and the log-prob pass, the
    # sampler's own copy of the layers' weights its loop (neither was in the estimate before).
    assert est.logits > est.layer and est.sampler > est.kv_cache
