"""Faults at the checkpoint and metrics layer: corrupt checkpoints, non-finite metrics, gs:// paths."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from tspo_jax import paths
from tspo_jax.checkpointing import CheckpointError, Checkpointer, abstract_like
from tspo_jax.metrics import MetricsWriter, read_metrics



def _state(seed):
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)},
            "opt_state": {"mu": jnp.asarray(rng.normal(size=(500,)), jnp.float32)}}


def _truncate_largest_array_file(step_dir: epath.Path) -> str:
    data_dir = step_dir / "state" / "ocdbt.process_0" / "d"
    victim = max(data_dir.iterdir(), key=lambda f: len(f.read_bytes()))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return str(victim)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_corrupt_latest_checkpoint_falls_back_to_the_intact_step(where, tmp_path, request, caplog):
    directory = str(tmp_path / "ckpt") if where == "local" else f"gs://{request.getfixturevalue('gcs').bucket}/fallback"
    states = {1: _state(1), 2: _state(2)}
    ckpt = Checkpointer(directory, keep=2)
    for step, st in states.items():
        ckpt.save(step, st, {"step": step})
    ckpt.close()
    _truncate_largest_array_file(paths.resolve(directory) / "2")

    ckpt = Checkpointer(directory, keep=2)
    with caplog.at_level(logging.ERROR, logger="tspo_jax.checkpointing"):
        step, restored, meta = ckpt.restore_latest_intact(abstract_like(states[1]))
    assert (step, meta) == (1, {"step": 1})
    jax.tree.map(np.testing.assert_array_equal, restored, states[1])
    # One clear line naming the step, the array and the cause; the bad step is set aside, not deleted.
    [record] = [r for r in caplog.records if "unreadable" in r.getMessage()]
    message = record.getMessage()
    assert "checkpoint step 2" in message and "OUT_OF_RANGE" in message and "corrupt.2" in message
    assert ckpt.all_steps() == [1]
    assert (paths.resolve(directory) / "corrupt.2").exists()
    # The run goes on: step 2 is written again, and keep=2 never drops the intact step 1 early.
    ckpt.save(2, states[2], {"step": 2})
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_without_fallback_a_corrupt_checkpoint_is_one_clear_error(tmp_path):
    directory = str(tmp_path / "ckpt")
    ckpt = Checkpointer(directory, keep=2)
    ckpt.save(1, _state(1), {})
    ckpt.save(2, _state(2), {})
    ckpt.close()
    _truncate_largest_array_file(paths.resolve(directory) / "2")
    ckpt = Checkpointer(directory, keep=2)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest_intact(abstract_like(_state(0)), fallback=False)
    message = str(e.value)
    assert "checkpoint step 2" in message and "OUT_OF_RANGE" in message and "restore_fallback=True" in message
    assert "\n" not in message and len(message) < 800
    assert ckpt.all_steps() == [1, 2]  # nothing moved without fallback
    ckpt.close()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_metrics_keep_non_finite_values_and_truncate_on_resume(where, tmp_path, request):
    workdir = str(tmp_path) if where == "local" else f"gs://{request.getfixturevalue('gcs').bucket}/metrics"
    w = MetricsWriter(workdir)
    w.write(1, {"actor/pg_loss": float("nan"), "actor/grad_norm": float("inf"), "critic/score/mean": 0.25})
    w.write(2, {"actor/pg_loss": 0.5})
    w.close()
    rows = read_metrics(w.path)
    assert math.isnan(rows[0]["actor/pg_loss"]) and rows[0]["actor/grad_norm"] == float("inf")
    assert [r["step"] for r in rows] == [1, 2]
    # A resumed run reopens the file and drops what came after its checkpoint.
    w = MetricsWriter(workdir)
    w.truncate_after(1)
    w.write(2, {"actor/pg_loss": 0.75})
    w.close()
    assert [(r["step"], r["actor/pg_loss"]) for r in read_metrics(w.path)][1:] == [(2, 0.75)]
    assert json.loads(paths.resolve(w.path).read_text().splitlines()[1])["step"] == 2
    events = list((paths.resolve(workdir) / "tensorboard").iterdir())
    assert events and all(e.name.startswith("events.out.tfevents") for e in events)


_ASYNC_SAVER = r"""
import sys, time
import jax.numpy as jnp, numpy as np
from tspo_jax.checkpointing import Checkpointer
directory = sys.argv[1]
ckpt = Checkpointer(directory, keep=2, async_save=True)
small = {"w": jnp.asarray(np.arange(1000, dtype=np.float32))}
ckpt.save(1, small, {"step": 1})
ckpt.wait_until_finished()
big = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 1024, 1024)).astype(np.float32))}  # 256 MB
ckpt.save(2, big, {"step": 2})
print("SAVING", flush=True)  # save() returned: the write goes on in the background
time.sleep(120)
"""


def test_kill_during_an_async_save_leaves_the_previous_checkpoint_restorable(tmp_path):
    directory = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _ASYNC_SAVER, str(directory)], stdout=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "SAVING", line
        in_flight = [p.name for p in directory.iterdir() if p.name.startswith("2")]
        proc.kill()  # kill -9 while step 2 is being written
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert in_flight and all(name != "2" for name in in_flight), in_flight  # only a temporary dir was there
    ckpt = Checkpointer(str(directory), keep=2)
    step, state, meta = ckpt.restore_latest_intact({"w": jax.ShapeDtypeStruct((1000,), jnp.float32)})
    assert (step, meta) == (1, {"step": 1})
    np.testing.assert_array_equal(state["w"], np.arange(1000, dtype=np.float32))
    ckpt.close()
