"""Per-step metrics: one JSON object per line in metrics.jsonl, TensorBoard events, and a plot."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping

import numpy as np

from tspo_jax import paths


def _scalar(v):
    """A loggable number, or None. NaN and inf are kept: a non-finite loss must show up in
    metrics.jsonl (as NaN / Infinity, which Python's json reads back) and in TensorBoard."""
    v = np.asarray(v)
    if v.size != 1:
        return None
    v = v.item()
    return v if isinstance(v, (int, float)) else None


class MetricsWriter:
    """metrics.jsonl is rewritten whole on every write (atomically): remote workdirs (gs://) have no
    append, and a run logs one small row per step."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.path = str(paths.resolve(workdir) / "metrics.jsonl")
        self.enabled = enabled
        self._rows = read_metrics(self.path) if enabled and paths.resolve(self.path).exists() else []
        self._tb = None
        self._tb_dir = paths.resolve(workdir) / "tensorboard"
        self._tb_stage = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            # A remote workdir gets its event files staged locally and copied up on each write:
            # tensorboardX's own GCS writer re-uploads when garbage-collected and retries for minutes.
            if paths.is_remote(workdir):
                self._tb_stage = tempfile.mkdtemp(prefix="tspo_tensorboard_")
            self._tb = SummaryWriter(self._tb_stage or str(self._tb_dir))

    def write(self, step: int, metrics: Mapping[str, object]) -> dict:
        row = {"step": int(step)}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is not None:
                row[k] = s
        if not self.enabled:
            return row
        self._rows.append(row)
        self._flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
            self._upload_tensorboard()
        return row

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, so re-run steps are not doubled."""
        if not self.enabled:
            return
        self._rows = [r for r in self._rows if r["step"] <= step]
        self._flush()

    def _flush(self) -> None:
        paths.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))

    def _upload_tensorboard(self) -> None:
        if self._tb_stage is None:
            return
        for name in os.listdir(self._tb_stage):
            with open(os.path.join(self._tb_stage, name), "rb") as f:
                paths.write_bytes(self._tb_dir / name, f.read())

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._upload_tensorboard()
            if self._tb_stage:
                shutil.rmtree(self._tb_stage, ignore_errors=True)


def read_metrics(path: str) -> list[dict]:
    text = paths.resolve(path).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
    paths.save_figure(fig, out_png)
    plt.close(fig)
    return out_png
