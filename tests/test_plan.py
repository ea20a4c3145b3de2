"""python -m tspo_jax.plan: AOT compiles of one training step for a TPU topology (libtpu's compiler
on this CPU machine) and for the host, per-chip memory against capacity, and the exit status."""

import importlib.util
import os
import subprocess
import sys

import pytest

from tspo_jax import plan as plan_lib
from tspo_jax.planner import analyse, hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -r requirements-dev.txt)")


def _demo_config():
    spec = importlib.util.spec_from_file_location("demo_cfg", os.path.join(ROOT, "configs", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def tiny_config(**rollout):
    """A 2-layer model with the demo tokenizer, 8 rows a step, one search turn, short turns."""
    c = _demo_config()
    c.model.arch.num_layers = 2
    c.model.arch.hidden_size = 64
    c.model.arch.intermediate_size = 128
    c.model.dtype = "bfloat16"
    c.model.remat = True  # as the pod configs
    c.prompts_per_step, c.group_size, c.mini_batch, c.micro_batch = 4, 2, 8, 4
    c.mesh.shape = (1, -1, 1)
    c.warmstart.steps = 0
    c.eval.every = 0
    c.rollout.max_turns = 1
    c.rollout.max_response_length = 16
    c.rollout.max_obs_length = 32
    c.rollout.max_prompt_length = 32
    for k, v in rollout.items():
        c.rollout[k] = v
    return c


@needs_libtpu
def test_tiny_config_on_v5e_2x2_compiles_every_function_and_fits():
    res = plan_lib.plan(tiny_config(), "v5e-4")
    names = [f["name"] for f in res["functions"]]
    assert names == ["rollout/prefill", "rollout/decode", "rollout/append", "reference/logprobs", "update/accumulate",
                     "update/apply"]
    assert res["fits"] and res["target"]["chips"] == 4 and res["target"]["compiled"]
    for f in res["functions"]:
        assert f["compiled"] and 0 < f["peak_bytes"] < res["target"]["usable_bytes"], f
        assert f["flops"] > 0 and f["bytes"] > 0 and f["roofline_s"] > 0, f
    by = {f["name"]: f for f in res["functions"]}
    # The decode loop runs once per token: its per-call cost is max_new bodies.
    assert by["rollout/decode"]["loop_iters"] == 16
    assert by["rollout/decode"]["flops"] == pytest.approx(16 * by["rollout/decode"]["xla_flops"])
    # Parameters are sharded over the 4 fsdp chips: the update gathers them.
    assert by["update/accumulate"]["collectives"].get("all-gather", 0) > 0
    step = res["step_s"]
    assert step["total"] == pytest.approx(step["rollout"] + step["reference"] + step["update"])
    assert res["projected_s"]["200_steps"] == pytest.approx(200 * step["total"])
    r = res["resident_bytes"]
    assert r["total"] == r["params"] + r["opt_state"] + r["ref_params"] + r["kv_cache"] + r["decode_params"]
    # Two fp32 Adam moments sharded like the params (plus the replicated step count), not replicated.
    assert 2 * r["params"] <= r["opt_state"] <= 2 * r["params"] + 64


@needs_libtpu
def test_a_change_to_the_config_shapes_changes_the_plan():
    short = plan_lib.plan(tiny_config(), "v5e-4", only=("update",))
    long = plan_lib.plan(tiny_config(max_response_length=400), "v5e-4", only=("update",))
    assert long["shapes"]["update_width"] > short["shapes"]["update_width"]
    a, b = short["functions"][0], long["functions"][0]
    assert b["argument_bytes"] > a["argument_bytes"] and b["flops"] > a["flops"]


@needs_libtpu
def test_a_config_that_does_not_fit_exits_nonzero_naming_the_function():
    # All 1,024 rows of a mini-batch in one micro-batch at a 4,608-token context on 4 v5e chips.
    args = [sys.executable, "-m", "tspo_jax.plan", "--config=configs/demo.py", "--topology=v5e-4", "--only=update",
            "--config.mesh.shape=(1,-1,1)", "--config.model.arch.num_layers=1", "--config.model.dtype=bfloat16",
            "--config.prompts_per_step=1024", "--config.group_size=1", "--config.mini_batch=1024",
            "--config.micro_batch=1024", "--config.rollout.max_context_length=4608", "--config.eval.every=0"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "DOES NOT FIT: update/accumulate" in p.stderr and "GiB over" in p.stderr and "micro_batch" in p.stderr


def test_host_plan_uses_the_cpu_devices_and_ram():
    c = tiny_config()
    c.micro_batch = 8  # a multiple of the 8 batch devices
    res = plan_lib.plan(c, "host", only=("update",))
    assert res["target"]["chips"] == 8  # tests/conftest.py's fake devices
    usable = hardware.host_memory_bytes() - hardware.HOST_PROCESS_RESERVE  # the process's own RAM is not usable
    assert res["target"]["usable_bytes"] * 8 == pytest.approx(usable, rel=1e-6)
    assert res["target"]["hbm_bytes"] * 8 == pytest.approx(hardware.host_memory_bytes(), rel=1e-6)
    assert res["fits"] and [f["name"] for f in res["functions"]] == ["update/accumulate", "update/apply"]


def test_unknown_topology_names_the_choices():
    with pytest.raises(ValueError, match="v5e-64"):
        hardware.resolve("v9-1")


def test_collective_bytes_reads_hlo_result_shapes():
    hlo = """
  %all-gather.1 = bf16[16,2048]{1,0} all-gather(bf16[1,2048]{1,0} %p), dimensions={0}
  %ars = (f32[8]{0}, f32[4]{0}) all-reduce-start(f32[8]{0} %a, f32[4]{0} %b), to_apply=%add
  %rs = f32[2,3]{1,0} reduce-scatter(f32[8,3]{1,0} %c), dimensions={0}
  %x = f32[9]{0} add(f32[9]{0} %d, f32[9]{0} %e)
"""
    assert analyse.collective_bytes(hlo) == {"all-gather": 16 * 2048 * 2, "all-reduce": 48, "reduce-scatter": 24}
    hlo += "  %all-gather.2 = bf16[16,2048]{0,1} all-gather(bf16[1,2048]{0,1} %q), dimensions={0}\n"
    top = analyse.largest_collectives(hlo, n=2)
    assert top == [{"op": "all-gather", "shape": "bf16[16,2048]", "bytes": 2 * 16 * 2048 * 2, "count": 2},
                   {"op": "all-reduce", "shape": "(f32[8], f32[4])", "bytes": 48, "count": 1}]


def test_cpu_memory_scheduler_flag_is_added_once_and_a_users_choice_kept(monkeypatch):
    from tspo_jax import xla_flags

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    xla_flags.use_memory_scheduler_on_cpu()
    xla_flags.use_memory_scheduler_on_cpu()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                               "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    xla_flags.use_memory_scheduler_on_cpu()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"


def test_projection_scales_each_function_by_its_own_tokens():
    from tspo_jax.planner import projection

    ln = projection.Lengths.parse("prompt=200,turn=150,turns=3,obs=400,searches=2")
    assert ln.tokens("episode") == 200 + 450 + 800
    fns = [  # worst cases: 2,048-token prompts, 5 x 500 response tokens, 4 x 512 observation, 4,608 wide rows
        dict(phase="rollout", calls_per_step=4, roofline_s=1.0, roofline_xla_s=2.0, tokens="prompt", worst_tokens=2048),
        dict(phase="rollout", calls_per_step=100, roofline_s=0.5, roofline_xla_s=1.0, tokens="policy", worst_tokens=2500),
        dict(phase="rollout", calls_per_step=16, roofline_s=0.25, roofline_xla_s=0.5, tokens="observation",
             worst_tokens=2048),
        dict(phase="reference", calls_per_step=320, roofline_s=0.1, roofline_xla_s=0.2, tokens="episode",
             worst_tokens=4608),
        dict(phase="update", calls_per_step=160, roofline_s=0.3, roofline_xla_s=0.6, tokens="episode",
             worst_tokens=4608),
        dict(phase="update", calls_per_step=10, roofline_s=0.01, roofline_xla_s=0.02, tokens="", worst_tokens=0),
        dict(phase="eval", calls_per_step=0.5, roofline_s=2.0, roofline_xla_s=4.0, tokens="policy", worst_tokens=2500),
    ]
    worst = projection.step_seconds(fns)
    assert worst["rollout"] == pytest.approx(4 + 50 + 4) and worst["reference"] == pytest.approx(32)
    assert worst["update"] == pytest.approx(48 + 0.1) and worst["eval_amortised"] == pytest.approx(1.0)
    assert projection.step_seconds(fns, key="roofline_xla_s")["total"] == pytest.approx(2 * worst["total"])
    real = projection.step_seconds(fns, ln)
    assert real["rollout"] == pytest.approx(4 * 200 / 2048 + 50 * 450 / 2500 + 4 * 800 / 2048)
    assert real["reference"] == pytest.approx(32 * 1450 / 4608)
    assert real["update"] == pytest.approx(48 * 1450 / 4608 + 0.1)  # the Optax step does not shrink
    # Lengths past the worst case are capped at it (the plan's shapes are the config's limits).
    assert projection.step_seconds(fns, projection.Lengths(9999, 9999, 9, 9999, 9))["total"] == pytest.approx(
        worst["total"])
    for bad in ("prompt=1", "prompt=1,turn=2,turns=3,obs=4,searches=x", "prompt=1,turn=2,turns=3,obs=4,searches=5,x=1",
                "prompt=-1,turn=2,turns=3,obs=4,searches=5"):
        with pytest.raises(ValueError, match="lengths"):
            projection.Lengths.parse(bad)


def test_collectives_are_timed_at_the_published_all_reduce_bandwidth():
    from tspo_jax.planner import projection

    v5e = hardware.CHIPS["v5e"]
    assert v5e.ici_bandwidth == pytest.approx(200e9) and hardware.CHIPS["v4"].ici_bandwidth == pytest.approx(268.55e9,
                                                                                                             rel=1e-3)
    assert hardware.chip_named("TPU v5e") is v5e and hardware.chip_named("TPU v9") is None
    # 64 decode steps a call, 1 GB of collectives each: 64 GB at 200 GB/s.
    assert analyse.collective_seconds({"all-gather": 6e8, "all-reduce": 4e8}, 64, v5e.ici_bandwidth) == pytest.approx(0.32)
    assert analyse.collective_seconds({"all-gather": 1e9}, 1, None) is None
    fns = [
        dict(phase="rollout", calls_per_step=10, loop_iters=1, roofline_s=1.0, collectives={"all-gather": 4e11},
             tokens="policy", worst_tokens=2500),  # collectives 2 s > roofline 1 s: the collectives count
        dict(phase="update", calls_per_step=2, loop_iters=1, roofline_s=3.0, collectives={"all-reduce": 2e11},
             tokens="episode", worst_tokens=4608),  # collectives 1 s < roofline 3 s: hidden under compute
    ]
    res = {"target": {"chip": "TPU v5e", "chips": 64}, "functions": fns,
           "at_lengths": {"lengths": dict(prompt=200, turn=250, turns=5, obs=0, searches=0)}}
    projection.add_collective_times(res)
    assert [f["collective_s"] for f in fns] == [pytest.approx(2.0), pytest.approx(1.0)]
    assert res["step_collectives_s"]["rollout"] == pytest.approx(20.0)
    assert res["step_collectives_s"]["update"] == pytest.approx(6.0)
    assert res["at_lengths"]["step_collectives_s"]["rollout"] == pytest.approx(20.0 * 1250 / 2500)
    # One chip, or a chip without a published bandwidth: nothing to time.
    one = projection.add_collective_times({"target": {"chip": "TPU v5e", "chips": 1}, "functions": [dict(fns[0])]})
    assert one["step_collectives_s"] is None and one["functions"][0]["collective_s"] is None
