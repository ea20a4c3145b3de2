"""Chips and slices the planner compiles for: one table of chip specs, one of topology names.

The TPU compiler (libtpu) runs on a CPU host: `get_topology_desc` gives the devices of a slice
that does not exist here, and `jit(...).lower(...).compile()` on a mesh of them compiles for it.

Sources of CHIPS (public Cloud TPU / NVIDIA spec pages, read 2026-11):
  v4   https://cloud.google.com/tpu/docs/v4    32 GiB HBM2, 275 TFLOP/s bf16, 1,200 GB/s
  v5e  https://cloud.google.com/tpu/docs/v5e   16 GiB HBM2, 197 TFLOP/s bf16,   819 GB/s
  v5p  https://cloud.google.com/tpu/docs/v5p   95 GiB HBM2e, 459 TFLOP/s bf16, 2,765 GB/s
  v6e  https://cloud.google.com/tpu/docs/v6e   32 GiB HBM, 918 TFLOP/s bf16, 1,640 GB/s
  h100 https://www.nvidia.com/en-us/data-center/h100/ (SXM): 80 GB HBM3, 989 TFLOP/s dense bf16,
       3.35 TB/s
`ici_bandwidth`: all-reduce bandwidth per chip, the published "all-reduce bandwidth per Pod" over
the pod's chips (v4: 1.1 PB/s over 4,096 chips; v5e: 51.2 TB/s over 256 chips, on the same pages).
The other chips publish no such figure here: their collectives are not timed.
`usable_bytes` is what a program may allocate: on TPU the limit libtpu 0.0.42 itself reports in
its out-of-memory error (measured by compiling a too-large program, see docs/POD_PLAN.md); on the
GPU, XLA's default memory fraction as launch/gpu_node.sh raises it (0.92).
"""

from __future__ import annotations

import dataclasses
import os
import re

from tspo_jax.host_memory import proc_bytes

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # published capacity per chip
    usable_bytes: int  # what one program may use (see the module docstring)
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    source: str
    ici_bandwidth: float | None = None  # all-reduce bytes/s per chip (see the module docstring)


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, int(30.75 * GiB), 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4",
               ici_bandwidth=1.1e15 / 4096),
    "v5e": Chip("TPU v5e", 16 * GiB, int(15.75 * GiB), 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e",
                ici_bandwidth=51.2e12 / 256),
    "v5p": Chip("TPU v5p", 95 * GiB, int(95.74 * GiB), 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32 * GiB, int(31.25 * GiB), 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("H100 SXM 80GB", 80 * 10**9, int(0.92 * 80 * 10**9), 989e12, 3350e9,
                 "https://www.nvidia.com/en-us/data-center/h100/"),
}

# Slice name -> (chip, libtpu topology string, chip config, chips per host). v4-N and v5p-N count
# TensorCores (2 per chip, one JAX device per chip in megacore mode); v5e-N and v6e-N count chips.
TOPOLOGIES: dict[str, tuple[str, str, str, tuple[int, int, int]]] = {
    "v4-8": ("v4", "v4:2x2x1", "megacore", (2, 2, 1)),
    "v4-16": ("v4", "v4:2x2x2", "megacore", (2, 2, 1)),
    "v4-32": ("v4", "v4:2x2x4", "megacore", (2, 2, 1)),
    "v4-64": ("v4", "v4:2x4x4", "megacore", (2, 2, 1)),
    "v4-128": ("v4", "v4:4x4x4", "megacore", (2, 2, 1)),
    "v5p-8": ("v5p", "v5p:2x2x1", "megacore", (2, 2, 1)),
    "v5p-16": ("v5p", "v5p:2x2x2", "megacore", (2, 2, 1)),
    "v5p-32": ("v5p", "v5p:2x2x4", "megacore", (2, 2, 1)),
    "v5p-64": ("v5p", "v5p:2x4x4", "megacore", (2, 2, 1)),
    "v5p-128": ("v5p", "v5p:4x4x4", "megacore", (2, 2, 1)),
    "v5e-4": ("v5e", "v5e:2x2", "default", (2, 2, 1)),
    "v5e-8": ("v5e", "v5e:2x4", "default", (2, 2, 1)),
    "v5e-16": ("v5e", "v5e:4x4", "default", (2, 2, 1)),
    "v5e-32": ("v5e", "v5e:4x8", "default", (2, 2, 1)),
    "v5e-64": ("v5e", "v5e:8x8", "default", (2, 2, 1)),
    "v5e-128": ("v5e", "v5e:8x16", "default", (2, 2, 1)),
    "v5e-256": ("v5e", "v5e:16x16", "default", (2, 2, 1)),
    "v6e-4": ("v6e", "v6e:2x2", "default", (2, 2, 1)),
    "v6e-8": ("v6e", "v6e:2x4", "default", (2, 2, 1)),
    "v6e-16": ("v6e", "v6e:4x4", "default", (2, 2, 1)),
    "v6e-32": ("v6e", "v6e:4x8", "default", (2, 2, 1)),
    "v6e-64": ("v6e", "v6e:8x8", "default", (2, 2, 1)),
    "v6e-128": ("v6e", "v6e:8x16", "default", (2, 2, 1)),
    "v6e-256": ("v6e", "v6e:16x16", "default", (2, 2, 1)),
}

