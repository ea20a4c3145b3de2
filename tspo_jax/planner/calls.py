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
    # What its work grows with, per episode, for a projection at real lengths (planner.projection):
    # "prompt", "policy" (response tokens), "observation", "episode" (all tokens) or "" (fixed);
    # and how many of those tokens per episode the worst case planned.
    tokens: str = ""
    worst_tokens: int = 0


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def rollout_shapes(run: AbstractRun, rows: int | None = None) -> dict:
    """Slots, prompt width, cache length and block widths the slot engine compiles for
    (rollout.EpisodeRunner._run_slots): S slots, refills and appends in calls of at most
    rollout.fill_rows rows (rollout.fill_calls; worst case: all S slots at once), widths to
    multiples of 16."""
    c = run.config
    known = {f.name for f in dataclasses.fields(rollout.RolloutConfig)}
    rcfg = rollout.RolloutConfig(**{k: v for k, v in c.rollout.to_dict().items() if k in known})
    rows = c.prompts_per_step * c.group_size if rows is None else rows
    requested = run.slots or rcfg.slots or rows
    slots = sampling.round_up(min(requested, rows), run.sampler.row_multiple)
    width = sampling.round_up(rcfg.max_prompt_length, 16)
    obs = sampling.round_up(max(rcfg.max_obs_length, len(rcfg.invalid_action_message)), 16)
    fills = rollout.fill_calls(slots, rcfg.fill_rows)
    return dict(rows=rows, slots=slots, block_rows=fills[0][2], fills_per_wave=len(fills), waves=math.ceil(rows / slots),
                prompt_width=width, max_len=rcfg.cache_length(width), obs_width=obs, turns=rcfg.num_turns,
                max_new=rcfg.max_response_length, chunk=min(rcfg.decode_chunk, rcfg.max_response_length), cfg=rcfg)


def update_width(run: AbstractRun) -> int:
    """The packed width of the longest episode the config allows: its context length (an episode
    never outgrows the cache; the sampler caps the cache at the configured context)."""
    s = rollout_shapes(run)
    return update_lib.pack_width(min(s["max_len"], s["cfg"].context_length(s["prompt_width"])))


def _on_mesh(args, mesh):
    """Gives every argument without a sharding its layout on the mesh: batch-major arrays split
    over (data, fsdp), scalars (and the RNG key) replicated."""
    def place(x):
        if not isinstance(x, jax.ShapeDtypeStruct) or x.sharding is not None:
            return x
        spec = shd.batch_spec(x.ndim) if x.ndim else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(place, args)


def _sampler_calls(run: AbstractRun, phase: str, calls: float, greedy: bool, shapes: dict,
                   extra: tuple[str, ...]) -> list[Call]:
    """refill, decode and append of the slot engine for one rollout (or evaluation) batch, at the
    worst case: every episode takes every turn at full length and every observation is full."""
    smp, rcfg = run.sampler, shapes["cfg"]
    S, L, K = shapes["slots"], shapes["max_len"], shapes["chunk"]
    samp = sampling.SamplingParams(temperature=rcfg.temperature, top_p=rcfg.top_p, top_k=rcfg.top_k, greedy=greedy)
    waves = shapes["waves"]
    params = run.params
    if rcfg.gather_params:  # decode from a gathered compute-dtype copy; the training params stay resident
        params, extra = smp.gathered(run.params), extra + ("params",)

    def call(name, cname, count, note, tokens, worst, loop_iters=1, **kw):
        fn, args, static = smp.abstract_call(name, params, rows=S, length=L, sampling=samp, **kw)
        return Call(f"{phase}/{cname}", phase, fn, _on_mesh(args, run.mesh), static, calls * count,
                    loop_iters=loop_iters, resident_extra=extra, note=note, tokens=tokens, worst_tokens=worst)

    decode_calls = waves * shapes["turns"] * math.ceil(shapes["max_new"] / K)
    out = [
        call("refill", "prefill", waves * shapes["fills_per_wave"], f"{shapes['block_rows']} rows x {shapes['prompt_width']} prompt tokens into "
             f"{S} slots of {L} positions", "prompt", shapes["prompt_width"], block=shapes["prompt_width"],
             block_rows=shapes["block_rows"]),
        # Every slot busy until the last wave: decode steps = rows x response tokens / slots.
        call("decode", "decode", decode_calls, f"{S} slots, chunks of {K} steps, {shapes['max_new']} tokens x "
             f"{shapes['turns']} turns per episode", "policy", shapes["turns"] * shapes["max_new"], loop_iters=K,
             chunk=K),
    ]
    if shapes["turns"] > 1:
        out.append(call("append", "append", waves * shapes["fills_per_wave"] * (shapes["turns"] - 1),
                        f"{shapes['block_rows']} rows x {shapes['obs_width']} observation tokens", "observation",
                        (shapes["turns"] - 1) * shapes["obs_width"], block=shapes["obs_width"],
                        block_rows=shapes["block_rows"]))
    return out


