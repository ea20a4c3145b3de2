"""Does a training config fit its hardware, and how fast can one step be? Compiled, not guessed.

  python -m tspo_jax.plan --config=configs/qwen2_5_3b_tspo.py:tpu_v5e_64 --topology=v5e-64 \\
      [--out=plan.json] [--min_headroom=0.1] [--lengths=prompt=P,turn=R,turns=T,obs=O,searches=S]
      [--config.KEY=VALUE ...]

Builds what the trainer builds, abstractly (no weights, no data), and compiles every function one
training step runs for the topology: a TPU slice through libtpu's compiler on this CPU machine
(v4-N, v5e-N, v5p-N, v6e-N), `host` for this machine's CPU devices and RAM, or `gpu8xh100` (no
compiler here: an estimate from the resident bytes only). Per function: per-chip memory against
the chip's capacity, FLOPs, bytes, collective bytes, compile time and roofline time; for the run:
the resident state and a projected step time. The roofline is a lower bound from XLA's cost model
and the chip's published peaks, not a measurement.

Exit status 1 when a function does not fit (peak above (1 - min_headroom) x usable HBM): the
message names it, says how many GB it is over, and lists the knobs that shrink it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import sys
import time

import jax
from absl import app, flags

from tspo_jax import run_flags, xla_flags
from tspo_jax.planner import abstract, analyse, calls as calls_lib, hardware, projection, report

log = logging.getLogger("tspo_jax.plan")

KNOBS = {
    "rollout": "rollout.fill_rows (rows per refill/append call), rollout.slots (decode rows at once), "
               "rollout.gather_params (off: no gathered copy of the params), rollout.max_context_length, a mesh "
               "with more batch devices, model.dtype=bfloat16",
    "eval": "eval.batch_size, rollout.fill_rows, rollout.max_context_length",
    "reference": "logprob_micro_batch (rows per reference/old-logprob slice), loss.logprob_chunk, model.remat",
    "update": "micro_batch (rows per gradient micro-batch), loss.logprob_chunk, model.remat=True, "
              "model.attention_chunk, a mesh with more fsdp devices (params and Adam moments)",
    "warmstart": "warmstart.batch_size, model.remat=True",
}


def plan(config, topology: str, min_headroom: float = 0.1, only: tuple[str, ...] = (),
         slots: int = 0, lengths: projection.Lengths | None = None) -> dict:
    """Compiles every call of one step for `topology`; returns the JSON-able result. `slots` > 0
    plans the rollout at that many decode rows (what rollout.slots sets; for configs without it).
    `lengths`: also project the step at these mean episode lengths (the worst case always)."""
    target = hardware.resolve(topology)
    chip = target.chip
    chips = len(target.devices)
    devices = target.devices
    if not target.compiled:
        # No CUDA compiler here: XLA:CPU compiles the same program over as many CPU devices, and its
        # memory analysis stands in for the GPU's (an estimate, and labelled one).
        cpus = jax.devices("cpu")
        if len(cpus) < chips:
            raise ValueError(f"estimating {topology} needs {chips} CPU devices, {len(cpus)} are visible: set "
                             f"XLA_FLAGS=--xla_force_host_platform_device_count={chips}")
        devices = cpus[:chips]
    run = abstract.build_abstract(config, devices, slots)
    resident = {"params": abstract.per_device_bytes(run.params),
                "opt_state": abstract.per_device_bytes(run.opt_state),
                "ref_params": abstract.per_device_bytes(run.ref_params) if run.ref_params is not None else 0}
    shapes = calls_lib.rollout_shapes(run)
    kv_cache = abstract.per_device_bytes(run.sampler.abstract_cache(shapes["slots"], shapes["max_len"]).cache)
    # rollout.gather_params: the compute-dtype copy the decode reads, alive during the rollout.
    decode_copy = (abstract.per_device_bytes(run.sampler.gathered(run.params))
                   if config.rollout.get("gather_params", False) else 0)
    results = []
    for call in calls_lib.step_calls(run):
        if only and not any(call.name.startswith(o) for o in only):
            continue
        log.info("compiling %s (%s) ...", call.name, call.note)
        a = analyse.compile_call(call, run, chip, chips, resident)
        log.info("  %s: %.1f s, peak %.2f GiB/chip, roofline %.3g s/call", call.name, a.compile_s,
                 hardware.gib(a.peak_bytes), a.roofline_s)
        results.append(a)
        # A full-size compile leaves gigabytes of host memory in JAX's caches (the 3B update on
        # v4-32: 21 GB resident after four functions, and the next compile was OOM-killed).
        jax.clear_caches()
        gc.collect()
    limit = (1.0 - min_headroom) * chip.usable_bytes
    functions = []
    for a in results:
        d = {k: getattr(a, k) for k in a.__dataclass_fields__}
        d["peak_bytes"] = a.peak_bytes
        d["fits"] = a.compiled and a.peak_bytes <= limit
        d["headroom"] = 1.0 - a.peak_bytes / chip.usable_bytes
        functions.append(d)
    step = projection.step_seconds(functions)
    step_s, eval_s = step["total"], step["eval_amortised"]
    at_lengths = None
    if lengths is not None:
        st = projection.step_seconds(functions, lengths)
        per = st["total"] + st["eval_amortised"]
        at_lengths = {"lengths": dataclasses.asdict(lengths), "episode_tokens": lengths.tokens("episode"),
                      "step_s": st, "projected_s": {"200_steps": 200 * per, "total_steps": config.total_steps * per},
                      "step_xla_bytes_s": projection.step_seconds(functions, lengths, "roofline_xla_s")}
    model = run.model_cfg
    return projection.add_collective_times({
        "config": dict(mesh=list(config.mesh.shape), prompts_per_step=config.prompts_per_step,
                       group_size=config.group_size, mini_batch=config.mini_batch, micro_batch=config.micro_batch,
                       logprob_micro_batch=config.get("logprob_micro_batch"), slots=slots or config.rollout.get("slots", 0),
                       logprob_chunk=config.loss.logprob_chunk, remat=config.model.remat,
                       max_context_length=config.rollout.max_context_length, total_steps=config.total_steps),
        "model": dict(num_params=model.num_params(), num_layers=model.num_layers, hidden_size=model.hidden_size,
                      vocab_size=model.vocab_size, param_dtype=model.param_dtype, dtype=model.dtype),
        "shapes": {k: v for k, v in shapes.items() if k != "cfg"} | {"update_width": calls_lib.update_width(run)},
        "target": dict(name=topology, chip=chip.name, chips=chips, usable_bytes=chip.usable_bytes,
                       hbm_bytes=chip.hbm_bytes, bf16_flops=chip.bf16_flops, hbm_bandwidth=chip.hbm_bandwidth,
                       source=chip.source, compiled=target.compiled),
        "min_headroom": min_headroom,
        "resident_bytes": resident | {"kv_cache": kv_cache, "decode_params": decode_copy,
                                      "total": sum(resident.values()) + kv_cache + decode_copy},
        "functions": functions,
        # None: nothing compiled (--only matched nothing), only the resident state is known.
        "fits": all(f["fits"] for f in functions) if functions else None,
        "step_s": step,
        "step_xla_bytes_s": projection.step_seconds(functions, key="roofline_xla_s"),
        "projected_s": {"200_steps": 200 * (step_s + eval_s), "total_steps": config.total_steps * (step_s + eval_s)},
        "at_lengths": at_lengths,
        "jax": jax.__version__,
    })


def verdict(res: dict) -> list[str]:
    """One line per function that does not fit: its name, how far over, and the knobs."""
    lines = []
    usable = res["target"]["usable_bytes"]
    limit = (1.0 - res["min_headroom"]) * usable
    for f in res.get("functions", []):
        if f["fits"]:
            continue
        over = (f["peak_bytes"] - limit) / 2**30
        why = "" if f["compiled"] else " (the compiler refused it: " + f["error"][:160] + ")"
        lines.append(f"DOES NOT FIT: {f['name']} needs {f['peak_bytes'] / 2**30:.2f} GiB per chip, "
                     f"{over:.2f} GiB over {limit / 2**30:.2f} GiB ({1 - res['min_headroom']:.0%} of "
                     f"{usable / 2**30:.2f} GiB){why}. Knobs: {KNOBS.get(f['phase'], '')}")
    return lines


_CONFIG = run_flags.CONFIG  # the one --config flag (configs/NAME.py[:MESH]) every entry point shares
_TOPOLOGY = flags.DEFINE_string("topology", None, "v4-32, v5e-64, v5p-N, v6e-N, host or gpu8xh100; default: "
                                "the slice the config's mesh name says (tpu_v5e_64 -> v5e-64)")
_OUT = flags.DEFINE_string("out", "", "write FILE.json and FILE.md (markdown) here")
_MIN_HEADROOM = flags.DEFINE_float("min_headroom", 0.1, "fraction of usable HBM to keep free")
_SLOTS = flags.DEFINE_integer("slots", 0, "plan the rollout at this many decode rows (rollout.slots)")
_ONLY = flags.DEFINE_list("only", [], "compile only the calls whose names start with these (e.g. update)")
_LENGTHS = flags.DEFINE_string("lengths", "", "also project the step at these mean episode lengths, e.g. "
                               "prompt=200,turn=150,turns=3,obs=400,searches=2 (a run's own: its metrics)")


def _topology_from_argv() -> str:
    for a in sys.argv:
        if a.startswith("--config=") and ":" in a:
            return hardware.MESH_TOPOLOGY.get(a.split(":", 1)[1], "")
    return ""


def main(argv):
    del argv
    xla_flags.use_memory_scheduler_on_cpu()  # as the trainer: --topology=host compiles what it runs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if _CONFIG.value is None:
        raise app.UsageError("pass --config=configs/NAME.py[:MESH]")
    topology = _TOPOLOGY.value or _topology_from_argv()
    if not topology:
        raise app.UsageError("pass --topology=v4-32|v5e-64|v5p-N|v6e-N|host|gpu8xh100")
    t0 = time.perf_counter()
    lengths = projection.Lengths.parse(_LENGTHS.value) if _LENGTHS.value else None
    res = plan(_CONFIG.value, topology, _MIN_HEADROOM.value, tuple(_ONLY.value), _SLOTS.value, lengths)
    res["command"] = " ".join(["python -m tspo_jax.plan", *sys.argv[1:]])
    res["wall_s"] = time.perf_counter() - t0
    md = report.markdown(res)
    print(md)
    if _OUT.value:
        out = _OUT.value if _OUT.value.endswith(".json") else _OUT.value + ".json"
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        with open(out[: -len(".json")] + ".md", "w") as f:
            f.write(md)
    bad = verdict(res)
    for line in bad:
        print(line, file=sys.stderr)
    if bad:
        sys.exit(1)
    if res["fits"] is None:
        print("nothing compiled (--only matched no function): the resident state above is all that was planned")
        return
    print(f"fits: {res['target']['name']}, every function within {1 - res['min_headroom']:.0%} of "
          f"{res['target']['usable_bytes'] / 2**30:.2f} GiB per chip")


if __name__ == "__main__":
    app.run(main)
