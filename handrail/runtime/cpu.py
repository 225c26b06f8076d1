"""How a training process on the CPU asks glibc's malloc to keep the memory tensors free.

A step frees and allocates tensors of the same sizes every time. By default glibc serves each
large one (above 128 KiB, a threshold it raises only as it sees such blocks freed) with a fresh
mmap and hands it back on free, and it returns the free top of its heap to the OS once that
exceeds a threshold: so step after step the same tensors land on new pages, and every new page
costs a fault, 3–11 µs on the virtual machine this was measured on, where a self-distillation
step on the lab's model took 1,042–3,478 of them (benchmarks/HISTORY.md §10). With the mmap threshold
fixed at glibc's maximum (32 MiB) and the heap kept, a step reuses the pages the previous one
freed: 34–48 faults a step there.

The cost is that freed memory stays with the process (as with a caching allocator): its resident
size stays near its peak. Applied once per process, on Linux with glibc only, and never where the
user chose the allocator themselves (MALLOC_* or GLIBC_TUNABLES set, an allocator preloaded) or
set HANDRAIL_MALLOC=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (module docstring) once per process; True where they are set."""
    global _applied
    if _applied is None:
        _applied = _set_thresholds()
    return _applied


def user_chose_allocator(environ=os.environ) -> bool:
    return (environ.get("HANDRAIL_MALLOC", "1") == "0" or "GLIBC_TUNABLES" in environ
            or any(k.startswith("MALLOC_") for k in environ)
            or any(a in environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")))


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux") or user_chose_allocator():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc's; musl has none
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
