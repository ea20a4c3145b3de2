"""Policy loss (PPO clip, KL to the reference, entropy bonus) and memory-aware token logprobs.

Follows verl's actor loss as Search-R1 trains it (defaults), with verl's later additions as
knobs (eps_high != eps_low, dual clip, aggregations). The [-20, 20] clamps before exp are verl's
later guard too: they change nothing in normal ranges and keep exp (and gradients) finite.
  ratio   = exp(clamp(logp - old_logp, -20, 20))
  pg      = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
  dual    = where(A < 0, min(pg, -A * c), pg)                       if dual_clip_c is set
  loss    = agg(pg) + kl_coef * agg(kl(logp, ref_logp)) - entropy_coef * agg(entropy)
The KL estimators (with d = ref_logp - logp): low_var_kl = clamp(exp(d) - d - 1, -10, 10) with
d clamped to [-20, 20] first (k3); k1 = -d; abs = |d|; mse = d^2 / 2 (k2).
Aggregations, with m the loss mask:
  token-mean           sum(x m) / sum(m)                        (Search-R1 / verl default)
  seq-mean-token-mean  mean over rows with >= 1 token of sum_t(x m) / sum_t(m)
  seq-sum              sum(x m) / (B * L), L = seq_sum_norm_len or T  (Dr.GRPO: constant norm)
The counts (sum(m), rows with tokens, B) are the *mini-batch's* when `norm` is given (see
`normalizers`): a micro-batch's loss is then its share of the mini-batch loss, and summing the
micro-batch gradients gives the mini-batch gradient whatever the micro-batch size (verl's
agg_loss with global token counts). Without `norm` they are the array's own.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-sum")
KL_TYPES = ("low_var_kl", "k1", "abs", "mse")


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.clip_eps_low = 0.2
    cfg.clip_eps_high = 0.2
    cfg.dual_clip_c = config_dict.placeholder(float)  # None: off (Search-R1); verl later uses 3.0
    cfg.kl_type = "low_var_kl"
    cfg.kl_coef = 0.001  # 0 disables the KL term (ref_logp may then be None)
    # Search-R1 inherits verl's entropy_coeff 0.001 (its train scripts leave it); 0 is common
    # too, and then entropy may be None.
    cfg.entropy_coef = 0.001
    cfg.agg = "token-mean"
    cfg.seq_sum_norm_len = config_dict.placeholder(int)  # L for 'seq-sum'; None: the padded T
    # Sequence positions per chunk in token_logprobs_and_entropy: a chunk holds
    # B_local * logprob_chunk * V float32 logits (152k vocab, 8 rows: 1.2 GB at 256).
    cfg.logprob_chunk = 256
    return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the bad knob and what it accepts."""
    if cfg.agg not in AGGREGATIONS:
        raise ValueError(f"losses.agg={cfg.agg!r} is not one of {AGGREGATIONS}.")
    if cfg.kl_type not in KL_TYPES:
        raise ValueError(f"losses.kl_type={cfg.kl_type!r} is not one of {KL_TYPES}.")
    if not (0.0 <= cfg.clip_eps_low < 1.0 and cfg.clip_eps_high >= 0.0):
        raise ValueError(
            f"losses.clip_eps_low={cfg.clip_eps_low} must lie in [0, 1) and "
            f"clip_eps_high={cfg.clip_eps_high} be >= 0."
        )
    if cfg.dual_clip_c is not None and not cfg.dual_clip_c > 1.0:
        raise ValueError(
            f"losses.dual_clip_c={cfg.dual_clip_c} must be > 1 (e.g. 3.0), or None to turn dual clip off."
        )
    if cfg.seq_sum_norm_len is not None and cfg.seq_sum_norm_len < 1:
        raise ValueError(
            f"losses.seq_sum_norm_len={cfg.seq_sum_norm_len} must be >= 1, or None for the padded length."
        )
    if cfg.logprob_chunk < 1:
        raise ValueError(f"losses.logprob_chunk={cfg.logprob_chunk} must be >= 1.")


# ----------------------------------------------------------------------------- logprobs


