"""Exact match of greedy search episodes on QA sets, per data source: the table the trainer
writes every `eval.every` steps and `python -m tspo_jax.evaluate` prints."""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from tspo_jax import rewards


def evaluate_examples(runner, params, examples, *, batch_size: int = 64) -> dict:
    """Greedy episodes for every example; EM overall and per data source."""
    rows = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        episodes = runner.run(params, [ex.question for ex in chunk], [ex.uid for ex in chunk], n=1)
        for ex, ep in zip(chunk, episodes):
            em = rewards.exact_match(ep.answer, ex.golds)
            rows.append({"uid": ex.uid, "data_source": ex.data_source, "question": ex.question,
                         "golds": list(ex.golds), "answer": ep.answer, "em": em, "turns": ep.num_turns,
                         "searches": [t.query for t in ep.turns if t.query], "stop": ep.stop_reason})
    by_source = collections.defaultdict(list)
    for r in rows:
        by_source[r["data_source"]].append(r["em"])
    metrics = {"em/all": float(np.mean([r["em"] for r in rows])) if rows else float("nan")}
    for src, ems in sorted(by_source.items()):
        metrics[f"em/{src}"] = float(np.mean(ems))
        metrics[f"count/{src}"] = len(ems)
    return {"metrics": metrics, "rows": rows}


def format_table(metrics: dict) -> str:
    sources = sorted(k[3:] for k in metrics if k.startswith("em/") and k != "em/all")
    lines = ["| data source | n | exact match |", "|---|---:|---:|"]
    for src in sources:
        lines.append(f"| {src} | {metrics[f'count/{src}']} | {metrics[f'em/{src}']:.3f} |")
    total = sum(metrics[f"count/{s}"] for s in sources)
    lines.append(f"| **all** | {total} | {metrics['em/all']:.3f} |")
    return "\n".join(lines)


def save_table(result: dict, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = os.path.join(out_dir, f"{name}.md")
    with open(md, "w") as f:
        f.write(format_table(result["metrics"]) + "\n")
    return md
