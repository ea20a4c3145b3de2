"""Jitted batched sampling on the KV cache: prefill, refill, append, and a while-loop decode.

A `Sampler` owns four compiled functions over a `GenState` (the KV cache plus each row's
next-token logits):
  prefill(tokens, valid)             a left-padded prompt batch into a fresh cache
  refill(gen, slots, tokens, valid)  empty chosen cache rows (decode slots) and prefill them
  append(gen, tokens, valid, slots)  a block for chosen rows (rows with no valid token are untouched)
  decode(gen, rng, budget, ...)      sample until every row stopped (until="all"), or until any
                                     row stopped (until="any": a chunk of the slot engine)
Decoding never leaves the device per token: the loop is a `lax.while_loop` whose carry (cache
included) is donated. The LM head runs only at each row's last valid position. Row counts are
padded to a multiple of the batch devices and lengths to small multiples, so similar batches reuse
the compiled code; `compile_counts` says how often each function was traced. Sampled tokens use a
key per (sequence, turn, position), so they do not depend on which row or slot a sequence sits in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tspo_jax.model.qwen2 import KVCache, Qwen2Config, apply
from tspo_jax.sharding import activation_mesh, batch_devices, to_host
from tspo_jax.stop_strings import StopTable, build_stop_table

log = logging.getLogger(__name__)

# Why a row stopped.
RUNNING, STOP_EOS, STOP_STRING, STOP_BUDGET, STOP_CONTEXT = 0, 1, 2, 3, 4
STOP_NAMES = {
    RUNNING: "running",
    STOP_EOS: "eos",
    STOP_STRING: "stop_string",
    STOP_BUDGET: "length",
    STOP_CONTEXT: "context",
}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    greedy: bool = False

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy=True instead")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenState:
    cache: KVCache
    next_logits: jax.Array  # [B, V] fp32: logits for each row's next token


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOut:
    tokens: jax.Array  # [B, N] int32 (pad after a row stopped)
    logprobs: jax.Array  # [B, N] fp32, log p(token) under the temperature-scaled model
    num_tokens: jax.Array  # [B] int32 generated this call
    stop_reason: jax.Array  # [B] int32, one of STOP_* (RUNNING: the row goes on in the next call)
    stop_string: jax.Array  # [B] int32 index into the stop strings, or -1
    matcher: jax.Array  # [B] int32 stop-string matcher state after the call (carry it to the next)
    steps: jax.Array  # [] int32 loop steps run
    live_steps: jax.Array  # [] int32 sum over steps of the rows that decoded a token


def bucket(n: int, minimum: int = 8) -> int:
    """Next power of two (at least `minimum`)."""
    b = minimum
    while b < n:
        b *= 2
    return b


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (at least one multiple): the padded row counts and
    lengths we compile for (powers of two would waste up to half the rows and cache)."""
    return max(multiple, -(-n // multiple) * multiple)


def _attend_len(needed: int, max_len: int) -> int:
    """The cache prefix a call attends over: every position it can write lies below it. Bucketed
    to powers of two (a compute bound, not an allocation) so a rollout compiles few variants."""
    return min(bucket(needed, 128), max_len)


def _keep_or_set(new, has, previous):
    return jnp.where(has[:, None], new.astype(jnp.float32), previous)


def _row_keys(rng, seq_ids, turns, positions):
    """One key per row from (the call's key, the row's sequence id, its turn, the position of the
    token it samples): what a row samples never depends on its slot or on the other rows."""

    def one(s, t, p):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, s), t), p)

    return jax.vmap(one)(seq_ids, turns, positions)


def _filter_logits(logits, top_k: int, top_p: float, use_top_p: bool):
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        # Keep the smallest set of tokens whose probability mass reaches top_p.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