def logprobs_from_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets] in float32; for small cases (materialises the logits)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    return lse - jnp.sum(probs * logits, axis=-1)


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _chunk_logprobs_and_entropy(hidden, lm_head, targets, inv_temperature, vocab_limit):
    # Checkpointed: the backward pass recomputes this chunk's logits instead of keeping them.
    logits = jnp.einsum("bcd,dv->bcv", hidden, lm_head, preferred_element_type=jnp.float32)
    logits = logits * inv_temperature
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        # The embedding's padding rows past the tokenizer are never sampled (the sampler masks
        # them too), so they take no probability here either.
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, jnp.finfo(jnp.float32).min)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - lse[..., None])
    return picked - lse, lse - jnp.sum(probs * logits, axis=-1)


def token_logprobs_and_entropy(
    hidden, lm_head, targets, *, chunk_size: int, temperature: float = 1.0, vocab_limit: int | None = None
):
    """Logprob of targets[b, t] under softmax(hidden[b, t] @ lm_head / temperature), and the entropy.
    With vocab_limit, only the first vocab_limit logits (the tokenizer's ids) take part.

    hidden [B, T, D] (any float dtype; the matmul accumulates in float32), lm_head [D, V],
    targets [B, T] int (hidden at position t predicts targets[b, t]). The sequence is cut into
    chunks of chunk_size positions; only one chunk's [B, chunk_size, V] logits exist at a time,
    forward and backward. The batch axis is left alone, so a batch-sharded input stays sharded.
    """
    if hidden.ndim != 3 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[0]:
        raise ValueError(f"need hidden [B, T, D] and lm_head [D, V], got {hidden.shape} and {lm_head.shape}.")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must be [B, T] = {hidden.shape[:2]}, got {targets.shape}.")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    b, t, d = hidden.shape
    chunk = min(chunk_size, t)
    num_chunks = math.ceil(t / chunk)
    pad = num_chunks * chunk - t
    targets = targets.astype(jnp.int32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [num_chunks, B, chunk, ...]: scan over chunks, batch axis untouched.
    hidden_chunks = hidden.reshape(b, num_chunks, chunk, d).swapaxes(0, 1)
    target_chunks = targets.reshape(b, num_chunks, chunk).swapaxes(0, 1)
    inv_temperature = jnp.asarray(1.0 / temperature, jnp.float32)

    def body(xs):
        return _chunk_logprobs_and_entropy(xs[0], lm_head, xs[1], inv_temperature, vocab_limit)

    logp, entropy = jax.lax.map(body, (hidden_chunks, target_chunks))
    logp = logp.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :t]
    entropy = entropy.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :t]
    return logp, entropy


# ----------------------------------------------------------------------------- loss


def normalizers(mask: jax.Array) -> dict[str, jax.Array]:
    """The counts every aggregation divides by, from a whole mini-batch's [B, T] loss mask:
    loss tokens, rows with at least one loss token, and rows."""
    mask = mask.astype(jnp.float32)
    return {
        "tokens": mask.sum(),
        "seqs": (mask.sum(axis=-1) > 0).sum().astype(jnp.float32),
        "rows": jnp.asarray(mask.shape[0], jnp.float32),
        "width": jnp.asarray(mask.shape[1], jnp.float32),
    }


