"""The comparison summary: table values are the means the docstring promises, and the plot is written."""

import os

import numpy as np

from tspo_jax import compare


def _rows(rewards, homog, em_start, em_end):
    rows = [{"step": 0, "val/em/all": em_start}]
    for i, (r, h) in enumerate(zip(rewards, homog), 1):
        rows.append(
            {"step": i, "critic/score/mean": r, "adv/homogenized_group_frac": h, "adv/folr_rescued_frac": 0.5}
        )
    rows[-1]["val/em/all"] = em_end
    return rows


def test_summary_table_and_plot(tmp_path):
    rs = np.random.RandomState(0)
    runs = {
        m: {s: _rows(rs.rand(12).tolist(), rs.rand(12).tolist(), 0.5, 0.6 + s / 10) for s in (0, 1, 2)}
        for m in ("tspo", "grpo")
    }
    table = compare.summarize(runs)
    k = compare.LAST_K
    for m in runs:
        expect_last = np.mean(
            [np.mean([r["critic/score/mean"] for r in runs[m][s][1:]][-k:]) for s in (0, 1, 2)]
        )
        assert abs(table[m]["reward_last"] - expect_last) < 1e-9
        assert abs(table[m]["val_em_end"] - 0.7) < 1e-9 and table[m]["val_em_start"] == 0.5
    md = compare.format_table(table)
    assert md.count("\n") == 3 and "| tspo | 3 |" in md and "| grpo | 3 |" in md
    out = compare.plot(runs, str(tmp_path / "c.png"))
    assert os.path.getsize(out) > 1000