# The config mesh presets (configs/qwen2_5_3b_tspo.py MESHES) and the slice each names.
MESH_TOPOLOGY = {"tpu_v4_32": "v4-32", "tpu_v5e_64": "v5e-64", "gpu8": "gpu8xh100", "gpu8_tp2": "gpu8xh100"}


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: its devices (None: estimate only), the chip, and a label."""

    name: str
    chip: Chip
    devices: list | None
    compiled: bool  # False: no compiler for it here, memory is a byte-accounting estimate


def tpu_devices(name: str):
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; choose one of {sorted(TOPOLOGIES)} or 'host'")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax ships it
        raise RuntimeError(f"this jax has no jax.experimental.topologies: {e}") from None
    _, topo, chip_config, per_host = TOPOLOGIES[name]
    # Compiling needs no TPU: let several planner processes load libtpu at once (it takes a lock).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo, chip_config_name=chip_config,
            chips_per_host_bounds=per_host, num_slices=1)
    except Exception as e:  # noqa: BLE001 - libtpu raises plain RuntimeErrors
        raise RuntimeError(
            f"cannot build the TPU topology {topo!r} ({e}). The TPU compiler needs libtpu: "
            "pip install -r requirements-dev.txt (it pins jax[tpu]'s libtpu)") from None
    return list(desc.devices)


def host_memory_bytes() -> int:
    """This machine's RAM (what CPU devices share)."""
    total = proc_bytes("/proc/meminfo", "MemTotal")
    return total if total is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# RAM the trainer process holds beyond its arrays and its compiled programs' buffers: Python and
# the libraries, XLA:CPU compiling new shapes while earlier calls still run, and freed blocks malloc
# keeps. Measured on the 0.5B offline run (docs/POD_PLAN.md, "The 0.5B config on this machine"): its
# resident set peaked 3.7 GiB above the plan's largest function in step 1 and 6.7 GiB above it in
# step 2. `host` plans leave this much out of the usable RAM.
HOST_PROCESS_RESERVE = int(7 * GiB)


def resolve(name: str) -> Target:
    """'host', 'gpu8xh100' (estimate) or a TPU slice name like 'v5e-64'."""
    if name == "host":
        import jax

        devices = jax.devices("cpu")
        mem = host_memory_bytes()
        # One CPU "chip" per device; they share the RAM (less the process's own reserve), so each
        # may use 1/n of it. Peak rates of a CPU are not published per device: a nominal
        # 100 GFLOP/s and 10 GB/s per device make the roofline an order-of-magnitude figure only
        # (the benchmark measures the real ones).
        usable = max(mem - HOST_PROCESS_RESERVE, 0)
        chip = Chip("host CPU", mem // len(devices), usable // len(devices), 100e9, 10e9,
                    f"nominal; usable RAM is MemTotal less {HOST_PROCESS_RESERVE / GiB:.1f} GiB for the process itself")
        return Target("host", chip, devices, True)
    m = re.fullmatch(r"gpu(\d+)xh100", name)
    if m:
        return Target(name, CHIPS["h100"], [None] * int(m.group(1)), False)
    chip = CHIPS[TOPOLOGIES[name][0]] if name in TOPOLOGIES else None
    if chip is None:
        raise ValueError(f"unknown topology {name!r}; choose 'host', 'gpu8xh100' or one of {sorted(TOPOLOGIES)}")
    return Target(name, chip, tpu_devices(name), True)


def chip_named(name: str) -> Chip | None:
    """The CHIPS entry whose name a plan's JSON records (target.chip), e.g. "TPU v5e"."""
    return next((c for c in CHIPS.values() if c.name == name), None)


def gib(x: float) -> float:
    return x / GiB

