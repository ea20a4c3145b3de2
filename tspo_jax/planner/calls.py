"""Every compiled function one training step runs, at the worst-case shapes its config allows,
and how often a step calls it.

Shapes follow the code paths the trainer takes (rollout.EpisodeRunner.run, train.Trainer.step,
warmstart, evaluate): the prompt at max_prompt_length, every turn at full length, the cache at
the rollout's context length, the update at the packed width of the longest possible episode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from tspo_jax import rollout, sampling
from tspo_jax import sharding as shd
from tspo_jax import update as update_lib
from tspo_jax.model.qwen2 import KVCache
from tspo_jax.planner.abstract import AbstractRun


@dataclasses.dataclass
class Call:
    name: str
    phase: str  # rollout | reference | update | warmstart | eval
    fn: Any  # a jax.jit-wrapped function
    args: tuple
    static: dict
    calls_per_step: float  # calls one training step makes (eval: amortised over eval.every)
    loop_iters: int = 1  # iterations of its outer loop, which XLA's cost analysis counts once
    # Resident arrays the call does not take as arguments but that stay in HBM beside it.
    resident_extra: tuple[str, ...] = ()
    note: str = ""


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def rollout_shapes(run: AbstractRun) -> dict:
    """Rows, prompt width, cache length and block widths the rollout compiles for."""
    c = run.config
    known = {f.name for f in dataclasses.fields(rollout.RolloutConfig)}
    rcfg = rollout.RolloutConfig(**{k: v for k, v in c.rollout.to_dict().items() if k in known})
    rows = c.prompts_per_step * c.group_size
    row_multiple = run.sampler.row_multiple
    slots = min(run.slots or c.rollout.get("slots", 0) or 0, rows)
    # Without decode slots the whole step's rows decode at once, bucketed as EpisodeRunner.run does.
    batch = sampling.bucket(rows, row_multiple) if not slots else -(-slots // row_multiple) * row_multiple
    width = sampling.bucket(rcfg.max_prompt_length, 16)
    max_len = sampling.bucket(rcfg.context_length(width), 64)
    obs = sampling.bucket(max(rcfg.max_obs_length, len(rollout.INVALID_ACTION_MESSAGE)), 16)
    return dict(rows=rows, batch=batch, waves=math.ceil(rows / batch), prompt_width=width, max_len=max_len,
                obs_width=obs, turns=rcfg.max_turns + 1, max_new=rcfg.max_response_length, cfg=rcfg)


def update_width(run: AbstractRun) -> int:
    """The packed width of the longest episode the config allows: its context length (an episode
    never outgrows the cache; the sampler caps the cache at the configured context)."""
    s = rollout_shapes(run)
    return update_lib.pack_width(min(s["max_len"], s["cfg"].context_length(s["prompt_width"])))


def gen_state(run: AbstractRun, batch: int, max_len: int):
    """The sampler's GenState as its prefill lays it out (sampling.Sampler._constrain)."""
    cfg, mesh = run.model_cfg, run.mesh
    heads = "tensor" if cfg.num_kv_heads % mesh.shape["tensor"] == 0 else None
    kv = NamedSharding(mesh, P(shd.BATCH_AXES, heads, None, None))
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    cache = KVCache(
        k=tuple(_sds(shape, cfg.dtype, kv) for _ in range(cfg.num_layers)),
        v=tuple(_sds(shape, cfg.dtype, kv) for _ in range(cfg.num_layers)),
        valid=_sds((batch, max_len), bool, NamedSharding(mesh, P(shd.BATCH_AXES, None))),
        index=_sds((), jnp.int32, NamedSharding(mesh, P())),
        next_pos=_sds((batch,), jnp.int32, NamedSharding(mesh, P(shd.BATCH_AXES))),
    )
    logits = _sds((batch, cfg.vocab_size), jnp.float32, NamedSharding(mesh, P(shd.BATCH_AXES, None)))
    return sampling.GenState(cache, logits)


