"""Where our time goes: one extra run under jax.profiler, summarised per compiled module and op.

The perfetto trace JAX writes holds one event per executed XLA op (with its module and HLO op
name) on each runtime thread; summing them per op shows what dominates. Ops of one module may run
concurrently on several threads, so a module's busy time can exceed the wall time. To see what an
op computes, rerun with XLA_FLAGS=--xla_dump_to=DIR and look the op name up in that module's
`*after_optimizations.txt`.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import time

import jax


def summarize(trace_file: str, top: int = 12) -> dict:
    with gzip.open(trace_file) as f:
        events = json.load(f)["traceEvents"]
    busy: dict = collections.Counter()
    ops: dict = collections.defaultdict(collections.Counter)
    counts: dict = collections.defaultdict(collections.Counter)
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or "hlo_module" not in args:
            continue
        mod, op = args["hlo_module"], args.get("hlo_op", e["name"])
        ops[mod][op] += e["dur"] / 1e3
        counts[mod][op] += 1
        busy[mod] += e["dur"] / 1e3
    return {
        "trace": trace_file,
        "modules": {
            mod: {
                "busy_ms": round(busy[mod], 2),
                "top_ops": [[op, round(ms, 2), counts[mod][op], round(100 * ms / busy[mod], 1)]
                            for op, ms in ops[mod].most_common(top)],
            }
            for mod, _ in busy.most_common()
        },
    }


def profile(fn, out_dir: str, top: int = 12) -> dict:
    """Runs fn() once under the profiler; returns its wall time and the per-op summary."""
    os.makedirs(out_dir, exist_ok=True)
    before = set(glob.glob(os.path.join(out_dir, "**", "*.json.gz"), recursive=True))
    t0 = time.perf_counter()
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        fn()
    wall = time.perf_counter() - t0
    new = sorted(set(glob.glob(os.path.join(out_dir, "**", "*.json.gz"), recursive=True)) - before)
    if not new:
        return {"wall_s": wall, "error": f"no perfetto trace appeared under {out_dir}"}
    return {"wall_s": wall, **summarize(new[-1], top)}
