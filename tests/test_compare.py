"""The comparison's summary and statistics: table values are the means the docstring promises, the
paired tests agree with scipy and with hand-computed values, and the plot is written."""

import os

import numpy as np
import pytest
from scipy import stats

from tspo_jax import compare


def _rows(rewards, homog, em_start, em_mid, em_end):
    rows = [{"step": 0, "val/em/all": em_start}]
    for i, (r, h) in enumerate(zip(rewards, homog), 1):
        rows.append(
            {"step": i, "critic/score/mean": r, "adv/homogenized_group_frac": h, "adv/folr_rescued_frac": 0.5}
        )
    rows[len(rows) // 2]["val/em/all"] = em_mid
    rows[-1]["val/em/all"] = em_end
    return rows


@pytest.fixture
def runs():
    rs = np.random.RandomState(0)
    return {
        m: {(ws, s): _rows(rs.rand(12).tolist(), rs.rand(12).tolist(), 0.3 + ws / 10, rs.rand(),
                           0.6 + s / 10 + (0.05 if m == "tspo" else 0.0) + rs.rand() / 100)
            for ws in (0, 1) for s in (0, 1, 2)}
        for m in ("tspo", "grpo")
    }


def test_summary_table_and_plot(runs, tmp_path):
    summary = compare.summarize(runs, wall={("tspo", (0, 0)): 12.0}, baseline="grpo")
    k = compare.LAST_K
    keys = sorted(runs["tspo"])
    for m in runs:
        t = summary["methods"][m]
        per_run = [np.mean([r["critic/score/mean"] for r in runs[m][key][1:]][-k:]) for key in keys]
        assert t["reward_last"] == pytest.approx(np.mean(per_run), abs=1e-12)
        assert t["reward_last_std"] == pytest.approx(np.std(per_run, ddof=1), abs=1e-12)
        ends = [runs[m][key][-1]["val/em/all"] for key in keys]
        mids = [np.mean([runs[m][key][len(runs[m][key]) // 2]["val/em/all"], runs[m][key][-1]["val/em/all"]])
                for key in keys]
        assert t["val_em_end"] == pytest.approx(np.mean(ends), abs=1e-12)
        assert t["val_em_mean"] == pytest.approx(np.mean(mids), abs=1e-12)
        assert t["val_em_start"] == pytest.approx(0.35, abs=1e-12)
        assert [(r["warmstart_seed"], r["seed"]) for r in t["runs"]] == keys
    assert summary["methods"]["tspo"]["runs"][0]["wall_s"] == 12.0
    test = summary["paired"]["tspo-grpo"]["val_em_end"]
    diffs = [runs["tspo"][key][-1]["val/em/all"] - runs["grpo"][key][-1]["val/em/all"] for key in keys]
    assert test["mean_diff"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert test["n"] == 6 and test["wins"] + test["ties"] + test["losses"] == 6
    md = compare.format_tables(summary)
    assert "| tspo | 6 |" in md and "| grpo | 6 |" in md and "| tspo-grpo | val_em_end | 6 |" in md
    out = compare.plot(runs, str(tmp_path / "c.png"))
    assert os.path.getsize(out) > 1000


def test_paired_test_matches_scipy_and_hand_values():
    rs = np.random.RandomState(3)
    a = rs.rand(10)
    b = a - rs.normal(0.05, 0.05, size=10)
    t = compare.paired_test(a, b)
    ref = stats.wilcoxon(a - b)
    assert t["wilcoxon_W"] == pytest.approx(ref.statistic) and t["wilcoxon_p"] == pytest.approx(ref.pvalue)
    assert t["mean_diff"] == pytest.approx(np.mean(a - b)) and t["n"] == 10

    # By hand: differences +1..+5 (all positive, distinct) -> W = min(15, 0) = 0, exact two-sided
    # p = 2 / 2^5 = 0.0625; a CI of a constant-sign sample lies on that side.
    t = compare.paired_test([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert t["wilcoxon_W"] == 0.0 and t["wilcoxon_p"] == pytest.approx(0.0625)
    assert t["wins"] == 5 and 1.0 <= t["ci95"][0] < 3.0 < t["ci95"][1] <= 5.0
    # Differences -1, +2, +3, +4 (ranks 1..4): W = min(9, 1) = 1, exact p = 2 * P(W+ <= 1) = 2 * 2/16.
    t = compare.paired_test([0, 2, 3, 4], [1, 0, 0, 0])
    assert t["wilcoxon_W"] == 1.0 and t["wilcoxon_p"] == pytest.approx(0.25)
    assert (t["wins"], t["ties"], t["losses"]) == (3, 0, 1)
    # All ties: no evidence either way.
    t = compare.paired_test([0.5, 0.5], [0.5, 0.5])
    assert t["wilcoxon_p"] == 1.0 and t["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="equal-length"):
        compare.paired_test([1, 2], [1])


def test_bootstrap_ci_against_a_direct_computation():
    d = np.random.RandomState(1).normal(0.1, 0.2, size=12)
    lo, hi = compare.bootstrap_ci(d, resamples=4000, seed=7)
    rng = np.random.default_rng(7)
    means = np.array([d[rng.integers(0, 12, size=12)].mean() for _ in range(4000)])
    # Same generator, same draws in the same order (one (4000, 12) block row by row).
    assert lo == pytest.approx(np.quantile(means, 0.025)) and hi == pytest.approx(np.quantile(means, 0.975))
    # And it brackets the mean with the normal approximation's width (loosely).
    se = d.std(ddof=1) / np.sqrt(12)
    assert lo < d.mean() < hi and 2.5 * se < hi - lo < 5.5 * se
