"""`gxpo.allocator.keep_freed_memory`: glibc keeps large freed blocks for the next allocation.

The probe runs in a fresh process (the setting changes how that process's later blocks are
served) and drives glibc's `malloc` directly, single-threaded, so that the count of page faults
depends on the setting alone. What that saves in XLA's update step is measured, not tested:
`benchmarks/update_step.py --keep-freed-memory` (docs/performance.md).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import ctypes, json, resource
    from gxpo.allocator import keep_freed_memory
    kept = keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 48 << 20  # over glibc's largest mmap threshold (32 MiB)
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(size) for _ in range(3)]  # a program's temporaries ...
        for block in blocks:
            ctypes.memset(block, 1, size)  # ... written, as XLA writes its buffers
        for block in blocks:
            libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"kept": kept, "first": faults[0], "later": max(faults[1:])}))
    """
)


def _probe(setting: str) -> dict:
    env = dict(os.environ, GXPO_KEEP_FREED_MEMORY=setting)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_without_page_faults():
    default, kept = _probe("0"), _probe("1")
    assert default["kept"] is False and kept["kept"] is True
    # glibc's default maps each block afresh and unmaps it on free: every round faults it in
    # again (36,864 pages of 4 KiB; fewer where transparent huge pages back the blocks).
    assert default["later"] > 0.9 * default["first"] > 0, default
    # Kept: the first round grows the heap; later rounds reuse it and fault no page.
    assert kept["later"] < 0.01 * default["later"], (default, kept)