def aggregate(values: jax.Array, mask: jax.Array, agg: str, seq_sum_norm_len: int | None = None,
              norm: dict[str, jax.Array] | None = None) -> jax.Array:
    """Reduce a [B, T] per-token loss to a scalar; see the module docstring.

    norm: the mini-batch's `normalizers` when `values` is one micro-batch of it; None: these rows'."""
    mask = mask.astype(jnp.float32)
    masked = jnp.where(mask > 0, values, 0.0) * mask
    norm = normalizers(mask) if norm is None else norm
    if agg == "token-mean":
        return masked.sum() / jnp.maximum(norm["tokens"], 1.0)
    if agg == "seq-mean-token-mean":
        tokens = mask.sum(axis=-1)
        seq_means = masked.sum(axis=-1) / jnp.maximum(tokens, 1.0)
        return jnp.where(tokens > 0, seq_means, 0.0).sum() / jnp.maximum(norm["seqs"], 1.0)
    if agg == "seq-sum":
        # L: the configured length, else the mini-batch's padded width (a micro-batch may be narrower).
        width = values.shape[-1] if norm is None or "width" not in norm else norm["width"]
        length = width if seq_sum_norm_len is None else seq_sum_norm_len
        return masked.sum() / (norm["rows"] * length)
    raise ValueError(f"aggregation {agg!r} is not one of {AGGREGATIONS}.")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kl_type: str) -> jax.Array:
    """Per-token KL estimate of the policy against the reference."""
    diff = ref_logp - logp
    if kl_type == "low_var_kl":
        diff = jnp.clip(diff, -20.0, 20.0)
        return jnp.clip(jnp.exp(diff) - diff - 1.0, -10.0, 10.0)
    if kl_type == "k1":
        return -diff
    if kl_type == "abs":
        return jnp.abs(diff)
    if kl_type == "mse":
        return 0.5 * diff * diff
    raise ValueError(f"kl_type {kl_type!r} is not one of {KL_TYPES}.")


def policy_loss(logp, old_logp, ref_logp, advantages, mask, entropy, cfg: ml_collections.ConfigDict,
                norm: dict[str, jax.Array] | None = None):
    """Scalar loss and metrics from [B, T] per-token arrays; cfg (Python values) is read at trace time.

    ref_logp may be None when kl_coef is 0, entropy None when entropy_coef is 0. With `norm` (the
    mini-batch's `normalizers`), the loss and every metric but actor/ratio_max are this
    micro-batch's share: they add up over the micro-batches to the mini-batch's values.
    """
    validate_config(cfg)
    shape = logp.shape
    for name, x in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if x.shape != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {x.shape}.")
    use_kl = cfg.kl_coef != 0.0
    use_entropy = cfg.entropy_coef != 0.0
    if use_kl and (ref_logp is None or ref_logp.shape != shape):
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logp of shape {shape}; pass it or set kl_coef=0.")
    if use_entropy and (entropy is None or entropy.shape != shape):
        raise ValueError(
            f"entropy_coef={cfg.entropy_coef} needs entropy of shape {shape}; pass it or set entropy_coef=0."
        )

    logp = logp.astype(jnp.float32)
    old_logp = old_logp.astype(jnp.float32)
    advantages = advantages.astype(jnp.float32)
    mask_f = mask.astype(jnp.float32)
    on = mask_f > 0
    agg = lambda x: aggregate(x, mask_f, cfg.agg, cfg.seq_sum_norm_len, norm)  # noqa: E731
    token_mean = lambda x: aggregate(x, mask_f, "token-mean", norm=norm)  # noqa: E731

    log_ratio = jnp.clip(logp - old_logp, -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    pg = jnp.maximum(unclipped, clipped)
    metrics = {"actor/pg_clipfrac": token_mean((clipped > unclipped).astype(jnp.float32))}
    if cfg.dual_clip_c is not None:
        lower = -advantages * cfg.dual_clip_c
        metrics["actor/pg_clipfrac_lower"] = token_mean(((pg > lower) & (advantages < 0)).astype(jnp.float32))
        pg = jnp.where(advantages < 0, jnp.minimum(pg, lower), pg)
    pg_loss = agg(pg)
    loss = pg_loss

    if use_kl:
        kl_loss = agg(kl_penalty(logp, ref_logp.astype(jnp.float32), cfg.kl_type))
        loss = loss + cfg.kl_coef * kl_loss
        metrics["actor/kl_loss"] = kl_loss
    if entropy is not None:
        entropy = entropy.astype(jnp.float32)
        metrics["actor/entropy"] = token_mean(entropy)
        if use_entropy:
            loss = loss - cfg.entropy_coef * agg(entropy)

    metrics.update(
        {
            "actor/pg_loss": pg_loss,
            "actor/approx_kl": token_mean(-log_ratio),
            "actor/ratio_mean": token_mean(ratio),
            "actor/ratio_max": jnp.max(jnp.where(on, ratio, 0.0)),
            "actor/loss": loss,
        }
    )
    return loss, metrics