def step_calls(run: AbstractRun) -> list[Call]:
    c, mesh = run.config, run.mesh
    shapes = rollout_shapes(run)
    upd = run.updater.jitted
    rows2 = NamedSharding(mesh, shd.batch_spec(2))
    width = update_width(run)
    resident = ("opt_state",) + (("ref_params",) if run.ref_params is not None else ())
    calls = _sampler_calls(run, "rollout", 1, bool(c.rollout.greedy), shapes, resident)

    # Reference and old logprobs of all the step's rows (train.Trainer.step): one forward per
    # slice of logprob_micro_batch rows (PolicyUpdater.slices; worst case: every slice at full width).
    rows = shapes["rows"]
    m = c.get("logprob_micro_batch") or c.micro_batch
    m = m if rows % m == 0 else rows
    lp_args = (run.params, _sds((m, width), jnp.int32, rows2), _sds((m, width), bool, rows2))
    n_lp = (1 if run.ref_params is not None else 0) + (1 if c.recompute_old_logprobs else 0)
    if n_lp:
        calls.append(Call("reference/logprobs", "reference", upd["logprobs"], lp_args, {}, n_lp * rows / m,
                          resident_extra=resident, note=f"{m} rows x {width} tokens per slice, {rows} rows",
                          tokens="episode", worst_tokens=width))

    # The update of one mini-batch: gradients of micro-batches (PolicyUpdater.update), then the step.
    mb, micro = c.mini_batch, c.micro_batch if c.mini_batch % c.micro_batch == 0 else c.mini_batch
    f32 = lambda: _sds((micro, width), jnp.float32, rows2)  # noqa: E731
    batch = {"tokens": _sds((micro, width), jnp.int32, rows2), "valid": _sds((micro, width), bool, rows2),
             "loss_mask": f32(), "old_logp": f32(), "advantages": f32()}
    if run.ref_params is not None:
        batch["ref_logp"] = f32()
    scalar = lambda: _sds((), jnp.float32, NamedSharding(mesh, P()))  # noqa: E731
    norm = {k: scalar() for k in ("tokens", "seqs", "rows", "width")}
    acc = {"grads": run.params, "loss": scalar()}  # the gradient accumulator is laid out like the params
    updates = c.ppo_epochs * rows / mb
    calls.append(Call("update/accumulate", "update", upd["accumulate"], (run.params, acc, batch, norm), {},
                      updates * mb / micro, resident_extra=resident,
                      note=f"{micro} rows x {width} tokens (one micro-batch), {mb // micro} per mini-batch of {mb}",
                      tokens="episode", worst_tokens=width))
    lr = scalar()  # the step's learning rate (issue 12)
    calls.append(Call("update/apply", "update", upd["apply"], (run.params, run.opt_state, acc, lr), {}, updates,
                      resident_extra=("ref_params",) if run.ref_params is not None else (),
                      note="the Optax step on the summed gradients"))

    if c.warmstart.steps:
        sb = c.warmstart.batch_size
        sft = {"tokens": _sds((sb, width), jnp.int32, rows2), "valid": _sds((sb, width), bool, rows2),
               "loss_mask": _sds((sb, width), jnp.float32, rows2)}
        calls.append(Call("warmstart/sft", "warmstart", upd["sft"], (run.params, run.opt_state, sft, lr), {}, 0.0,
                          note=f"{sb} rows x {width} tokens; {c.warmstart.steps} steps once before training"))

    if c.eval.every:
        per_eval = math.ceil(c.eval.max_examples / c.eval.batch_size)
        calls += _sampler_calls(run, "eval", per_eval / c.eval.every, True, rollout_shapes(run, c.eval.batch_size),
                                resident)
    return calls
