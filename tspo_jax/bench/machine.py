"""The machine a benchmark ran on, and its ceilings measured in the same run.

Bandwidth: a sum over a buffer much larger than the caches (the read pattern of decoding, which
streams every weight once per step). Matmul rate: a large square matmul in the benchmark dtype.
Both are taken with JAX and with PyTorch (when it runs on the same device) and the faster of the
two is the limit: the machine's ceiling is the best anyone reached on it, not our own best.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from tspo_jax.bench.costs import Limits
from tspo_jax.host_memory import proc_bytes


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    total = proc_bytes("/proc/meminfo", "MemTotal")
    return None if total is None else round(total / 2**30, 1)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    import torch

    devices = jax.devices()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": affinity,
        "memory_gb": _mem_total_gb(),
        "jax_backend": jax.default_backend(),
        "jax_devices": len(devices),
        "jax_device_kind": devices[0].device_kind,
        "torch_device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {
            "python": platform.python_version(),
            **{p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers")},
        },
    }


def _best_time(fn, reps: int) -> float:
    """The fastest of `reps` calls after a warm-up: a ceiling is what the machine reaches at best."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_limits(dtype: str = "float32", reps: int = 5, size: str = "auto") -> dict:
    """Measured bandwidth (bytes/s) and matmul rate (FLOP/s) with JAX and PyTorch; `limit` holds
    the larger of each. size: 'auto' (by backend), or 'small' for smoke tests."""
    import torch

    on_gpu = jax.default_backend() == "gpu"
    if size == "small":
        n_bytes, n = 64 * 2**20, 1024
    else:
        n_bytes, n = (2 * 2**30, 8192) if on_gpu else (512 * 2**20, 2048)
    jdt = jnp.dtype(dtype)
    out: dict = {"dtype": dtype, "buffer_bytes": n_bytes, "matmul_n": n}

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    jsum = jax.jit(jnp.sum)
    out["jax_bandwidth"] = n_bytes / _best_time(lambda x=x: jsum(x).block_until_ready(), reps)
    del x
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jdt)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), jdt)
    jmm = jax.jit(jnp.matmul)
    out["jax_matmul_flops"] = 2 * n**3 / _best_time(lambda a=a, b=b: jmm(a, b).block_until_ready(), reps)
    del a, b

    torch_here = (not on_gpu) or torch.cuda.is_available()
    if torch_here:
        dev = "cuda" if on_gpu else "cpu"
        sync = torch.cuda.synchronize if on_gpu else (lambda: None)
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        with torch.inference_mode():
            tx = torch.ones(n_bytes // 4, dtype=torch.float32, device=dev)
            out["torch_bandwidth"] = n_bytes / _best_time(lambda: (tx.sum(), sync()), reps)
            del tx
            ta = torch.randn(n, n, device=dev).to(tdt)
            tb = torch.randn(n, n, device=dev).to(tdt)
            out["torch_matmul_flops"] = 2 * n**3 / _best_time(lambda: (ta @ tb, sync()), reps)
    out["bandwidth"] = max(out["jax_bandwidth"], out.get("torch_bandwidth", 0.0))
    out["matmul_flops"] = max(out["jax_matmul_flops"], out.get("torch_matmul_flops", 0.0))
    return out


def combine(measurements: list[dict]) -> Limits:
    """The ceilings over several measurements of the run (start and end): the best seen."""
    return Limits(
        bandwidth=max(m["bandwidth"] for m in measurements),
        matmul_flops=max(m["matmul_flops"] for m in measurements),
    )
