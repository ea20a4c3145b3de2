"""Qwen2 / Qwen2.5 decoder in Flax NNX, numerically equal to Hugging Face's `Qwen2ForCausalLM`.

One forward function serves training, prefill, decode and mid-episode appends: the model always
consumes a *block* of C new tokens per row with explicit positions and a validity mask, writes
them into the KV cache at each row's own write position, and attends over every valid cached
position of that row. A left-padded prompt, one decode step, and an observation appended to only
some rows are all such blocks. A block may also go to chosen cache rows (`rows`): the rollout's
decode slots are refilled and appended to one at a time this way.

KV cache layout (`KVCache`):
  k, v     per layer, [batch, kv_heads, max_len, head_dim]: keys after RoPE, values (the
           position axis next to head_dim makes attention a plain batched matmul)
  valid    [batch, max_len] bool    position holds a real token of that row
  index    [batch] int32            next position to write, per row: every position at or after
                                    it is invalid
  next_pos [batch] int32            RoPE position the row's next real token gets

A block is written at [index, index + C) of its row, and the row's index moves just past the
block's last valid token (not at all when it has none), so right-padded blocks pack densely and
a row with nothing to add keeps its room. Positions count only real tokens, so a row's numbers
do not depend on what other rows in the batch did.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tspo_jax import sharding as shd

# Logical axis names carried by every parameter (see sharding.py for the mesh rules).
VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP_DIM = "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp"

# How activation dimensions map to mesh axes: the same rule as parameters (sharding.logical_to_spec).
_ACTIVATION_RULES = {"batch": shd.BATCH_AXES, "tensor": "tensor"}


def constrain(cfg: "Qwen2Config", x: jax.Array, *dims: str | None) -> jax.Array:
    """Pins `x`'s layout on the mesh in context: per axis "batch" (over data x fsdp), "tensor" or
    None (replicated). An axis the mesh does not divide stays replicated. A no-op without
    cfg.shard_activations or without a mesh in context (one device, or a caller that set none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not cfg.shard_activations or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, shd.logical_to_spec(dims, x.shape, mesh, _ACTIVATION_RULES))


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    param_dtype: str = "float32"  # storage dtype of parameters
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat: bool = False  # rematerialise each decoder block in the backward pass
    # Blocks longer than this attend in query chunks, each to the keys up to its own end: the
    # causal upper triangle is skipped and score tensors stay small (see Attention).
    attention_chunk: int = 64
    # Pin activations to the batch (data, fsdp) and tensor axes of the mesh in context
    # (sharding.activation_mesh). Without these constraints XLA's partitioner may keep fsdp-sharded
    # weights in place and move activations instead (docs/POD_PLAN.md measures it).
    shard_activations: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                    "set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} "
                "for grouped-query attention"
            )
        if self.attention_chunk < 1:
            raise ValueError(f"attention_chunk must be >= 1, got {self.attention_chunk}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")

    def replace(self, **kw) -> "Qwen2Config":
        return dataclasses.replace(self, **kw)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def num_params(self) -> int:
        d, h, kv, hd, f = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
        )
        attn = d * h * hd + h * hd + 2 * (d * kv * hd + kv * hd) + h * hd * d
        block = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * block + d + head

    # --- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: str | os.PathLike | dict, **overrides) -> "Qwen2Config":
        """Builds a config from an HF `config.json` (a path to it, its directory, or the dict)."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path}: pass an HF checkpoint directory")
            with open(path) as f:
                config = json.load(f)
        model_type = config.get("model_type")
        archs = config.get("architectures") or []
        if model_type != "qwen2" and "Qwen2ForCausalLM" not in archs:
            raise ValueError(
                f"config is model_type={model_type!r} architectures={archs}, not a Qwen2/Qwen2.5 "
                "causal LM (model_type 'qwen2'); this port only supports Qwen2ForCausalLM checkpoints"
            )
        if config.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported (Qwen2.5 checkpoints ship it off)")
        rope_scaling = config.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {rope_scaling} is not supported; only default RoPE is")
        rope_theta = config.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it in rope_parameters
            rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        kw = dict(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
            head_dim=config.get("head_dim"),
            rope_theta=float(rope_theta),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        cfg = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "torch_dtype": self.param_dtype,
        }
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            cfg["eos_token_id"] = self.eos_token_id
        return cfg


def _preset(**shape) -> Qwen2Config:
    # Qwen2.5's special tokens; the rest by name, so a row cannot put a number in the wrong place.
    return Qwen2Config(bos_token_id=151643, eos_token_id=151645, **{"rms_norm_eps": 1e-6, **shape})


# Shapes of the released Qwen2.5 models. For a real checkpoint prefer from_hf_config(config.json),
# which carries its exact eps / theta / token ids.
PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": _preset(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                            num_layers=24, num_heads=14, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": _preset(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                            num_layers=28, num_heads=12, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": _preset(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                          num_layers=36, num_heads=16, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": _preset(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                          num_layers=28, num_heads=28, num_kv_heads=4, tie_word_embeddings=False),
    "qwen2.5-14b": _preset(vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                           num_layers=48, num_heads=40, num_kv_heads=8, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "qwen2.5-32b": _preset(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                           num_layers=64, num_heads=40, num_kv_heads=8, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "qwen2.5-72b": _preset(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                           num_layers=80, num_heads=64, num_kv_heads=8, tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def preset(name: str, **overrides) -> Qwen2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown Qwen2.5 preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# --- KV cache -------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    next_pos: jax.Array

    @classmethod
    def init(cls, cfg: Qwen2Config, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or cfg.jnp_dtype
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((batch,), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def reset_rows(self, rows: jax.Array) -> "KVCache":
        """The cache with `rows` emptied (nothing valid, write index and positions at 0); ids out of
        range are ignored. The stale keys stay: invalid positions are never attended to."""
        return dataclasses.replace(
            self,
            valid=self.valid.at[rows].set(False, mode="drop"),
            index=self.index.at[rows].set(0, mode="drop"),
            next_pos=self.next_pos.at[rows].set(0, mode="drop"),
        )


def last_valid(valid: jax.Array) -> jax.Array:
    """[B] index of each row's last valid position in a [B, C] block (-1 when it has none)."""
    c = valid.shape[1]
    return jnp.where(valid.any(axis=1), c - 1 - jnp.argmax(valid[:, ::-1], axis=1), -1)


