"""Projected step time from a plan: each function's roofline time x the calls one step makes.

At the worst case the config allows (every prompt, turn and observation at its limit), and, given
the mean lengths of real episodes (`Lengths`), at those: the rollout decodes only the response
tokens episodes have, refills and appends only their prompt and observation tokens, and the
reference and update run rows at their own widths (update.PolicyUpdater.slices buckets them by
length). Work is scaled linearly in tokens from the compiled worst-case call, which over-charges
attention for shorter rows. A roofline is a lower bound from XLA's cost model, not a measurement.
"""

from __future__ import annotations

import dataclasses

from tspo_jax.planner import analyse, hardware

PHASES = ("rollout", "reference", "update")


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Mean tokens per episode."""

    prompt: float
    turn: float  # policy tokens per turn
    turns: float  # policy turns per episode
    obs: float  # tokens per observation
    searches: float  # observations per episode

    @classmethod
    def parse(cls, text: str) -> "Lengths":
        """From "prompt=200,turn=150,turns=3,obs=400,searches=2" (every field, nothing else)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            kv = dict(part.split("=", 1) for part in text.split(","))
            values = {k.strip(): float(v) for k, v in kv.items()}
        except ValueError:
            raise ValueError(f"--lengths={text!r}: write prompt=P,turn=R,turns=T,obs=O,searches=S") from None
        if set(values) != fields:
            raise ValueError(f"--lengths={text!r} needs exactly {sorted(fields)}, got {sorted(values)}")
        if any(v < 0 for v in values.values()):
            raise ValueError(f"--lengths={text!r}: lengths cannot be negative")
        return cls(**values)

    def tokens(self, kind: str) -> float:
        return {"prompt": self.prompt, "policy": self.turn * self.turns, "observation": self.obs * self.searches,
                "episode": self.prompt + self.turn * self.turns + self.obs * self.searches}[kind]


def scale(fn: dict, lengths: Lengths | None) -> float:
    """How much of its worst-case work one step's calls of `fn` do at these lengths."""
    if lengths is None or not fn.get("tokens"):
        return 1.0
    return min(1.0, lengths.tokens(fn["tokens"]) / fn["worst_tokens"])


def call_seconds(fn: dict, key: str) -> float:
    """One call's time: roofline_s (the lower bound), roofline_xla_s, or "with_collectives": the
    roofline or the collectives' time, whichever is longer (collectives overlapped with compute at
    best; a function without a timed collective keeps its roofline)."""
    if key == "with_collectives":
        return max(fn["roofline_s"], fn.get("collective_s") or 0.0)
    return fn[key]


def step_seconds(functions: list[dict], lengths: Lengths | None = None, key: str = "roofline_s") -> dict[str, float]:
    """{rollout, reference, update, total, eval_amortised} seconds per training step, from each
    function's time per call under `key` (call_seconds)."""
    out = {p: 0.0 for p in PHASES}
    eval_s = 0.0
    for f in functions:
        t = f["calls_per_step"] * call_seconds(f, key) * scale(f, lengths)
        if f["phase"] in out:
            out[f["phase"]] += t
        elif f["phase"] == "eval":
            eval_s += t
    out["total"] = sum(out[p] for p in PHASES)
    out["eval_amortised"] = eval_s
    return out


def add_collective_times(res: dict) -> dict:
    """Fills each function's collective_s and the plan's step times with collectives (also for a
    plan JSON written before they existed: it kept the bytes). Returns `res`."""
    chip = hardware.chip_named(res["target"]["chip"])
    bw = chip.ici_bandwidth if chip is not None and res["target"]["chips"] > 1 else None
    for f in res["functions"]:
        f["collective_s"] = analyse.collective_seconds(f.get("collectives", {}), f["loop_iters"], bw)
    res["target"]["ici_bandwidth"] = bw
    timed = bw is not None and bool(res["functions"])
    res["step_collectives_s"] = step_seconds(res["functions"], key="with_collectives") if timed else None
    at = res.get("at_lengths")
    if at:
        lengths = Lengths(**at["lengths"])
        at["step_collectives_s"] = step_seconds(res["functions"], lengths, "with_collectives") if timed else None
    return res
