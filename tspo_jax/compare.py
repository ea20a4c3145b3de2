"""TSPO against GRPO (and tspo_turn) over RL seeds and warm-start seeds: the pre-registered comparison.

  python -m tspo_jax.compare --config=configs/demo.py --workdir=runs/compare \
      [--methods=tspo,grpo,tspo_turn] [--seeds=0,1,2,3,4] [--warmstart_seeds=0,1] \
      [--baseline=grpo] [--warmstart_from=DIR] [--summarize_only] [--config.KEY=VALUE ...]

Each warm-start seed's warm start is trained once (`warmstart.seed`, in the first run of that
seed) and shared by every method and RL seed of it; the runs of one (warm-start seed, RL seed)
pair share the config, the budget and the prompt stream, and differ only in `advantage.name`.
Writes one training workdir per run (a rerun resumes unfinished runs and reuses finished ones;
`--summarize_only` trains nothing and summarizes the finished ones), then:
  comparison.json  every run's numbers, the per-method summary and the paired tests;
  comparison.md    the tables;
  comparison.png   held-out EM, training reward and homogenized-group fraction over steps.

The paired tests compare each method with `--baseline` on the per-(warm-start seed, RL seed)
differences of (a) the final held-out EM (the primary outcome) and (b) the mean held-out EM over
the evaluations after step 0 (learning speed): a two-sided Wilcoxon signed-rank test
(scipy.stats.wilcoxon, zero differences dropped) and a percentile bootstrap 95% CI of the mean
difference (10,000 resamples, fixed seed).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time

import numpy as np
from absl import app, flags

from tspo_jax import run_flags
from tspo_jax.metrics import read_metrics
from tspo_jax.train import Trainer  # a comparison is several training runs

_METHODS = flags.DEFINE_list("methods", ["tspo", "grpo", "tspo_turn"], "advantage estimators to compare")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "RL seeds (the same for every method)")
_WS_SEEDS = flags.DEFINE_list("warmstart_seeds", ["0", "1"],
                              "warm-start seeds (warmstart.seed); each warm start is trained once and shared")
_BASELINE = flags.DEFINE_string("baseline", "grpo", "the method the paired tests compare every other one with")
_SUMMARIZE_ONLY = flags.DEFINE_bool("summarize_only", False,
                                    "train nothing: summarize the runs already finished under --workdir")
_WARMSTART = flags.DEFINE_string("warmstart_from", "",
                                 "reuse this warm start (a run's workdir/warmstart); only with one warm-start seed")

LAST_K = 5  # steps averaged for the table's "first/last steps" columns
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def run_one(config, workdir: str) -> tuple[list[dict], float]:
    """Trains (or resumes, or finds finished) one run; its metrics and its wall time, summed over
    the invocations that trained it (kept in wall_s.json)."""
    wall_file = os.path.join(workdir, "wall_s.json")
    before = json.load(open(wall_file)) if os.path.exists(wall_file) else 0.0
    t0 = time.perf_counter()
    trainer = Trainer(config, workdir)
    try:
        trainer.train()
    finally:
        trainer.close()
    wall = before + time.perf_counter() - t0
    with open(wall_file, "w") as f:
        json.dump(wall, f)
    return read_metrics(os.path.join(workdir, "metrics.jsonl")), wall


def finished_run(workdir: str, total_steps: int) -> tuple[list[dict], float] | None:
    """A run's metrics and wall time if it reached total_steps, else None."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    metrics = read_metrics(path)
    if not metrics or metrics[-1]["step"] != total_steps:
        return None
    wall_file = os.path.join(workdir, "wall_s.json")
    return metrics, (json.load(open(wall_file)) if os.path.exists(wall_file) else float("nan"))


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(diffs, *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `diffs` (resampled with replacement)."""
    d = np.asarray(diffs, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def paired_test(a, b) -> dict:
    """Paired comparison of a against b (same pairing order): mean difference a - b, its std,
    wins/ties/losses, two-sided Wilcoxon signed-rank (zeros dropped; p = 1 when every difference
    is 0) and a bootstrap 95% CI of the mean difference."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_test needs two equal-length 1-D samples, got shapes {a.shape} and {b.shape}")
    d = a - b
    nonzero = int(np.count_nonzero(d))
    if nonzero:
        res = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
        w, p = float(res.statistic), float(res.pvalue)
    else:
        w, p = 0.0, 1.0
    lo, hi = bootstrap_ci(d)
    return {"n": len(d), "mean_diff": float(d.mean()), "std_diff": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "losses": int((d < 0).sum()),
            "nonzero": nonzero, "wilcoxon_W": w, "wilcoxon_p": p, "ci95": [lo, hi]}