def block_positions(valid: jax.Array, start: jax.Array | None = None) -> jax.Array:
    """RoPE positions for a block: real tokens count up from `start` (per row), padding repeats."""
    valid = valid.astype(jnp.int32)
    pos = jnp.cumsum(valid, axis=1) - 1
    pos = jnp.maximum(pos, 0)
    if start is not None:
        pos = pos + start[:, None]
    return pos


# --- modules --------------------------------------------------------------------------------------
def _param(rngs: nnx.Rngs, shape, axes, dtype, scale=0.02):
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(EMBED,))
        self.eps = eps

    def __call__(self, x):
        # HF computes the statistics in fp32 and casts back before the weight multiply.
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * x32.astype(dtype)


def rope(x, positions, theta: float):
    """Rotary embedding, HF rotate-half convention. x: [B, T, H, D], positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        d, h, kv, hd, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_param_dtype
        self.cfg = cfg
        self.q_kernel = _param(rngs, (d, h, hd), (EMBED, HEADS, HEAD_DIM), pd)
        self.q_bias = _param(rngs, (h, hd), (HEADS, HEAD_DIM), pd)
        self.k_kernel = _param(rngs, (d, kv, hd), (EMBED, KV_HEADS, HEAD_DIM), pd)
        self.k_bias = _param(rngs, (kv, hd), (KV_HEADS, HEAD_DIM), pd)
        self.v_kernel = _param(rngs, (d, kv, hd), (EMBED, KV_HEADS, HEAD_DIM), pd)
        self.v_bias = _param(rngs, (kv, hd), (KV_HEADS, HEAD_DIM), pd)
        self.o_kernel = _param(rngs, (h, hd, d), (HEADS, HEAD_DIM, EMBED), pd)

    def __call__(self, x, positions, block_mask, cached=None):
        """x: [B, C, D]; block_mask: [B, C, C] bool, which tokens of the block each query sees; it
        must be causal (nothing above the diagonal), as the chunked path never reads that part.

        `cached` (None without a cache) is (keys, values, mask, write): the cache's first S slots
        as [B, KV, S, HD] *before* this block is written, which of them each query sees [B, C, S],
        and a function that writes this block's keys and values into the cache. The block and the
        cached prefix are scored separately and share one softmax, so the cache is read before it
        is written: XLA then updates the donated buffer in place (reading it after the write made
        it copy the whole cache every decode step).
        """
        cfg, dt = self.cfg, x.dtype
        heads = ("batch", None, "tensor", None)
        q = jnp.einsum("bcd,dhk->bchk", x, self.q_kernel[...].astype(dt)) + self.q_bias[...].astype(dt)
        k = jnp.einsum("bcd,dhk->bchk", x, self.k_kernel[...].astype(dt)) + self.k_bias[...].astype(dt)
        v = jnp.einsum("bcd,dhk->bchk", x, self.v_kernel[...].astype(dt)) + self.v_bias[...].astype(dt)
        q, k, v = (constrain(cfg, t, *heads) for t in (q, k, v))
        q = rope(q, positions, cfg.rope_theta)
        k = rope(k, positions, cfg.rope_theta).swapaxes(1, 2)  # [B, KV, C, HD]: the cache layout
        v = v.swapaxes(1, 2)
        old = None
        if cached is not None:
            old_k, old_v, old_mask, write = cached
            if old_k is not None:
                old = (old_k.astype(dt), old_v.astype(dt), old_mask)
        b, c = x.shape[:2]
        # Grouped-query attention without materialising repeated K/V: split query heads by KV head.
        q = q.reshape(b, c, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
        # Long blocks go in query chunks: chunk [s, e) needs only the block's keys below e (the mask
        # is causal), which skips the upper triangle and keeps the fp32 scores small enough to stay
        # in cache. At most 16 chunks, so the unrolled graph stays small for long sequences.
        chunk = max(cfg.attention_chunk, -(-c // 16))
        if c <= chunk:
            parts = [(k, v, block_mask)] if old is None else [old, (k, v, block_mask)]
            outs = [_attend(q, parts)]
        elif old is None:
            outs = []
            for s in range(0, c, chunk):
                e = min(s + chunk, c)
                outs.append(_attend(q[:, s:e], [(k[:, :, :e], v[:, :, :e], block_mask[:, s:e, :e])]))
        else:
            # After a cached prefix the chunks' work is dominated by the prefix, which all share:
            # a loop over equal chunks (compiled once) instead of an unrolled triangle keeps the
            # many append shapes of a rollout cheap to compile.
            outs = [_attend_in_chunks(q, old, (k, v, block_mask), chunk)]
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
        if cached is not None:
            # Write only after the reads. XLA orders an in-place update after the reads of the old
            # buffer only when the written value depends on them (an optimization barrier is not
            # enough); without that it copies the whole cache every decode step. A zero taken from
            # each chunk's output is that dependency, at the cost of a few scalars.
            after_reads = (sum(o.reshape(-1)[0] for o in outs) * 0).astype(k.dtype)
            write(k + after_reads, v + after_reads)
        out = constrain(cfg, out.reshape(b, c, cfg.num_heads, cfg.head_dim), *heads)
        return constrain(cfg, jnp.einsum("bchk,hkd->bcd", out, self.o_kernel[...].astype(dt)), "batch", None, None)


def _attend(q, parts):
    """Softmax attention of q [B, C, KV, G, HD] over several key groups at once (one softmax across
    all of them). parts: (keys [B, KV, S, HD], values [B, KV, S, HD], mask [B, C, S]) each."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    # A single query (a decode step) against the cache is a batch of matrix-vector products, which
    # XLA's CPU dot runs one small call per (row, KV head); a fused multiply-and-sum reads the cache
    # once instead (1.8-3.5x faster per layer at 8-32 rows on CPU, about equal at one row). Accelerators
    # keep the dot.
    by_reduction = q.shape[1] == 1 and jax.default_backend() == "cpu"
    scores = [
        jnp.where(
            mask[:, None, None],
            _scores(q, keys, by_reduction) * scale,
            jnp.finfo(jnp.float32).min,
        )
        for keys, _, mask in parts
    ]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q.dtype)
    splits = np.cumsum([sc.shape[-1] for sc in scores])[:-1]
    return sum(
        _weighted_values(p, values, by_reduction)
        for p, (_, values, _) in zip(jnp.split(probs, splits, axis=-1), parts)
    )


