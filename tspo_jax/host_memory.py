"""Hands memory the process has freed back to the operating system.

glibc's malloc keeps freed blocks below its mmap threshold in its arenas, and XLA:CPU allocates a
program's buffers through it, so a CPU run's resident memory climbs with every new shape it
compiles and runs, though its live arrays do not. Measured on the 0.5B offline run
(docs/POD_PLAN.md): 1.06 GiB returned by one malloc_trim during a rollout. The trainer calls this
between the phases of a step.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to trim this way
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_free_memory() -> bool:
    """malloc_trim(0): returns free pages of every arena to the OS. False where there is no glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def proc_bytes(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a /proc file (/proc/meminfo, /proc/self/status) in bytes, or None
    where the file or the field is not there."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """This process's resident set (VmRSS), or None where /proc is not available."""
    return proc_bytes("/proc/self/status", "VmRSS")