# ----------------------------------------------------------------------------- summary


def run_row(metrics: list[dict]) -> dict:
    """One run's numbers from its metrics rows."""
    steps = [m for m in metrics if "critic/score/mean" in m]
    evals = [m for m in metrics if "val/em/all" in m]
    later = [m["val/em/all"] for m in evals if m["step"] > 0]
    return {
        "reward_first": float(np.mean([m["critic/score/mean"] for m in steps[:LAST_K]])),
        "reward_last": float(np.mean([m["critic/score/mean"] for m in steps[-LAST_K:]])),
        "homogenized": float(np.mean([m["adv/homogenized_group_frac"] for m in steps])),
        "folr_rescued": float(np.mean([m["adv/folr_rescued_frac"] for m in steps])),
        "val_em_start": evals[0]["val/em/all"] if evals else float("nan"),
        "val_em_end": evals[-1]["val/em/all"] if evals else float("nan"),
        "val_em_mean": float(np.mean(later)) if later else float("nan"),
    }


def summarize(runs: dict[str, dict], wall: dict | None = None, baseline: str = "grpo") -> dict:
    """runs[method][(ws_seed, seed)] = metrics rows (or runs[method][seed], one warm start).

    Returns {"methods": {method: {"runs": [...], mean/std of every number}}, "paired": {...}}."""
    methods = {}
    for method, by_key in runs.items():
        rows = []
        for key, metrics in sorted(by_key.items()):
            ws, seed = key if isinstance(key, tuple) else (None, key)
            row = {"warmstart_seed": ws, "seed": seed, **run_row(metrics)}
            if wall and (method, key) in wall:
                row["wall_s"] = wall[(method, key)]
            row["val_em_gain"] = row["val_em_end"] - row["val_em_start"]
            rows.append(row)
        numbers = [k for k in rows[0] if k not in ("warmstart_seed", "seed") and all(k in r for r in rows)]
        methods[method] = {"runs": rows}
        for k in numbers:
            vals = np.asarray([r[k] for r in rows], np.float64)
            methods[method][k] = float(vals.mean())
            methods[method][k + "_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    paired = {}
    if baseline in runs:
        for method in runs:
            if method == baseline:
                continue
            keys = sorted(set(runs[method]) & set(runs[baseline]))
            if not keys:
                continue
            mine = {(r["warmstart_seed"], r["seed"]): r for r in methods[method]["runs"]}
            base = {(r["warmstart_seed"], r["seed"]): r for r in methods[baseline]["runs"]}
            pairs = [k if isinstance(k, tuple) else (None, k) for k in keys]
            paired[f"{method}-{baseline}"] = {
                outcome: paired_test([mine[k][outcome] for k in pairs], [base[k][outcome] for k in pairs])
                for outcome in ("val_em_end", "val_em_mean")
            }
    return {"methods": methods, "paired": paired}


def format_tables(summary: dict) -> str:
    def ms(t, k):
        return f"{t[k]:.3f} ± {t[k + '_std']:.3f}"

    lines = [
        "| method | runs | held-out EM at start | held-out EM at end | gain | mean held-out EM after step 0 "
        f"| reward, first {LAST_K} steps | reward, last {LAST_K} steps | homogenized groups "
        "| all-wrong groups given signal by FOLR | wall time per run (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, t in summary["methods"].items():
        wall = ms(t, "wall_s") if "wall_s" in t else "n/a"
        lines.append(
            f"| {method} | {len(t['runs'])} | {ms(t, 'val_em_start')} | {ms(t, 'val_em_end')} | {ms(t, 'val_em_gain')} "
            f"| {ms(t, 'val_em_mean')} | {ms(t, 'reward_first')} | {ms(t, 'reward_last')} | {ms(t, 'homogenized')} "
            f"| {ms(t, 'folr_rescued')} | {wall} |")
    lines += ["", "Per run: held-out EM start -> end (mean after step 0)", "",
              "| warm-start seed | RL seed | " + " | ".join(summary["methods"]) + " |",
              "|---:|---:|" + "---:|" * len(summary["methods"])]
    first = next(iter(summary["methods"].values()))["runs"]
    index = {m: {(r["warmstart_seed"], r["seed"]): r for r in t["runs"]} for m, t in summary["methods"].items()}
    for r0 in first:
        key = (r0["warmstart_seed"], r0["seed"])
        cells = []
        for m in summary["methods"]:
            r = index[m].get(key)
            cells.append(f"{r['val_em_start']:.3f} -> {r['val_em_end']:.3f} ({r['val_em_mean']:.3f})" if r else "")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    if summary["paired"]:
        lines += ["", "Paired tests (per (warm-start seed, RL seed) differences, method - baseline)", "",
                  "| comparison | outcome | n | mean diff ± std | wins/ties/losses | Wilcoxon W | p (two-sided) "
                  "| bootstrap 95% CI of mean diff |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, tests in summary["paired"].items():
            for outcome, t in tests.items():
                lines.append(
                    f"| {name} | {outcome} | {t['n']} | {t['mean_diff']:+.3f} ± {t['std_diff']:.3f} "
                    f"| {t['wins']}/{t['ties']}/{t['losses']} | {t['wilcoxon_W']:.1f} | {t['wilcoxon_p']:.4f} "
                    f"| [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], out_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
    for ax, key, label in (
        (axes[0], "val/em/all", "held-out EM (greedy)"),
        (axes[1], "critic/score/mean", "training reward (EM)"),
        (axes[2], "adv/homogenized_group_frac", "homogenized-group fraction"),
    ):
        for method, by_key in runs.items():
            series = [[(m["step"], m[key]) for m in metrics if key in m] for metrics in by_key.values()]
            n = min(len(s) for s in series)
            if not n:
                continue
            steps = np.asarray([st for st, _ in series[0][:n]])
            arr = np.asarray([[v for _, v in s[:n]] for s in series])
            ax.plot(steps, arr.mean(0), marker="o" if key == "val/em/all" else None,
                    label=f"{method} (mean of {len(series)} runs)")
            ax.fill_between(steps, arr.min(0), arr.max(0), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _existing_warmstart(workdir: str, ws: int) -> str:
    """The warm start an earlier invocation trained for warm-start seed `ws` (in one of its runs), or ""."""
    base = os.path.join(workdir, f"ws{ws}")
    found = sorted(glob.glob(os.path.join(base, "*", "warmstart", "params")))
    return os.path.dirname(found[0]) if found else ""


def main(argv):
    del argv
    run_flags.setup_logging()
    if run_flags.CONFIG.value is None or not run_flags.WORKDIR.value:
        raise app.UsageError("pass --config=configs/NAME.py and --workdir=DIR")
    ws_seeds = [int(s) for s in _WS_SEEDS.value]
    if _WARMSTART.value and len(ws_seeds) != 1:
        raise app.UsageError("--warmstart_from names one warm start: pass one --warmstart_seeds value with it")
    workdir = os.path.abspath(run_flags.WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    runs: dict[str, dict] = {}
    wall: dict = {}
    t_all = time.perf_counter()
    for ws in ws_seeds:
        shared = os.path.abspath(_WARMSTART.value) if _WARMSTART.value else _existing_warmstart(workdir, ws)
        for seed in [int(s) for s in _SEEDS.value]:
            for method in _METHODS.value:
                config = run_flags.CONFIG.value.copy_and_resolve_references()
                config.unlock()
                config.advantage.name = method
                config.seed = seed
                config.warmstart.seed = ws
                run_dir = os.path.join(workdir, f"ws{ws}", f"{method}_seed{seed}")
                # The first run of a warm-start seed trains its warm start into its own workdir;
                # the others load it from there.
                config.warmstart.from_dir = shared
                if _SUMMARIZE_ONLY.value:
                    found = finished_run(run_dir, config.total_steps)
                    if found is None:
                        logging.warning("--summarize_only: %s has not finished; left out", run_dir)
                        continue
                else:
                    logging.info("run %s, warm-start seed %d, RL seed %d", method, ws, seed)
                    found = run_one(config, run_dir)
                runs.setdefault(method, {})[(ws, seed)], wall[(method, (ws, seed))] = found
                if not shared and config.warmstart.steps:
                    shared = os.path.join(run_dir, "warmstart")
    if not runs:
        raise app.UsageError(f"no finished runs under {workdir} for these flags")
    summary = summarize(runs, wall, baseline=_BASELINE.value)
    summary["wall_s_total"] = float(np.nansum(list(wall.values()))) if _SUMMARIZE_ONLY.value else time.perf_counter() - t_all
    summary["protocol"] = {"methods": _METHODS.value, "seeds": _SEEDS.value, "warmstart_seeds": ws_seeds,
                           "baseline": _BASELINE.value, "config": run_flags.CONFIG.value.to_dict()}
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    md = format_tables(summary) + f"\n\nWall time, all runs: {summary['wall_s_total'] / 60:.1f} min\n"
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(md)
    plot(runs, os.path.join(workdir, "comparison.png"))
    print(md)


if __name__ == "__main__":
    app.run(main)