def _attend_in_chunks(q, old, block, chunk: int):
    """_attend(q, [old, block]) over query chunks of `chunk` positions in a lax.map."""
    b, c = q.shape[:2]
    n = -(-c // chunk)
    pad = n * chunk - c
    k, v, block_mask = block
    old_mask = old[2]
    if pad:  # padded queries see nothing; their outputs are dropped below
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        block_mask = jnp.pad(block_mask, ((0, 0), (0, pad), (0, 0)))
        old_mask = jnp.pad(old_mask, ((0, 0), (0, pad), (0, 0)))

    def split(x):  # [B, n * chunk, ...] -> [n, B, chunk, ...]
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    def one(xs):
        q_c, old_m, block_m = xs
        return _attend(q_c, [(old[0], old[1], old_m), (k, v, block_m)])

    out = jax.lax.map(one, (split(q), split(old_mask), split(block_mask)))
    return out.swapaxes(0, 1).reshape(b, n * chunk, *q.shape[2:])[:, :c]


def _scores(q, keys, by_reduction: bool):
    """q [B, C, KV, G, HD] . keys [B, KV, S, HD] -> fp32 scores [B, KV, G, C, S]."""
    if by_reduction:
        prod = q[:, 0, :, :, None, :].astype(jnp.float32) * keys[:, :, None].astype(jnp.float32)
        return prod.sum(-1)[:, :, :, None, :]
    return jnp.einsum("bckgd,bksd->bkgcs", q, keys).astype(jnp.float32)


def _weighted_values(probs, values, by_reduction: bool):
    """probs [B, KV, G, C, S] . values [B, KV, S, HD] -> [B, C, KV, G, HD]."""
    if by_reduction:
        prod = probs[:, :, :, 0, :, None].astype(jnp.float32) * values[:, :, None].astype(jnp.float32)
        return prod.sum(-2)[:, None].astype(values.dtype)
    return jnp.einsum("bkgcs,bksd->bckgd", probs, values)


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_param_dtype
        self.gate_kernel = _param(rngs, (d, f), (EMBED, MLP_DIM), pd)
        self.up_kernel = _param(rngs, (d, f), (EMBED, MLP_DIM), pd)
        self.down_kernel = _param(rngs, (f, d), (MLP_DIM, EMBED), pd)
        self.cfg = cfg

    def __call__(self, x):
        dt, cfg = x.dtype, self.cfg
        gate = constrain(cfg, x @ self.gate_kernel[...].astype(dt), "batch", None, "tensor")
        up = constrain(cfg, x @ self.up_kernel[...].astype(dt), "batch", None, "tensor")
        return constrain(cfg, (jax.nn.silu(gate) * up) @ self.down_kernel[...].astype(dt), "batch", None, None)


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_param_dtype)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, block_mask, cached=None):
        x = x + self.attn(self.input_norm(x), positions, block_mask, cached)
        return x + self.mlp(self.post_attn_norm(x))


