"""The memory allocator setting gxpo's own processes use: freed memory stays in the process.

XLA:CPU allocates each compiled program's buffers (the update step's temporaries: 2.5 GB for
GRPO on SmolLM2-135M, 4.6 GB for GXPO) with the C library's `malloc` at every call and frees
them at its end. glibc serves blocks of 32 MiB and more with a fresh `mmap` and returns them to
the kernel on `free`, so every call page-faults its whole arena in again: ~0.7M minor faults,
1.4 s of system CPU, per GRPO update step of that model (docs/performance.md).

`keep_freed_memory` tells glibc (`mallopt`) to serve every block from its heap, to keep freed
memory there for the next call, and to use one heap for all threads (so that a block freed by
one thread is reused by the next allocation of another). After the first calls the heap holds
what a step needs and steps fault no page. The price: the process's resident memory stays at
its peak instead of shrinking between steps.

The launchers (`launch.py`, `python -m gxpo.evaluate`, `python -m gxpo.export`) and the
benchmarks call it first thing; a library user may call it too. `GXPO_KEEP_FREED_MEMORY=0`
turns it off. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_NEVER = -1  # mallopt(3): -1 disables trimming (a 2 GiB limit would free a GXPO arena)

ENV = "GXPO_KEEP_FREED_MEMORY"
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Keeps freed memory in the process (see the module docstring); True when it took effect.

    Call it before the program allocates much (it changes how later blocks are served). Calling
    it again is harmless. `GXPO_KEEP_FREED_MEMORY=0` in the environment turns it off."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_NEVER), (_M_ARENA_MAX, 1))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    return _applied