def _sampler_calls(run: AbstractRun, phase: str, rows_batch: int, calls: float, greedy: bool,
                   shapes: dict, extra: tuple[str, ...]) -> list[Call]:
    """prefill, decode and append of one rollout (or evaluation) batch."""
    mesh, smp = run.mesh, run.sampler
    b, width, max_len = rows_batch, shapes["prompt_width"], shapes["max_len"]
    rows2 = NamedSharding(mesh, shd.batch_spec(2))
    rows1 = NamedSharding(mesh, shd.batch_spec(1))
    rep = NamedSharding(mesh, P())
    gen = gen_state(run, b, max_len)
    rcfg = shapes["cfg"]
    fns = smp_functions(smp)
    out = [
        Call(f"{phase}/prefill", phase, fns["prefill"],
             (run.params, _sds((b, width), jnp.int32, rows2), _sds((b, width), bool, rows2)),
             {"max_len": max_len}, calls, resident_extra=extra,
             note=f"{b} rows x {width} prompt tokens into a {max_len}-slot cache"),
        Call(f"{phase}/decode", phase, fns["decode"],
             (run.params, gen, jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep),
              _sds((b,), bool, rows1), _sds((b,), jnp.int32, rows1), _sds((), jnp.float32, rep),
              _sds((), jnp.float32, rep)),
             dict(max_new=shapes["max_new"], greedy=greedy, top_k=rcfg.top_k, use_top_p=rcfg.top_p < 1.0,
                  attend_len=max_len),
             calls * shapes["turns"], loop_iters=shapes["max_new"], resident_extra=extra,
             note=f"{b} rows, {shapes['max_new']} tokens per turn, {shapes['turns']} turns"),
    ]
    if shapes["turns"] > 1:
        ow = shapes["obs_width"]
        out.append(Call(f"{phase}/append", phase, fns["append"],
                        (run.params, gen, _sds((b, ow), jnp.int32, rows2), _sds((b, ow), bool, rows2)),
                        {"attend_len": max_len}, calls * (shapes["turns"] - 1), resident_extra=extra,
                        note=f"{b} rows x {ow} observation tokens"))
    return out


def smp_functions(smp: sampling.Sampler) -> dict:
    """The sampler's three jitted functions. sampling.Sampler has no public handle on them yet (its
    public methods take concrete arrays), so this is the one place the planner reaches inside it."""
    return {"prefill": smp._prefill, "append": smp._append, "decode": smp._decode}


def step_calls(run: AbstractRun) -> list[Call]:
    c, mesh = run.config, run.mesh
    shapes = rollout_shapes(run)
    upd = run.updater.jitted
    rows2 = NamedSharding(mesh, shd.batch_spec(2))
    width = update_width(run)
    resident = ("opt_state",) + (("ref_params",) if run.ref_params is not None else ())
    calls = _sampler_calls(run, "rollout", shapes["batch"], shapes["waves"], bool(c.rollout.greedy), shapes,
                           resident)

    # Reference and old logprobs over all the step's rows (train.Trainer.step), padded to the mesh.
    rows = shapes["rows"]
    lp_batch = (_sds((rows, width), jnp.int32, rows2), _sds((rows, width), bool, rows2))
    n_lp = (1 if run.ref_params is not None else 0) + (1 if c.recompute_old_logprobs else 0)
    m = c.get("logprob_micro_batch") or c.micro_batch
    if n_lp:
        calls.append(Call("reference/logprobs", "reference", upd["logprobs"], (run.params, *lp_batch), {}, n_lp,
                          loop_iters=rows // m if rows % m == 0 else 1, resident_extra=resident,
                          note=f"{rows} rows x {width} tokens, slices of {m} rows"))

    mb = c.mini_batch
    f32 = lambda: _sds((mb, width), jnp.float32, rows2)  # noqa: E731
    batch = {"tokens": _sds((mb, width), jnp.int32, rows2), "valid": _sds((mb, width), bool, rows2),
             "loss_mask": f32(), "old_logp": f32(), "advantages": f32()}
    if run.ref_params is not None:
        batch["ref_logp"] = f32()
    num_micro = mb // c.micro_batch if mb % c.micro_batch == 0 else 1
    calls.append(Call("update/step", "update", upd["update"], (run.params, run.opt_state, batch), {},
                      c.ppo_epochs * rows / mb, loop_iters=num_micro,
                      resident_extra=("ref_params",) if run.ref_params is not None else (),
                      note=f"{mb} rows x {width} tokens, {num_micro} micro-batches of {c.micro_batch}"))

    if c.warmstart.steps:
        sb = c.warmstart.batch_size
        sft = {"tokens": _sds((sb, width), jnp.int32, rows2), "valid": _sds((sb, width), bool, rows2),
               "loss_mask": _sds((sb, width), jnp.float32, rows2)}
        calls.append(Call("warmstart/sft", "warmstart", upd["sft"], (run.params, run.opt_state, sft), {}, 0.0,
                          note=f"{sb} rows x {width} tokens; {c.warmstart.steps} steps once before training"))

    if c.eval.every:
        eb = sampling.bucket(c.eval.batch_size, run.sampler.row_multiple)
        per_eval = math.ceil(c.eval.max_examples / c.eval.batch_size)
        calls += _sampler_calls(run, "eval", eb, per_eval / c.eval.every, True, shapes, resident)
    return calls