class Qwen2(nnx.Module):
    """The causal LM. Call with a block of tokens; see the module docstring for the cache contract."""

    def __init__(self, cfg: Qwen2Config, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = cfg.jnp_param_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), (VOCAB, EMBED), pd)
        self.layers = nnx.List([DecoderBlock(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), (EMBED, VOCAB), pd)

    def lm_head_kernel(self) -> jax.Array:
        """The [embed, vocab] output projection (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def __call__(
        self,
        tokens,
        valid=None,
        positions=None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        attend_len: int | None = None,
        rows=None,
        last_only: bool = False,
    ):
        """tokens, valid, positions: [B, C]. Returns (logits [B, C, V] or final hidden [B, C, D], cache).

        Without a cache the block attends causally within itself (training / scoring). With a cache
        each row's block is written at [cache.index, cache.index + C) of its cache row and attends
        to every valid position there; `positions` default to continuing each row's count from
        `cache.next_pos`. `rows` ([B] int32, optional) sends block row b to cache row rows[b]
        instead of b (the cache may have more rows; an id out of range is a padding row whose
        writes are dropped). `attend_len` (static) limits attention to the first positions of the
        cache: a caller that knows every valid position lies below it saves the work on the rest.
        `last_only`: only each row's last valid position goes through the LM head ([B, V] logits,
        zeros for a row with no valid token), never a [B, C, V] tensor.
        """
        cfg = self.cfg
        b, c = tokens.shape
        if valid is None:
            valid = jnp.ones((b, c), bool)
        valid = valid.astype(bool)
        # Chosen rows are gathered (ids out of range clip; their writes are dropped below). The
        # whole cache is sliced instead: a gather would copy the cache prefix every decode step.
        chosen = rows is not None

        def gather(x, s=None, axis=1):
            if s is not None:
                x = jax.lax.slice_in_dim(x, 0, s, axis=axis)
            return x.at[rows].get(mode="clip") if chosen else x

        if cache is not None:
            if not chosen and b != cache.batch:
                raise ValueError(f"a block of {b} rows for a cache of {cache.batch}: pass rows=")
            rows = rows if chosen else jnp.arange(b, dtype=jnp.int32)
            index = gather(cache.index)
            start_pos = gather(cache.next_pos)
        if positions is None:
            positions = block_positions(valid, None if cache is None else start_pos)
        x = constrain(cfg, jnp.take(self.embed[...], tokens, axis=0).astype(cfg.jnp_dtype), "batch", None, None)

        block_mask = jnp.tril(jnp.ones((c, c), bool))[None] & valid[:, None, :]
        if cache is None:
            block_fn = _remat_block if cfg.remat else _call_block
            for layer in self.layers:
                x = block_fn(layer, x, positions, block_mask)
            out_cache = None
        else:
            # Every valid position lies below `s`; the block itself is attended separately.
            s = cache.max_len if attend_len is None else min(attend_len, cache.max_len)
            old_valid = gather(cache.valid, s)
            old_mask = jnp.broadcast_to(old_valid[:, None, :], (b, c, s))
            # Where each block token goes: (cache row, position), row-major over the block.
            row_ids = jnp.broadcast_to(rows[:, None], (b, c))
            pos_ids = index[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):

                def write(k, v, i=i):
                    # k, v: [B, KV, C, HD] -> scattered as [B, C, KV, HD] at (row, :, position).
                    for store, new in ((new_k, k), (new_v, v)):
                        old = (cache.k if store is new_k else cache.v)[i]
                        store.append(
                            old.at[row_ids, :, pos_ids].set(new.swapaxes(1, 2).astype(old.dtype), mode="drop")
                        )

                if s == 0:  # a fresh row (prefill): nothing to attend to but the block
                    cached = (None, None, None, write)
                else:
                    cached = (gather(cache.k[i], s, 2), gather(cache.v[i], s, 2), old_mask, write)
                x = layer(x, positions, block_mask, cached)
            out_cache = KVCache(
                k=tuple(new_k),
                v=tuple(new_v),
                valid=cache.valid.at[row_ids, pos_ids].set(valid, mode="drop"),
                index=cache.index.at[rows].set(index + last_valid(valid) + 1, mode="drop"),
                next_pos=cache.next_pos.at[rows].set(start_pos + valid.sum(axis=1).astype(jnp.int32), mode="drop"),
            )
        if last_only:
            last = jnp.maximum(last_valid(valid), 0)
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        x = self.final_norm(x)
        if return_hidden:
            return x, out_cache
        logits = x @ self.lm_head_kernel().astype(x.dtype)
        if last_only:
            logits = jnp.where(valid.any(axis=1)[:, None], logits, 0)
        return logits, out_cache


def _call_block(layer, x, positions, block_mask):
    return layer(x, positions, block_mask)


@nnx.remat
def _remat_block(layer, x, positions, block_mask):
    return layer(x, positions, block_mask)


def init_model(cfg: Qwen2Config, seed: int = 0) -> Qwen2:
    return Qwen2(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: Qwen2Config) -> Qwen2:
    """The model's structure with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: Qwen2(cfg, nnx.Rngs(params=0)))


def apply(graphdef: nnx.GraphDef, params: nnx.State, *args, **kwargs):
    """Functional call for jitted code: the model is rebuilt from (graphdef, params) inside the trace,
    so the params can be a traced, sharded, donated argument."""
    return nnx.merge(graphdef, params)(*args, **kwargs)