class Sampler:
    """Compiled generation for one model structure, vocabulary and set of stop strings.

    Compiled functions (each a `jax.jit`, callable with arrays or lowered with ShapeDtypeStructs;
    `abstract_call` gives their abstract arguments for a slot count and a context length):
      prefill_fn(params, tokens, valid, max_len=)      fresh cache for every row (left-padded prompts)
      refill_fn(params, gen, slots, tokens, valid)     reset `slots` and prefill a block into them
      append_fn(params, gen, tokens, valid, slots, attend_len=)   a block for chosen rows
      decode_fn(params, gen, rng, active, budget, count, matcher, seq_ids, turns, temperature,
                top_p, max_new=, greedy=, top_k=, use_top_p=, attend_len=, until=)
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        cfg: Qwen2Config,
        *,
        eos_ids: Sequence[int],
        pad_id: int,
        stop_strings: Sequence[str] = (),
        token_bytes: Sequence[bytes] | None = None,
        stop_table: StopTable | None = None,
        tokenizer_vocab: int | None = None,
        mesh=None,
    ):
        self.graphdef = graphdef
        self.cfg = cfg
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        if stop_table is None:
            if stop_strings and token_bytes is None:
                raise ValueError("stop strings need the vocabulary's token_bytes to be matched on tokens")
            stop_table = build_stop_table(stop_strings, token_bytes or [b""] * cfg.vocab_size)
        if stop_table.next_state.shape[1] < cfg.vocab_size:
            # The model may have more (unused) embedding rows than the tokenizer has tokens.
            extra = cfg.vocab_size - stop_table.next_state.shape[1]
            stop_table = StopTable(
                stop_table.stop_strings,
                np.pad(stop_table.next_state, ((0, 0), (0, extra))),
                np.pad(stop_table.completes, ((0, 0), (0, extra)), constant_values=-1),
            )
        self.stop_table = stop_table
        # With a mesh, rows (and so the KV cache) are split over the batch axes (data, fsdp) and KV
        # heads over `tensor` where they divide: each device holds and decodes only its rows.
        self.mesh = mesh
        # Row counts are padded to a multiple of this (the batch devices; 1 alone).
        self.row_multiple = 1 if mesh is None else batch_devices(mesh)
        # Embedding rows past the tokenizer's vocabulary (Qwen2.5 pads 151,665 to 151,936) are
        # never sampled.
        self.tokenizer_vocab = cfg.vocab_size if tokenizer_vocab is None else int(tokenizer_vocab)
        if token_bytes is not None and tokenizer_vocab is None:
            self.tokenizer_vocab = min(cfg.vocab_size, len(token_bytes))
        self._next_state = jnp.asarray(stop_table.next_state)
        self._completes = jnp.asarray(stop_table.completes)
        self.compile_counts: Counter = Counter()
        self._gather_fns: dict = {}
        self.prefill_fn = jax.jit(self._prefill_impl, static_argnames=("max_len",))
        self.refill_fn = jax.jit(self._refill_impl, donate_argnames=("gen",))
        self._init_fn = jax.jit(self._init_impl, static_argnames=("slots", "max_len"))
        self.append_fn = jax.jit(self._append_impl, donate_argnames=("gen",), static_argnames=("attend_len",))
        self.decode_fn = jax.jit(
            self._decode_impl,
            donate_argnames=("gen",),
            static_argnames=("max_new", "greedy", "top_k", "use_top_p", "attend_len", "until"),
        )

    # --- compiled bodies ----------------------------------------------------------------------------
    def _forward(self, params, tokens, valid, cache, attend_len=None, rows=None):
        """Logits [B, V] at each row's last valid token (the LM head runs nowhere else), new cache."""
        with activation_mesh(self.mesh):
            return apply(
                self.graphdef, params, tokens, valid=valid, cache=cache, attend_len=attend_len, rows=rows,
                last_only=True,
            )

    def _prefill_impl(self, params, tokens, valid, max_len):
        self.compile_counts["prefill"] += 1
        cache = self._constrain(KVCache.init(self.cfg, tokens.shape[0], max_len))
        logits, cache = self._forward(params, tokens, valid, cache, attend_len=0)
        return GenState(self._constrain(cache), logits.astype(jnp.float32))

    def _refill_impl(self, params, gen, slots, tokens, valid):
        self.compile_counts["refill"] += 1
        cache = gen.cache.reset_rows(slots)
        logits, cache = self._forward(params, tokens, valid, cache, attend_len=0, rows=slots)
        has = valid.any(axis=1)
        old = gen.next_logits.at[slots].get(mode="clip")
        next_logits = gen.next_logits.at[slots].set(_keep_or_set(logits, has, old), mode="drop")
        return GenState(self._constrain(cache), next_logits)

    def _constrain(self, cache: KVCache) -> KVCache:
        if self.mesh is None:
            return cache
        return jax.lax.with_sharding_constraint(cache, self.cache_shardings())

    def cache_shardings(self) -> KVCache:
        """The NamedShardings of a cache's leaves on the mesh: rows over (data, fsdp), KV heads over
        `tensor` where they divide."""
        from jax.sharding import NamedSharding, PartitionSpec as P

        from tspo_jax.sharding import BATCH_AXES

        heads = "tensor" if self.cfg.num_kv_heads % self.mesh.shape["tensor"] == 0 else None
        kv = NamedSharding(self.mesh, P(BATCH_AXES, heads, None, None))
        rows = NamedSharding(self.mesh, P(BATCH_AXES))
        layers = self.cfg.num_layers
        return KVCache(
            k=(kv,) * layers,
            v=(kv,) * layers,
            valid=NamedSharding(self.mesh, P(BATCH_AXES, None)),
            index=rows,
            next_pos=rows,
        )

    def _append_impl(self, params, gen, tokens, valid, slots, attend_len):
        self.compile_counts["append"] += 1
        logits, cache = self._forward(params, tokens, valid, gen.cache, attend_len, rows=slots)
        has = valid.any(axis=1)
        if slots is None:
            return GenState(self._constrain(cache), _keep_or_set(logits, has, gen.next_logits))
        old = gen.next_logits.at[slots].get(mode="clip")
        next_logits = gen.next_logits.at[slots].set(_keep_or_set(logits, has, old), mode="drop")
        return GenState(self._constrain(cache), next_logits)

    def _decode_impl(
        self,
        params,
        gen,
        rng,
        active,
        budget,
        count,
        matcher,
        seq_ids,
        turns,
        temperature,
        top_p,
        *,
        max_new,
        greedy,
        top_k,
        use_top_p,
        attend_len,
        until,
    ):
        """Up to max_new steps. until="all": until every active row stopped; "any": back to the host
        as soon as one row stops (the others keep their count and matcher for the next call)."""
        self.compile_counts["decode"] += 1
        b = active.shape[0]
        eos = jnp.asarray(self.eos_ids or (-1,), jnp.int32)
        max_len = gen.cache.max_len

        def cond(carry):
            step, _, done, stopped, *_ = carry
            more = ~jnp.all(done) if until == "all" else ~jnp.any(stopped)
            return (step < max_new) & more

        def body(carry):
            step, gen, done, stopped, reason, which, matcher, count, toks, lps, live_steps = carry
            logits = gen.next_logits
            if self.tokenizer_vocab < logits.shape[-1]:
                in_vocab = jnp.arange(logits.shape[-1]) < self.tokenizer_vocab
                logits = jnp.where(in_vocab[None, :], logits, -jnp.inf)
            scaled = logits if greedy else logits / temperature
            logp_all = jax.nn.log_softmax(scaled, axis=-1)
            if greedy:
                tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            else:
                filtered = _filter_logits(scaled, top_k, top_p, use_top_p)
                keys = _row_keys(rng, seq_ids, turns, gen.cache.next_pos)
                tok = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
            live = ~done
            tok = jnp.where(live, tok, self.pad_id)
            lp = jnp.take_along_axis(logp_all, tok[:, None], axis=-1)[:, 0]
            toks = toks.at[:, step].set(tok)
            lps = lps.at[:, step].set(jnp.where(live, lp, 0.0))
            count = count + live.astype(jnp.int32)

            # Stop checks, in priority order: a stop string, EOS, then the row's budget / the cache.
            completes = self._completes[matcher, tok]
            matcher = jnp.where(live, self._next_state[matcher, tok], matcher)
            hit_string = live & (completes >= 0)
            hit_eos = live & jnp.any(tok[:, None] == eos[None, :], axis=1)
            hit_budget = live & (count >= budget)
            hit_context = live & (gen.cache.index + 1 >= max_len)  # no room after this token
            new_reason = jnp.select(
                [hit_string, hit_eos, hit_budget, hit_context],
                [STOP_STRING, STOP_EOS, STOP_BUDGET, STOP_CONTEXT],
                RUNNING,
            )
            reason = jnp.where(live, new_reason, reason)
            which = jnp.where(hit_string, completes, which)
            valid = live[:, None]
            new_logits, cache = self._forward(params, tok[:, None], valid, gen.cache, attend_len)
            gen = GenState(cache, _keep_or_set(new_logits, live, gen.next_logits))
            now = live & (new_reason != RUNNING)
            live_steps = live_steps + live.sum(dtype=jnp.int32)
            return step + 1, gen, done | now, stopped | now, reason, which, matcher, count, toks, lps, live_steps

        out_of_budget = active & (count >= budget)
        out_of_room = active & (gen.cache.index >= max_len)
        reason0 = jnp.where(out_of_budget, STOP_BUDGET, jnp.where(out_of_room, STOP_CONTEXT, RUNNING))
        stopped0 = out_of_budget | out_of_room
        carry = (
            jnp.int32(0),
            gen,
            ~active | stopped0,
            stopped0,
            reason0.astype(jnp.int32),
            jnp.full((b,), -1, jnp.int32),
            matcher,
            count,
            jnp.full((b, max_new), self.pad_id, jnp.int32),
            jnp.zeros((b, max_new), jnp.float32),
            jnp.int32(0),
        )
        start_count = count
        carry = jax.lax.while_loop(cond, body, carry)
        step, gen, _, _, reason, which, matcher, count, toks, lps, live_steps = carry
        return gen, DecodeOut(toks, lps, count - start_count, reason, which, matcher, step, live_steps)

    # --- public API -------------------------------------------------------------------------------
    def gathered(self, params):
        """`params` cast to the compute dtype and gathered over the fsdp axis (kept split over
        tensor): what rollout.gather_params decodes from. Works on arrays and on ShapeDtypeStructs
        (the planner's), laid out the same way."""
        from tspo_jax.sharding import without_axis

        dtype = self.cfg.jnp_dtype
        shardings = jax.tree.map(lambda x: without_axis(x.sharding, "fsdp"), params)
        if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), params, shardings)
        key = jax.tree.structure(params), tuple(jax.tree.leaves(shardings))
        if key not in self._gather_fns:
            self._gather_fns[key] = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                                            out_shardings=shardings)
        return self._gather_fns[key](params)

    def prefill(self, params, tokens, valid, max_len: int) -> GenState:
        """A fresh cache of max_len positions for every row, with (left-padded) prompts in it."""
        return self.prefill_fn(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool), max_len=max_len)

    def init_slots(self, slots: int, max_len: int) -> GenState:
        """An empty cache of `slots` rows (the rollout's decode slots), placed on the mesh."""
        return self._init_fn(slots=slots, max_len=max_len)

    def _init_impl(self, slots, max_len):
        cache = self._constrain(KVCache.init(self.cfg, slots, max_len))
        return GenState(cache, jnp.zeros((slots, self.cfg.vocab_size), jnp.float32))

    def refill(self, params, gen: GenState, slots, tokens, valid) -> GenState:
        """Empties cache rows `slots` ([R] ids; an id >= the slot count is a padding row) and
        prefills row r of the block into slot slots[r]; right-padded rows pack densely."""
        return self.refill_fn(
            params, gen, jnp.asarray(slots, jnp.int32), jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool)
        )

    def append(self, params, gen: GenState, tokens, valid, slots=None, *, lengths=None) -> GenState:
        """Appends a block: row r to cache row r, or to slots[r] when given. `lengths` (the rows'
        write positions, if the caller tracks them) saves reading them back from the device."""
        lengths = np.asarray(gen.cache.index) if lengths is None else np.asarray(lengths)
        attend = _attend_len(int(lengths.max(initial=0)) + np.shape(tokens)[1], gen.cache.max_len)
        return self.append_fn(
            params,
            gen,
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(valid, bool),
            None if slots is None else jnp.asarray(slots, jnp.int32),
            attend_len=attend,
        )

    def decode(
        self,
        params,
        gen: GenState,
        rng,
        *,
        max_new: int,
        sampling: SamplingParams,
        active=None,
        budget=None,
        count=None,
        matcher=None,
        seq_ids=None,
        turns=None,
        until: str = "all",
        lengths=None,
    ) -> tuple[GenState, DecodeOut]:
        """Samples up to max_new tokens per active row (see _decode_impl for `until`). `budget` is
        each row's limit on `count` (tokens of its current turn, 0 by default) and `matcher` its
        stop-string state (0: fresh). A row's token at position p is sampled with a key made from
        (rng, seq_ids[row], turns[row], p): seq_ids default to the row index, turns to 0."""
        if until not in ("all", "any"):
            raise ValueError(f"until must be 'all' or 'any', got {until!r}")
        b = gen.next_logits.shape[0]
        active = np.ones((b,), bool) if active is None else np.asarray(active, bool)
        count = np.zeros((b,), np.int32) if count is None else np.asarray(count, np.int32)
        if budget is None:
            budget = np.full((b,), max_new, np.int32)
        if until == "all":
            budget = np.minimum(budget, count + max_new)  # every row stops within the call
        lengths = np.asarray(gen.cache.index) if lengths is None else np.asarray(lengths)
        needed = int(lengths[active].max(initial=0)) + max_new
        return self.decode_fn(
            params,
            gen,
            rng,
            jnp.asarray(active),
            jnp.asarray(budget, jnp.int32),
            jnp.asarray(count),
            jnp.zeros((b,), jnp.int32) if matcher is None else jnp.asarray(matcher, jnp.int32),
            jnp.arange(b, dtype=jnp.int32) if seq_ids is None else jnp.asarray(seq_ids, jnp.int32),
            jnp.zeros((b,), jnp.int32) if turns is None else jnp.asarray(turns, jnp.int32),
            jnp.float32(sampling.temperature),
            jnp.float32(sampling.top_p),
            max_new=max_new,
            greedy=sampling.greedy,
            top_k=sampling.top_k,
            use_top_p=sampling.top_p < 1.0,
            attend_len=_attend_len(needed, gen.cache.max_len),
            until=until,
        )

    # --- abstract shapes (for ahead-of-time compilation) ------------------------------------------
    def abstract_cache(self, rows: int, length: int) -> GenState:
        """ShapeDtypeStructs (with shardings on a mesh) of the decode state of `rows` slots holding
        `length` positions each: what the compiled functions take as `gen`."""
        shapes = jax.eval_shape(
            lambda: GenState(KVCache.init(self.cfg, rows, length), jnp.zeros((rows, self.cfg.vocab_size), jnp.float32))
        )
        if self.mesh is None:
            return shapes
        from jax.sharding import NamedSharding, PartitionSpec as P

        from tspo_jax.sharding import BATCH_AXES

        cache_sh = self.cache_shardings()
        cache = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes.cache, cache_sh)
        logits = jax.ShapeDtypeStruct(shapes.next_logits.shape, jnp.float32,
                                      sharding=NamedSharding(self.mesh, P(BATCH_AXES, None)))
        return GenState(cache, logits)

    def abstract_call(self, name: str, params, *, rows: int, length: int, block: int = 16, block_rows: int | None = None,
                      chunk: int = 64, attend_len: int | None = None, sampling: SamplingParams = SamplingParams()):
        """(jitted function, args, kwargs) for `fn.lower(*args, **kwargs)`: name is "prefill" (rows
        prompts of `block` tokens into a fresh cache of `length`), "refill" (block_rows prompts into
        chosen slots), "append" (block_rows blocks of `block` tokens into chosen slots) or "decode"
        (a chunk of `chunk` steps over all `rows` slots). `params` may be ShapeDtypeStructs."""
        sds = jax.ShapeDtypeStruct
        r = rows if block_rows is None else block_rows
        gen = self.abstract_cache(rows, length)
        attend = length if attend_len is None else attend_len
        if name == "prefill":
            return self.prefill_fn, (params, sds((rows, block), jnp.int32), sds((rows, block), bool)), {"max_len": length}
        if name == "refill":
            return self.refill_fn, (params, gen, sds((r,), jnp.int32), sds((r, block), jnp.int32), sds((r, block), bool)), {}
        if name == "append":
            args = (params, gen, sds((r, block), jnp.int32), sds((r, block), bool), sds((r,), jnp.int32))
            return self.append_fn, args, {"attend_len": attend}
        if name == "decode":
            vec = sds((rows,), jnp.int32)
            args = (params, gen, jax.eval_shape(lambda: jax.random.key(0)), sds((rows,), bool), vec, vec, vec, vec, vec,
                    sds((), jnp.float32), sds((), jnp.float32))
            kw = dict(max_new=chunk, greedy=sampling.greedy, top_k=sampling.top_k, use_top_p=sampling.top_p < 1.0,
                      attend_len=attend, until="any")
            return self.decode_fn, args, kw
        raise ValueError(f"unknown function {name!r}: choose prefill, refill, append or decode")

    def generate(
        self,
        params,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        rng=None,
        seed: int = 0,
    ) -> list[dict]:
        """Plain (no tool) generation for a list of token-id prompts; pads rows and lengths internally.

        Returns per prompt: token_ids, logprobs (lists) and stop ("eos", "stop_string", "length",
        "context") with the stop string that fired."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        n = len(prompts)
        # Rows in powers of two here (a multiple of the batch devices on a mesh): plain requests of
        # any count reuse a few compiled shapes. The rollout pads rows to the batch devices only.
        b = bucket(n, self.row_multiple)
        t = round_up(max(len(p) for p in prompts), 16)
        tokens, valid = left_pad(prompts, t, self.pad_id, num_rows=b)
        max_len = round_up(t + max_new_tokens, 64)
        gen = self.prefill(params, tokens, valid, max_len)
        active = np.arange(b) < n
        rng = jax.random.key(seed) if rng is None else rng
        gen, out = self.decode(params, gen, rng, max_new=max_new_tokens, sampling=sampling, active=active,
                               lengths=np.full((b,), t))
        out = to_host(out)
        results = []
        for i in range(n):
            k = int(out.num_tokens[i])
            stop = int(out.stop_reason[i])
            results.append(
                {
                    "token_ids": out.tokens[i, :k].tolist(),
                    "logprobs": out.logprobs[i, :k].tolist(),
                    "stop": STOP_NAMES[stop],
                    "stop_string": (
                        self.stop_table.stop_strings[out.stop_string[i]] if stop == STOP_STRING else None
                    ),
                }
            )
        return results


def pad_rows(
    seqs: Sequence[Sequence[int]], width: int, pad_id: int, num_rows: int | None = None, *, left: bool = True
):
    """[num_rows, width] tokens and validity mask, each sequence right-aligned (`left` padding, for
    prompts) or left-aligned (for blocks appended mid-episode). Rows past len(seqs) are padding."""
    num_rows = len(seqs) if num_rows is None else num_rows
    tokens = np.full((num_rows, width), pad_id, np.int32)
    valid = np.zeros((num_rows, width), bool)
    for i, s in enumerate(seqs):
        if len(s) > width:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the width {width}")
        if len(s):
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            tokens[i, cols] = s
            valid[i, cols] = True
    return tokens, valid


def left_pad(seqs, width, pad_id, num_rows=None):
    return pad_rows(seqs, width, pad_id, num_rows, left=True)


def right_pad(seqs, width, pad_id, num_rows=None):
    return pad_rows(seqs, width, pad_id, num_rows, left=False)
