"""TSPO against GRPO (or any advantage estimators) over several seeds, from the same warm start.

  python -m tspo_jax.compare --config=configs/demo.py --workdir=runs/compare \
      [--methods=tspo,grpo] [--seeds=0,1,2] [--warmstart_from=runs/demo/warmstart] [--config.KEY=VALUE ...]

Every run shares the config, the warm start and the seeds; only `advantage.name` differs. Writes one
training workdir per (method, seed), then comparison.png (reward and homogenized-group fraction,
mean and range over seeds) and comparison.md / comparison.json (the table).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from absl import app, flags

from tspo_jax import run_flags
from tspo_jax.metrics import read_metrics
from tspo_jax.train import Trainer  # a comparison is several training runs

_METHODS = flags.DEFINE_list("methods", ["tspo", "grpo"], "advantage estimators to compare")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (the same for every method)")
_WARMSTART = flags.DEFINE_string("warmstart_from", "", "reuse this warm start (a run's workdir/warmstart)")

LAST_K = 5  # steps averaged for the table's "late" columns


def run_one(config, workdir: str) -> list[dict]:
    trainer = Trainer(config, workdir)
    try:
        trainer.train()
    finally:
        trainer.close()
    return read_metrics(os.path.join(workdir, "metrics.jsonl"))


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict:
    table = {}
    for method, by_seed in runs.items():
        rows = []
        for seed, metrics in sorted(by_seed.items()):
            steps = [m for m in metrics if "critic/score/mean" in m]
            evals = [m for m in metrics if "val/em/all" in m]
            rows.append(
                {
                    "seed": seed,
                    "reward_first": float(np.mean([m["critic/score/mean"] for m in steps[:LAST_K]])),
                    "reward_last": float(np.mean([m["critic/score/mean"] for m in steps[-LAST_K:]])),
                    "homogenized": float(np.mean([m["adv/homogenized_group_frac"] for m in steps])),
                    "folr_rescued": float(np.mean([m["adv/folr_rescued_frac"] for m in steps])),
                    "val_em_start": evals[0]["val/em/all"] if evals else float("nan"),
                    "val_em_end": evals[-1]["val/em/all"] if evals else float("nan"),
                }
            )
        table[method] = {
            "seeds": rows,
            **{k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "seed"},
        }
    return table


def format_table(table: dict) -> str:
    lines = [
        f"| method | seeds | reward, first {LAST_K} steps | reward, last {LAST_K} steps | homogenized groups "
        "| all-wrong groups given signal by FOLR | held-out EM at start | held-out EM at end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, t in table.items():
        lines.append(
            f"| {method} | {len(t['seeds'])} | {t['reward_first']:.3f} | {t['reward_last']:.3f} | "
            f"{t['homogenized']:.3f} | {t['folr_rescued']:.3f} | {t['val_em_start']:.3f} | {t['val_em_end']:.3f} |"
        )
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, list[dict]]], out_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label in (
        (axes[0], "critic/score/mean", "training reward (EM)"),
        (axes[1], "adv/homogenized_group_frac", "homogenized-group fraction"),
    ):
        for method, by_seed in runs.items():
            series = [[m[key] for m in metrics if key in m] for metrics in by_seed.values()]
            n = min(len(s) for s in series)
            arr = np.asarray([s[:n] for s in series])
            steps = np.arange(1, n + 1)
            ax.plot(steps, arr.mean(0), label=f"{method} (mean of {len(series)} seeds)")
            ax.fill_between(steps, arr.min(0), arr.max(0), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv):
    del argv
    run_flags.setup_logging()
    if run_flags.CONFIG.value is None or not run_flags.WORKDIR.value:
        raise app.UsageError("pass --config=configs/NAME.py and --workdir=DIR")
    workdir = os.path.abspath(run_flags.WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    runs: dict[str, dict[int, list[dict]]] = {}
    for seed in [int(s) for s in _SEEDS.value]:
        for method in _METHODS.value:
            config = run_flags.CONFIG.value.copy_and_resolve_references()
            config.unlock()
            config.advantage.name = method
            config.seed = seed
            if _WARMSTART.value:
                config.warmstart.from_dir = os.path.abspath(_WARMSTART.value)
            logging.info("run %s seed %d", method, seed)
            runs.setdefault(method, {})[seed] = run_one(config, os.path.join(workdir, f"{method}_seed{seed}"))
    table = summarize(runs)
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump(table, f, indent=1)
    md = format_table(table)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(md + "\n")
    plot(runs, os.path.join(workdir, "comparison.png"))
    print(md)


if __name__ == "__main__":
    app.run(main)
