"""Repetitions that are fair on a shared, noisy machine.

Every contender runs once first (its compile / warm-up call, timed on its own), then the
repetitions go round-robin with the starting contender rotating (ours, theirs; theirs, ours; ...),
so load that comes and goes hits all of them alike. A contender returns a dict of named durations
(e.g. prefill and decode) measured inside its own call; we keep every sample and report medians.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from typing import Callable, Mapping

log = logging.getLogger(__name__)

Contender = Callable[[], Mapping[str, float]]


@dataclasses.dataclass
class Samples:
    """Durations of one contender: the first (warm-up) call's parts, then one list per part."""

    first: dict[str, float]
    parts: dict[str, list[float]]
    load: list[float]  # 1-minute load average before each repetition

    def median(self, part: str = "total") -> float:
        return statistics.median(self.parts[part])

    def spread(self, part: str = "total") -> float:
        """(max - min) / median: how much the repetitions disagree."""
        xs = self.parts[part]
        return (max(xs) - min(xs)) / statistics.median(xs) if statistics.median(xs) > 0 else 0.0

    def compile_s(self, part: str = "total") -> float:
        """First call minus a steady one: tracing, compilation and first-touch costs."""
        return max(self.first[part] - self.median(part), 0.0)

    def summary(self) -> dict:
        return {
            "median_s": {k: statistics.median(v) for k, v in self.parts.items()},
            "min_s": {k: min(v) for k, v in self.parts.items()},
            "spread": {k: self.spread(k) for k in self.parts},
            "first_call_s": dict(self.first),
            "compile_s": self.compile_s() if "total" in self.parts else None,
            "samples_s": {k: list(v) for k, v in self.parts.items()},
            "reps": len(next(iter(self.parts.values()))),
            "load_avg": list(self.load),
        }


def _timed(fn: Contender) -> dict[str, float]:
    t0 = time.perf_counter()
    parts = dict(fn())
    parts.setdefault("total", time.perf_counter() - t0)
    for k, v in parts.items():
        if not (isinstance(v, (int, float)) and v >= 0):
            raise ValueError(f"contender returned a bad duration {k}={v!r}; return seconds >= 0")
    return parts


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on every platform
        return float("nan")


def interleaved(contenders: Mapping[str, Contender], reps: int, warmup: int = 1) -> dict[str, Samples]:
    """Runs each contender `warmup` times (the first call is kept as `first`), then `reps` rounds
    round-robin with a rotating start. Returns the samples by name."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first call holds compilation), got {warmup}")
    names = list(contenders)
    if not names:
        raise ValueError("no contenders to time")
    first: dict[str, dict[str, float]] = {}
    for name in names:
        for w in range(warmup):
            parts = _timed(contenders[name])
            if w == 0:
                first[name] = parts
            log.info("  warm-up %-22s %s", name, _fmt(parts))
    samples = {n: Samples(first[n], {}, []) for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            load = _load()
            parts = _timed(contenders[name])
            s = samples[name]
            s.load.append(load)
            for k, v in parts.items():
                s.parts.setdefault(k, []).append(v)
            log.info("  rep %d  %-22s %s", r + 1, name, _fmt(parts))
    return samples


def _fmt(parts: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}s" for k, v in parts.items())
