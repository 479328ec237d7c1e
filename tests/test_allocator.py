"""`gxpo.allocator.keep_freed_memory`: a program's large temporaries stop page-faulting."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import json, resource
    from gxpo.allocator import keep_freed_memory
    kept = keep_freed_memory()
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):  # temporaries of 36 MiB each, over glibc's largest mmap threshold (32 MiB)
        y = jnp.cumsum(x * 2.0, axis=0)  # a scan: XLA keeps its result whole
        z = jnp.cumsum(jnp.tanh(y), axis=1)
        return jnp.sum(z * y, axis=0)

    x = jnp.ones((3072, 3072), jnp.float32)  # 36 MiB
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = sorted(faults[4:])[2]  # the median call after the heap has grown to its size
    print(json.dumps({"kept": kept, "faults": faults}))
    """
)


def _probe(setting: str) -> dict:
    env = dict(os.environ, GXPO_KEEP_FREED_MEMORY=setting)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _probe("0"), _probe("1")
    assert default["kept"] is False and kept["kept"] is True
    # glibc's default maps each 64 MiB temporary afresh: ~9k pages of 4 KiB per temporary.
    assert default["faults"] > 10_000  # three temporaries
    assert kept["faults"] < 0.05 * default["faults"]
