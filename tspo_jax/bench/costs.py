"""What a measurement must move and compute: the roofline model the "% of limit" is read against.

Counts only the work the job needs, never what an implementation adds (padding, recomputation,
bucketed attention): a decode step must read every weight it multiplies by once and the valid KV
cache of every row; a forward pass must do 2 FLOPs per weight per token plus the attention
products over the real context. The limit time of a piece of work is max(FLOPs / matmul rate,
bytes / bandwidth); a sequence of dependent steps (decode) is the sum of its steps' limits.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from tspo_jax.model.qwen2 import Qwen2Config


@dataclasses.dataclass(frozen=True)
class Limits:
    """The machine's measured ceilings: bytes/s read from memory, FLOP/s of a large matmul."""

    bandwidth: float
    matmul_flops: float

    def __post_init__(self):
        if not (self.bandwidth > 0 and self.matmul_flops > 0):
            raise ValueError(f"limits must be positive, got bandwidth={self.bandwidth} flops={self.matmul_flops}")


@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def seconds(self, limits: Limits) -> float:
        return max(self.flops / limits.matmul_flops, self.bytes / limits.bandwidth)


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def matmul_weights(cfg: Qwen2Config) -> int:
    """Weights multiplied per token: the projections of every layer and the LM head."""
    d, h, kv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    return cfg.num_layers * per_layer + d * cfg.vocab_size


def weights_read(cfg: Qwen2Config) -> int:
    """Bytes of parameters one forward step must read: everything but an untied embedding table
    (of which only the looked-up rows are read)."""
    n = cfg.num_params()
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    return n * dtype_bytes(cfg.param_dtype)


def kv_bytes_per_token(cfg: Qwen2Config) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes(cfg.dtype)


def attention_flops(cfg: Qwen2Config, context: float) -> float:
    """Scores and weighted values of one query token over `context` keys, all layers."""
    return 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def forward_tokens_cost(cfg: Qwen2Config, rows: Iterable[tuple[int, int]], all_logits: bool = False) -> Cost:
    """One forward call over a block: per row (tokens already cached, new tokens). The new tokens
    attend causally to the cache and to each other; weights are read once for the whole call.
    Sampling needs the LM head only at each row's last token; training (all_logits) at every one."""
    flops, kv = 0.0, 0.0
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    body = 2.0 * matmul_weights(cfg) - head
    for cached, new in rows:
        if new <= 0:
            continue
        # Query j (0-based) of the block sees cached + j + 1 keys.
        keys = new * cached + new * (new + 1) / 2
        flops += new * body + (new if all_logits else 1) * head + attention_flops(cfg, keys)
        kv += (cached + new) * kv_bytes_per_token(cfg)  # read the cache, write the block
    return Cost(flops, weights_read(cfg) + kv)


def prefill_cost(cfg: Qwen2Config, prompt_lens: Sequence[int]) -> Cost:
    return forward_tokens_cost(cfg, [(0, int(n)) for n in prompt_lens])


def decode_steps(cfg: Qwen2Config, contexts: np.ndarray, steps: int) -> list[Cost]:
    """Costs of `steps` decode steps for rows whose context starts at `contexts` tokens (each step
    adds one token to every row). Each step reads all weights again."""
    contexts = np.asarray(contexts, np.int64)
    return [forward_tokens_cost(cfg, [(int(c) + s, 1) for c in contexts]) for s in range(steps)]


def sequential_limit(costs: Sequence[Cost], limits: Limits) -> float:
    """Limit time of dependent steps: each waits for the one before, so the limits add up."""
    return float(sum(c.seconds(limits) for c in costs))


def total(costs: Sequence[Cost]) -> Cost:
    out = Cost()
    for c in costs:
        out = out + c
    return out


def update_cost(cfg: Qwen2Config, row_lengths: Sequence[int]) -> Cost:
    """One policy-update step over rows of the given valid lengths: forward (1x) and backward (2x)
    FLOPs over the real tokens, and the bytes of reading weights forward and backward, writing the
    gradients, and AdamW reading params, grads and both moments and writing params and moments."""
    fwd = forward_tokens_cost(cfg, [(0, int(n)) for n in row_lengths], all_logits=True)
    param_bytes = cfg.num_params() * dtype_bytes(cfg.param_dtype)
    return Cost(3.0 * fwd.flops, 2 * weights_read(cfg) + param_bytes + 7 * param_bytes)
