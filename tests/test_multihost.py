"""Multi-host training for real: two JAX processes on loopback (jax.distributed, gloo on CPU).

Each process has 2 fake CPU devices and the mesh spans all 4: each process must report 4 global
devices and only process 0 writes metrics. The pair must match a single-process run on the same 4
devices, metric for metric and in its parameters after the warm start and after RL (so the
cross-process gradients, batches and checkpoints are checked, not only that both processes exit);
then the same command with more steps resumes from the pair's checkpoint."""

import math
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from tspo_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420  # per launch; the longest takes about 1.5 minutes on 2 busy cores

# The shrunken demo of tests/test_train.py, as command-line overrides. The entropy bonus gives a
# gradient even when every answer is wrong (it is after 2 warm-start steps), so the update is real.
OVERRIDES = {
    "prompts_per_step": 2,
    "group_size": 4,
    "mini_batch": 8,
    "micro_batch": 8,
    "checkpoint_every": 1,
    "progress_bar": False,
    "mesh.shape": "(2,2,1)",  # data across processes' devices, parameters sharded over fsdp
    "model.arch.hidden_size": 32,
    "model.arch.intermediate_size": 64,
    "model.arch.num_layers": 1,
    "model.arch.num_heads": 2,
    "model.arch.num_kv_heads": 1,
    "retriever.mode": "exact",
    "rollout.max_turns": 1,
    "rollout.max_response_length": 12,
    "rollout.max_obs_length": 48,
    "warmstart.steps": 2,
    "warmstart.batch_size": 8,
    "eval.every": 0,
    "loss.entropy_coef": 0.01,
}
# Compared between the two-process and the one-process run.
COMPARED = (
    "critic/score/mean",
    "response_length/mean",
    "perf/total_num_tokens",
    "actor/entropy",
    "actor/loss",
    "actor/grad_norm",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(workdir, index_dir, *, total_steps, num_processes, devices_per_process, log_dir) -> list[str]:
    """Runs `python -m tspo_jax.train` as `num_processes` processes; returns each one's log."""
    args = [
        sys.executable,
        "-m",
        "tspo_jax.train",
        f"--config={ROOT}/configs/demo.py",
        f"--workdir={workdir}",
        f"--config.total_steps={total_steps}",
        f"--config.retriever.index_dir={index_dir}",
    ]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        # The resumed run reuses the first run's compiled programs (a quarter of its time).
        JAX_COMPILATION_CACHE_DIR=os.path.join(log_dir, "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    for k in ("JAX_COORDINATOR_ADDRESS", "TSPO_NUM_PROCESSES", "TSPO_PROCESS_ID"):
        env.pop(k, None)
    address = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for i in range(num_processes):
        if num_processes > 1:
            env = dict(
                env,
                JAX_COORDINATOR_ADDRESS=address,
                TSPO_NUM_PROCESSES=str(num_processes),
                TSPO_PROCESS_ID=str(i),
            )
        logs.append(os.path.join(log_dir, f"{os.path.basename(workdir)}_{total_steps}_{i}.log"))
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + TIMEOUT_S
        # Stop at the first failure: its peers would wait in a collective until the timeout.
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [open(path).read() for path in logs]
    for i, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, (
            f"process {i} of {num_processes} exited with {p.returncode}:\n{text[-4000:]}"
        )
    return texts


def _assert_close(a: dict, b: dict, step: int):
    for key in COMPARED:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-6, err_msg=f"step {step}: {key}")


def _params(path, key=None):
    """A checkpoint's parameters as NumPy leaves (restored without devices), in a fixed order."""
    ckptr = ocp.PyTreeCheckpointer()
    args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ckptr.metadata(path).item_metadata.tree
    )
    tree = ckptr.restore(path, restore_args=args)
    return jax.tree.leaves(tree[key] if key else tree)


def _max_abs_diff(a, b) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def test_two_processes_train_as_one_and_resume(tmp_path):
    index_dir = str(tmp_path / "index")  # built by process 0 while process 1 waits
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    kw = dict(log_dir=str(tmp_path), num_processes=2, devices_per_process=2)

    logs = _train(multi, index_dir, total_steps=2, **kw)
    for i, text in enumerate(logs):
        assert f"process {i} of 2, 2 local / 4 global devices" in text
    rows = read_metrics(os.path.join(multi, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]  # written once: by process 0 only
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert rows[0]["actor/grad_norm"] > 0
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["1", "2"]

    # The reference: one process with the same 4 devices and mesh, one step further.
    _train(single, index_dir, total_steps=3, log_dir=str(tmp_path), num_processes=1, devices_per_process=4)
    reference = read_metrics(os.path.join(single, "metrics.jsonl"))
    for step in (1, 2):
        _assert_close(rows[step - 1], reference[step - 1], step)

    # The same two-process command with more steps continues from checkpoint 2.
    logs = _train(multi, index_dir, total_steps=3, **kw)
    assert all("resumed from step 2" in text for text in logs)
    rows = read_metrics(os.path.join(multi, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    _assert_close(rows[2], reference[2], 3)
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["2", "3"]

    # The parameters: the warm start and step 3 equal the reference's; RL moved them (Adam's ~lr
    # per element and step), far more than the two runs differ.
    warm = _params(os.path.join(multi, "warmstart", "params"))
    assert _max_abs_diff(warm, _params(os.path.join(single, "warmstart", "params"))) < 1e-6
    final = _params(os.path.join(multi, "checkpoints", "3", "state"), "params")
    assert _max_abs_diff(final, _params(os.path.join(single, "checkpoints", "3", "state"), "params")) < 1e-6
    assert _max_abs_diff(final, warm) > 1e-4
