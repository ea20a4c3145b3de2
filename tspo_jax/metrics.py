"""Per-step metrics: one JSON object per line in metrics.jsonl, TensorBoard events, and a plot."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np


def _scalar(v):
    v = np.asarray(v)
    if v.size != 1:
        return None
    v = v.item()
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


class MetricsWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, object]) -> dict:
        row = {"step": int(step)}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is not None:
                row[k] = s
        if not self.enabled:
            return row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        return row

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, so re-run steps are not doubled."""
        if not self.enabled or not os.path.exists(self.path):
            return
        rows = read_metrics(self.path)
        with open(self.path, "w") as f:
            for r in rows:
                if r["step"] <= step:
                    f.write(json.dumps(r) + "\n")

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training(rows: list[dict], out_png: str, title: str = "") -> str:
    """Reward and homogenized-group fraction over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "critic/score/mean", "reward (EM)"),
                           (axes[1], "adv/homogenized_group_frac", "homogenized-group fraction")):
        ax.plot(steps, [r.get(key, np.nan) for r in rows], marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
