"""Jitted batched sampling on the KV cache: prefill, append, and a while-loop decode with stops.

A `Sampler` owns three compiled functions over a `GenState` (the KV cache plus each row's
next-token logits):
  prefill(tokens, valid)          a left-padded prompt batch into a fresh cache
  append(gen, tokens, valid)      a block for chosen rows (rows with no valid token are untouched)
  decode(gen, rng, budget, ...)   sample until every row hit EOS, a stop string or its budget
Decoding never leaves the device per token: the loop is a `lax.while_loop` whose carry (cache
included) is donated, and it exits as soon as every row has stopped. Batch size and lengths are
padded to buckets so a new batch of a similar size reuses the compiled code; `compile_counts`
says how often each function was traced.
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
from tspo_jax.sharding import batch_devices, to_host
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
    stop_reason: jax.Array  # [B] int32, one of STOP_*
    stop_string: jax.Array  # [B] int32 index into the stop strings, or -1


def bucket(n: int, minimum: int = 8) -> int:
    """Next power of two (at least `minimum`): the shapes we compile for."""
    b = minimum
    while b < n:
        b *= 2
    return b


def _attend_len(needed: int, max_len: int) -> int:
    """The cache prefix a call attends over: every slot it can write lies below it. Bucketed to
    powers of two so a whole rollout compiles only a few variants."""
    return min(bucket(needed, 128), max_len)


def _last_valid_logits(logits, valid, previous):
    """Per row, the logits after its last valid token of the block; rows with none keep `previous`."""
    c = valid.shape[1]
    has = valid.any(axis=1)
    last = c - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    picked = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    return jnp.where(has[:, None], picked.astype(jnp.float32), previous)


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
    """Compiled generation for one model structure, vocabulary and set of stop strings."""

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
        # Row counts are bucketed to powers of two from here (1, 2, 4, ... alone; a multiple of the
        # batch devices on a mesh), so a single request decodes one row, not a padded eight.
        self.row_multiple = 1 if mesh is None else batch_devices(mesh)
        # Embedding rows past the tokenizer's vocabulary (Qwen2.5 pads 151,665 to 151,936) are
        # never sampled.
        self.tokenizer_vocab = cfg.vocab_size if tokenizer_vocab is None else int(tokenizer_vocab)
        if token_bytes is not None and tokenizer_vocab is None:
            self.tokenizer_vocab = min(cfg.vocab_size, len(token_bytes))
        self._next_state = jnp.asarray(stop_table.next_state)
        self._completes = jnp.asarray(stop_table.completes)
        self.compile_counts: Counter = Counter()
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("max_len",))
        self._append = jax.jit(self._append_impl, donate_argnames=("gen",), static_argnames=("attend_len",))
        self._decode = jax.jit(
            self._decode_impl,
            donate_argnames=("gen",),
            static_argnames=("max_new", "greedy", "top_k", "use_top_p", "attend_len"),
        )

    # --- compiled bodies ----------------------------------------------------------------------------
    def _forward(self, params, tokens, valid, cache, attend_len=None):
        return apply(self.graphdef, params, tokens, valid=valid, cache=cache, attend_len=attend_len)

    def _prefill_impl(self, params, tokens, valid, max_len):
        self.compile_counts["prefill"] += 1
        cache = self._constrain(KVCache.init(self.cfg, tokens.shape[0], max_len))
        logits, cache = self._forward(params, tokens, valid, cache, attend_len=0)
        cache = self._constrain(cache)
        next_logits = _last_valid_logits(logits, valid, jnp.zeros(logits.shape[::2], jnp.float32))
        return GenState(cache, next_logits)

    def _constrain(self, cache: KVCache) -> KVCache:
        if self.mesh is None:
            return cache
        from jax.sharding import NamedSharding, PartitionSpec as P

        from tspo_jax.sharding import BATCH_AXES

        heads = "tensor" if self.cfg.num_kv_heads % self.mesh.shape["tensor"] == 0 else None
        kv = NamedSharding(self.mesh, P(BATCH_AXES, heads, None, None))
        rows = NamedSharding(self.mesh, P(BATCH_AXES))
        c = jax.lax.with_sharding_constraint
        return KVCache(
            k=tuple(c(x, kv) for x in cache.k),
            v=tuple(c(x, kv) for x in cache.v),
            valid=c(cache.valid, NamedSharding(self.mesh, P(BATCH_AXES, None))),
            index=cache.index,
            next_pos=c(cache.next_pos, rows),
        )

    def _append_impl(self, params, gen, tokens, valid, attend_len):
        self.compile_counts["append"] += 1
        logits, cache = self._forward(params, tokens, valid, gen.cache, attend_len)
        return GenState(cache, _last_valid_logits(logits, valid, gen.next_logits))

    def _decode_impl(
        self,
        params,
        gen,
        rng,
        active,
        budget,
        temperature,
        top_p,
        *,
        max_new,
        greedy,
        top_k,
        use_top_p,
        attend_len,
    ):
        self.compile_counts["decode"] += 1
        b = active.shape[0]
        eos = jnp.asarray(self.eos_ids or (-1,), jnp.int32)
        room = gen.cache.max_len - gen.cache.index  # slots left in the cache
        steps = jnp.minimum(max_new, room)

        def cond(carry):
            step, _, _, done, *_ = carry
            return (step < steps) & ~jnp.all(done)

        def body(carry):
            step, gen, rng, done, reason, which, matcher, count, toks, lps = carry
            rng, key = jax.random.split(rng)
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
                tok = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
            live = ~done
            tok = jnp.where(live, tok, self.pad_id)
            lp = jnp.take_along_axis(logp_all, tok[:, None], axis=-1)[:, 0]
            toks = toks.at[:, step].set(tok)
            lps = lps.at[:, step].set(jnp.where(live, lp, 0.0))
            count = count + live.astype(jnp.int32)

            # Stop checks, in priority order: a stop string, EOS, then the row's budget / the cache.
            completes = self._completes[matcher, tok]
            matcher = self._next_state[matcher, tok]
            hit_string = live & (completes >= 0)
            hit_eos = live & jnp.any(tok[:, None] == eos[None, :], axis=1)
            hit_budget = live & (count >= budget)
            hit_context = live & (step + 1 >= room)
            new_reason = jnp.select(
                [hit_string, hit_eos, hit_budget, hit_context],
                [STOP_STRING, STOP_EOS, STOP_BUDGET, STOP_CONTEXT],
                RUNNING,
            )
            reason = jnp.where(live, new_reason, reason)
            which = jnp.where(hit_string, completes, which)
            valid = live[:, None]
            logits, cache = self._forward(params, tok[:, None], valid, gen.cache, attend_len)
            gen = GenState(cache, _last_valid_logits(logits, valid, gen.next_logits))
            done = done | (new_reason != RUNNING)
            return step + 1, gen, rng, done, reason, which, matcher, count, toks, lps

        done0 = ~active | (budget <= 0)
        carry = (
            jnp.int32(0),
            gen,
            rng,
            done0,
            jnp.where(active & (budget <= 0), STOP_BUDGET, RUNNING).astype(jnp.int32),
            jnp.full((b,), -1, jnp.int32),
            jnp.zeros((b,), jnp.int32),
            jnp.zeros((b,), jnp.int32),
            jnp.full((b, max_new), self.pad_id, jnp.int32),
            jnp.zeros((b, max_new), jnp.float32),
        )
        carry = jax.lax.while_loop(cond, body, carry)
        _, gen, _, done, reason, which, _, count, toks, lps = carry
        # Rows still running when the loop ran out of cache room stop for context.
        reason = jnp.where(active & (reason == RUNNING), STOP_CONTEXT, reason)
        return gen, DecodeOut(toks, lps, count, reason, which)

    # --- public API -------------------------------------------------------------------------------
    def prefill(self, params, tokens, valid, max_len: int) -> GenState:
        return self._prefill(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool), max_len=max_len)

    def append(self, params, gen: GenState, tokens, valid) -> GenState:
        attend = _attend_len(int(gen.cache.index) + np.shape(tokens)[1], gen.cache.max_len)
        return self._append(
            params, gen, jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool), attend_len=attend
        )

    def decode(
        self, params, gen: GenState, rng, *, max_new: int, sampling: SamplingParams, active=None, budget=None
    ) -> tuple[GenState, DecodeOut]:
        b = gen.next_logits.shape[0]
        active = np.ones((b,), bool) if active is None else np.asarray(active, bool)
        budget = np.full((b,), max_new, np.int32) if budget is None else np.minimum(budget, max_new)
        return self._decode(
            params,
            gen,
            rng,
            jnp.asarray(active),
            jnp.asarray(budget, jnp.int32),
            jnp.float32(sampling.temperature),
            jnp.float32(sampling.top_p),
            max_new=max_new,
            greedy=sampling.greedy,
            top_k=sampling.top_k,
            use_top_p=sampling.top_p < 1.0,
            attend_len=_attend_len(int(gen.cache.index) + max_new, gen.cache.max_len),
        )

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
        """Plain (no tool) generation for a list of token-id prompts; pads to buckets internally.

        Returns per prompt: token_ids, logprobs (lists) and stop ("eos", "stop_string", "length",
        "context") with the stop string that fired."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        n = len(prompts)
        b = bucket(n, self.row_multiple)
        t = bucket(max(len(p) for p in prompts), 16)
        tokens, valid = left_pad(prompts, t, self.pad_id, num_rows=b)
        max_len = bucket(t + max_new_tokens, 64)
        gen = self.prefill(params, tokens, valid, max_len)
        active = np.arange(b) < n
        rng = jax.random.key(seed) if rng is None else rng
        gen, out = self.decode(params, gen, rng, max_new=max_new_tokens, sampling=sampling, active=active)
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
