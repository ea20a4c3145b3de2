"""host_memory: freed heap memory goes back to the OS."""

import ctypes
import sys

import pytest

from tspo_jax import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._libc() is None, reason="needs glibc")
def test_release_free_memory_returns_freed_heap_pages():
    """300 MB in 64 KiB blocks (below malloc's mmap threshold, so on the heap), all freed but a
    pin allocated after them: glibc keeps the freed pages until malloc_trim gives them back."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, n = 64 * 1024, 300 * 16
    blocks = [libc.malloc(block) for _ in range(n)]
    pin = libc.malloc(block)
    for p in blocks:
        ctypes.memset(p, 1, block)  # touch every page: resident
    held = host_memory.resident_bytes()
    for p in blocks:
        libc.free(p)
    freed = host_memory.resident_bytes()
    assert host_memory.release_free_memory()
    trimmed = host_memory.resident_bytes()
    libc.free(pin)
    assert held - freed < 100e6, "free() returned the blocks by itself: the test does not exercise malloc_trim"
    assert freed - trimmed > 200e6, (held, freed, trimmed)


def test_proc_bytes_reads_a_kib_field_and_says_none_when_absent(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       24683776 kB\nMemFree:         1234 kB\nMemAvailable:   17000000 kB\n")
    assert host_memory.proc_bytes(str(f), "MemTotal") == 24683776 * 1024
    assert host_memory.proc_bytes(str(f), "MemAvailable") == 17000000 * 1024
    assert host_memory.proc_bytes(str(f), "Mem") is None  # a prefix of a field is not the field
    assert host_memory.proc_bytes(str(f), "SwapTotal") is None
    assert host_memory.proc_bytes(str(tmp_path / "missing"), "MemTotal") is None
