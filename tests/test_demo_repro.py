"""The embedded demo is bit-exact on one machine: two short runs of configs/demo.py (its model, its
weak-searcher warm start, its ScaNN + MiniLM retriever, TSPO), shrunk by config overrides, write
identical metrics and identical final parameters (exact equality of every float)."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from tspo_jax.metrics import read_metrics
from tspo_jax.train import Trainer

from test_train import set_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shrunk for CI (compilation dominates): a 1-layer model of the demo's kind, 2 turns, short turns.
SHRINK = {
    "total_steps": 2,
    "prompts_per_step": 2,
    "group_size": 4,
    "mini_batch": 8,
    "micro_batch": 8,
    "checkpoint_every": 2,
    "progress_bar": False,
    "model.arch.hidden_size": 32,
    "model.arch.intermediate_size": 64,
    "model.arch.num_layers": 1,
    "model.arch.num_heads": 2,
    "model.arch.num_kv_heads": 1,
    "rollout.max_turns": 2,
    "rollout.max_response_length": 16,
    "rollout.max_obs_length": 96,
    "warmstart.steps": 4,
    "warmstart.batch_size": 8,
    "eval.every": 2,
    "eval.max_examples": 4,
    "eval.batch_size": 4,
}


def demo_config(index_dir, **overrides):
    spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(ROOT, "configs", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return set_keys(mod.get_config(), {**SHRINK, "retriever.index_dir": index_dir, **overrides})


def run(config, workdir):
    """The run's metrics rows and its final (warm start + RL) parameters, on the host."""
    trainer = Trainer(config, workdir)
    try:
        trainer.train()
        params = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.params))]
    finally:
        trainer.close()
    return read_metrics(os.path.join(workdir, "metrics.jsonl")), params


def _comparable(rows):
    """Every metric but wall-clock timings and throughput."""
    return [{k: v for k, v in r.items() if not k.startswith(("timing_s/", "perf/throughput"))} for r in rows]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo_repro_index") / "index")


def test_two_short_demo_runs_are_bit_identical(index_dir, tmp_path):
    rows_a, params_a = run(demo_config(index_dir), str(tmp_path / "a"))
    rows_b, params_b = run(demo_config(index_dir), str(tmp_path / "b"))
    assert [r["step"] for r in rows_a] == [0, 1, 2]
    assert "val/em/all" in rows_a[0] and "val/em/all" in rows_a[-1]
    assert _comparable(rows_a) == _comparable(rows_b)  # exact equality, every float
    assert all(np.array_equal(x, y) for x, y in zip(params_a, params_b, strict=True))

