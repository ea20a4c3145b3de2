"""The trainer survives faults with nothing completed lost: each test injects one fault into the
shrunken demo run of test_train.py, and the resumed run's next step equals the uninterrupted run's."""

from __future__ import annotations

import logging
import os
import threading
import time

import jax
import numpy as np
import pytest

from tests.test_faults import _truncate_largest_array_file
from tests.test_train import run, tiny_config
from tspo_jax import paths, rollout
from tspo_jax import train as train_lib
from tspo_jax.metrics import read_metrics
from tspo_jax.retrieval import RetrieverError
from tspo_jax.retrieval.local import LocalRetriever
from tspo_jax.retrieval.server import RetrievalServer
from tspo_jax.train import NonFiniteError, Trainer

COMPARED = ("critic/score/mean", "actor/pg_loss", "actor/grad_norm", "response_length/mean", "actor/entropy")


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo_index") / "index")


@pytest.fixture(scope="module")
def uninterrupted(index_dir, tmp_path_factory):
    """Steps 1-3 of the shrunken demo, run straight through."""
    wd = str(tmp_path_factory.mktemp("full") / "run")
    run(tiny_config(index_dir, **{"eval.every": 0}), wd)
    return read_metrics(os.path.join(wd, "metrics.jsonl"))


def _assert_steps_equal(rows, reference, steps):
    by_step = {r["step"]: r for r in rows}
    ref = {r["step"]: r for r in reference}
    for step in steps:
        for key in COMPARED:
            np.testing.assert_allclose(by_step[step][key], ref[step][key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {step}: {key}")


def test_an_error_in_a_step_saves_the_last_completed_step(index_dir, uninterrupted, tmp_path, monkeypatch, caplog):
    """Checkpoints every 100 steps, and the retriever fails in step 3: step 2 is saved on the way out
    (with the prompt stream's position after step 2), and the rerun's step 3 is the uninterrupted one."""
    wd = str(tmp_path / "run")
    original, calls = rollout.EpisodeRunner.run, []

    def failing_run(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # step 3's rollout, after the step has taken its prompts
            raise RetrieverError("Retriever at http://127.0.0.1:1 failed after 3 attempt(s): injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rollout.EpisodeRunner, "run", failing_run)
    with caplog.at_level(logging.WARNING), pytest.raises(RetrieverError, match="injected"):
        run(tiny_config(index_dir, **{"eval.every": 0, "checkpoint_every": 100}), wd)
    # Orbax saves a run's first step whatever the interval; step 2 only on the way out.
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2"]
    assert any("saved step 2 on the way out" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(rollout.EpisodeRunner, "run", original)

    run(tiny_config(index_dir, **{"eval.every": 0, "checkpoint_every": 100}), wd)
    rows = read_metrics(os.path.join(wd, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    _assert_steps_equal(rows, uninterrupted, [1, 2, 3])


def test_a_corrupt_latest_checkpoint_resumes_from_the_intact_step(index_dir, uninterrupted, tmp_path, caplog):
    wd = str(tmp_path / "run")
    run(tiny_config(index_dir, **{"eval.every": 0, "total_steps": 2}), wd)  # checkpoints 1 and 2 (keep=2)
    victim = _truncate_largest_array_file(paths.resolve(wd) / "checkpoints" / "2")
    with caplog.at_level(logging.INFO):
        trainer, _ = run(tiny_config(index_dir, **{"eval.every": 0}), wd)
    lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(lines) == 1 and "checkpoint step 2" in lines[0] and "OUT_OF_RANGE" in lines[0], (victim, lines)
    assert any("resumed from step 1" in r.getMessage() for r in caplog.records)
    assert not any("Event loop is closed" in r.getMessage() for r in caplog.records)
    rows = read_metrics(os.path.join(wd, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    _assert_steps_equal(rows, uninterrupted, [1, 2, 3])  # steps 2 and 3 were run again, identically
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "3", "corrupt.2"]


def test_without_fallback_a_corrupt_checkpoint_stops_with_one_clear_error(index_dir, tmp_path):
    wd = str(tmp_path / "run")
    run(tiny_config(index_dir, **{"eval.every": 0, "total_steps": 2}), wd)
    _truncate_largest_array_file(paths.resolve(wd) / "checkpoints" / "2")
    with pytest.raises(Exception, match=r"checkpoint step 2 .* is unreadable .*restore_fallback=True") as e:
        run(tiny_config(index_dir, **{"eval.every": 0, "restore_fallback": False}), wd)
    assert "\n" not in str(e.value)


def test_non_finite_updates_are_skipped_and_then_stop_the_run(index_dir, tmp_path, monkeypatch):
    """NaN advantages: no update is applied, each skip is counted and logged as NaN, and after
    max_nonfinite_steps consecutive steps the run saves and stops with a clear error."""
    wd = str(tmp_path / "run")
    original = train_lib.adv_lib.compute_advantages

    def nan_advantages(*args, **kwargs):
        token_adv, metrics = original(*args, **kwargs)
        return token_adv * np.nan, metrics

    monkeypatch.setattr(train_lib.adv_lib, "compute_advantages", nan_advantages)
    config = tiny_config(index_dir, **{"eval.every": 0, "max_nonfinite_steps": 2, "checkpoint_every": 100})
    trainer = Trainer(config, wd)
    try:
        with pytest.raises(NonFiniteError, match="non-finite in 2 consecutive steps"):
            trainer.train()
        # Nothing was applied: the policy is still the reference (the policy before RL).
        for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(trainer.ref_params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        trainer.close()
    rows = read_metrics(os.path.join(wd, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["actor/nonfinite_skips"] == 1.0 and np.isnan(r["actor/pg_loss"]) for r in rows)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2"]  # 2: saved before stopping


def test_a_retriever_restart_is_waited_out(index_dir, uninterrupted, tmp_path):
    """The run talks to a retrieval server that refuses connections for its first 3 s (a restart),
    then answers: the run completes, and equals the run on the local index."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    holder = {}

    def start_later():
        time.sleep(3.0)
        holder["server"] = RetrievalServer(LocalRetriever(index_dir), "127.0.0.1", port, default_topk=3)
        holder["server"].start()

    # The index is built by the uninterrupted run (same index_dir); the server reads it.
    threading.Thread(target=start_later, daemon=True).start()
    wd = str(tmp_path / "run")
    config = tiny_config(index_dir, **{"eval.every": 0, "retriever.spec": f"http://127.0.0.1:{port}",
                                       "retriever.timeout_s": 5.0, "retriever.retries": 0,
                                       "retriever.max_outage_s": 60.0})
    try:
        run(config, wd)
    finally:
        for _ in range(100):
            if "server" in holder:
                break
            time.sleep(0.1)
        holder["server"].shutdown()
        holder["server"].server_close()
    rows = read_metrics(os.path.join(wd, "metrics.jsonl"))
    _assert_steps_equal(rows, uninterrupted, [1, 2, 3])



def test_a_gs_workdir_trains_is_killed_and_resumes(index_dir, uninterrupted, gcs):
    """Checkpoints, metrics, TensorBoard, plots, run and policy configs and the warm start all go to
    gs:// (a real GCS API on loopback); a rerun resumes there and equals the uninterrupted run."""
    wd = f"gs://{gcs.bucket}/runs/demo"
    run(tiny_config(index_dir, **{"eval.every": 0, "total_steps": 2}), wd)  # "killed" after step 2
    root = paths.resolve(wd)
    for name in ("metrics.jsonl", "run_config.json", "policy_config.json", "training.png"):
        assert (root / name).is_file(), name
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["1", "2"]
    assert (root / "warmstart" / "params").exists()
    assert list((root / "tensorboard").iterdir())

    run(tiny_config(index_dir, **{"eval.every": 3}), wd)  # same command again: resumes from step 2
    rows = read_metrics(str(root / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    _assert_steps_equal(rows, uninterrupted, [1, 2, 3])
    assert (root / "eval" / "step_3.md").is_file()
