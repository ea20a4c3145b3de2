"""XLA flags the entry points set before JAX starts its backends.

XLA:CPU's default scheduler orders a program for concurrency, not memory: in a rematerialised
backward pass it runs every layer's recomputation before the gradients that consume them, so all of
them are alive at once. Measured with XLA:CPU's memory analysis on the 0.5B update (2 rows x 1,536
tokens, 4 layers, remat): 2.66 GB of temporaries with it, 0.56 GB without; the whole 0.5B update of
configs/qwen2_5_0_5b_offline.py needed 77 GB and ran out of this 24 GB machine's RAM. TPU and GPU
compilers schedule for memory already and ignore this CPU flag.
"""

from __future__ import annotations

import os

CPU_MEMORY_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def use_memory_scheduler_on_cpu() -> None:
    """Adds CPU_MEMORY_FLAGS to $XLA_FLAGS unless the user set them; call before JAX's first use
    of a device (XLA reads the variable when it creates its first client)."""
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_MEMORY_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
