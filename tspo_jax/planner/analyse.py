"""Compile one call for the target and read what XLA says about it: per-chip memory, FLOPs, bytes,
collectives, compile time; then its roofline time on the chip (a lower bound from the FLOPs and the
bytes it must move, and XLA's own byte count beside it).

XLA's cost analysis counts a while-loop body once. The loops the planner knows of are counted here:
the call's outer loop (decode steps, update micro-batches, logprob slices) multiplies the body, and
the LM head's loop over position chunks (losses.token_logprobs_and_entropy) is added analytically.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

from tspo_jax.planner.calls import Call

# Collective ops in compiled HLO text and the result shape before them, e.g.
#   %all-gather.3 = bf16[16,2048]{1,0} all-gather(...)   or   (f32[8]{0}, f32[8]{0}) all-reduce-start(
_COLLECTIVE = re.compile(
    r"=\s*(\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_OOM = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\)|Used ([0-9.]+)([KMGT]) of ([0-9.]+)([KMGT]) hbm")
_UNIT = {"K": 1e3, "M": 2**20, "G": 2**30, "T": 2**40}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective produces per device, summed over its ops (loop bodies once)."""
    out: dict[str, int] = {}
    for shape, op in _COLLECTIVE.findall(hlo_text):
        n = 0
        for dtype, dims in _ARRAY.findall(shape):
            size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            n += size * _BYTES.get(dtype, 4)
        out[op] = out.get(op, 0) + n
    return out


def largest_collectives(hlo_text: str, n: int = 8) -> list[dict]:
    """The `n` collective (op, result shape) pairs that produce the most bytes per chip, with how
    many ops share them: what to read when a call's collective bytes are larger than its weights."""
    by: dict[tuple[str, str], list[int]] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        shape = re.sub(r"\{[^}]*\}", "", m.group(1))  # drop layouts: f32[8,2]{1,0} -> f32[8,2]
        entry = by.setdefault((m.group(2), shape), [0, 0])
        entry[0] += sum(collective_bytes(line).values())
        entry[1] += 1
    top = sorted(by.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"op": op, "shape": shape, "bytes": b, "count": c} for (op, shape), (b, c) in top]


@dataclasses.dataclass
class Analysis:
    name: str
    phase: str
    note: str
    calls_per_step: float
    loop_iters: int
    compiled: bool
    error: str = ""
    compile_s: float = 0.0
    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    alias_bytes: int = 0
    resident_extra_bytes: int = 0
    xla_flops: float = 0.0  # per chip, loop bodies once (as XLA reports)
    xla_bytes: float = 0.0
    flops: float = 0.0  # per chip per call, loops counted
    bytes: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)
    largest_collectives: list = dataclasses.field(default_factory=list)  # largest_collectives(hlo)
    # Bytes a call cannot avoid moving: each loop iteration reads its arguments once (the decode
    # step reads the params and the KV cache), plus the outputs not written in place. XLA's
    # "bytes accessed" counts every fusion's operands (a cache update as the whole cache), so it
    # is no lower bound; both are reported.
    bytes_min: float = 0.0
    roofline_s: float = 0.0  # per call: max(FLOPs / peak, bytes_min / bandwidth), a lower bound
    roofline_xla_s: float = 0.0  # per call: max(FLOPs / peak, XLA's bytes / bandwidth)
    needed_bytes: int = 0  # when the compiler refused it: what it said it needed
    tokens: str = ""  # Call.tokens / Call.worst_tokens, for planner.projection
    worst_tokens: int = 0

    @property
    def peak_bytes(self) -> int:
        """Per chip while the call runs: its arguments, outputs (less those aliased to donated
        arguments), temporaries, and the resident state it does not take as arguments."""
        if not self.compiled:
            return self.needed_bytes + self.resident_extra_bytes
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.resident_extra_bytes)


def collective_seconds(collectives: dict, loop_iters: int, ici_bandwidth: float | None) -> float | None:
    """Per call: the bytes the call's collectives produce per chip (each loop iteration's) over the
    chip's all-reduce bandwidth. A coarse floor: it ignores ring/torus step counts and assumes
    every link busy; None where the chip publishes no bandwidth."""
    if not ici_bandwidth:
        return None
    return max(loop_iters, 1) * sum(collectives.values()) / ici_bandwidth


def lm_head_correction(call: Call, run, chips: int) -> float:
    """FLOPs per loop iteration of the LM head's chunks that XLA's count of one chunk leaves out."""
    if call.phase not in ("reference", "update", "warmstart"):
        return 0.0
    cfg, c = run.model_cfg, run.config
    # logprobs(params, tokens, valid); accumulate(params, acc, batch, norm); sft(params, opt_state, batch)
    if call.phase == "reference":
        tokens = call.args[1]
    elif isinstance(call.args[2], dict) and "tokens" in call.args[2]:
        tokens = call.args[2]["tokens"]
    else:  # update/apply: no forward pass
        return 0.0
    rows, width = tokens.shape
    rows_per_iter = rows / max(call.loop_iters, 1)
    positions = width - 1
    chunk = min(c.loss.logprob_chunk, positions)
    n_chunks = math.ceil(positions / chunk)
    head = 2.0 * rows_per_iter * n_chunks * chunk * cfg.hidden_size * cfg.vocab_size / chips
    # forward only for logprobs; forward, its recomputation and two backward matmuls for training
    factor = 1.0 if call.phase == "reference" else 4.0
    return factor * head * (n_chunks - 1) / n_chunks


def compile_call(call: Call, run, chip, chips: int, resident_bytes: dict[str, int]) -> Analysis:
    a = Analysis(call.name, call.phase, call.note, call.calls_per_step, call.loop_iters, compiled=False,
                 tokens=call.tokens, worst_tokens=call.worst_tokens)
    a.resident_extra_bytes = sum(resident_bytes.get(k, 0) for k in call.resident_extra)
    t0 = time.perf_counter()
    try:
        lowered = call.fn.lower(*call.args, **call.static)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA raises XlaRuntimeError / ValueError
        a.compile_s = time.perf_counter() - t0
        msg = str(e)
        a.error = msg.split("\n")[0][:400]
        m = _OOM.search(msg)
        if m and m.group(1):
            a.needed_bytes = int(float(m.group(1)) * _UNIT[m.group(2)])
        elif m:
            a.needed_bytes = int(float(m.group(3)) * _UNIT[m.group(4)])
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        return a
    a.compile_s = time.perf_counter() - t0
    a.compiled = True
    mem = compiled.memory_analysis()
    if mem is not None:
        a.argument_bytes = int(mem.argument_size_in_bytes)
        a.output_bytes = int(mem.output_size_in_bytes)
        a.temp_bytes = int(mem.temp_size_in_bytes)
        a.alias_bytes = int(mem.alias_size_in_bytes)
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    a.xla_flops = float(cost.get("flops", 0.0))
    a.xla_bytes = float(cost.get("bytes accessed", 0.0))
    iters = max(call.loop_iters, 1)
    a.flops = iters * (a.xla_flops + lm_head_correction(call, run, chips))
    a.bytes = iters * a.xla_bytes
    hlo = compiled.as_text() or ""
    a.collectives = collective_bytes(hlo)
    a.largest_collectives = largest_collectives(hlo)
    a.bytes_min = iters * a.argument_bytes + a.output_bytes - a.alias_bytes
    a.roofline_s = max(a.flops / chip.bf16_flops, a.bytes_min / chip.hbm_bandwidth)
    a.roofline_xla_s = max(a.flops / chip.bf16_flops, a.bytes / chip.hbm_bandwidth)
    return a
