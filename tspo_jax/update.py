"""Episodes -> padded training arrays -> the jitted, sharded policy-gradient update.

`pack_episodes` turns rollout episodes into right-padded [B, T] arrays without touching the
token ids. `PolicyUpdater` owns the optimizer and three compiled functions: the per-token
logprobs of a batch (for the reference policy and, if asked, recomputed old logprobs), the
update of one mini-batch (gradients of length-bucketed micro-batches summed on the device, then
one Optax step), and a supervised step for warm starts. Parameters stay sharded over
(fsdp, tensor) and batches over (data, fsdp); params and optimizer state are donated.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tspo_jax import losses
from tspo_jax import sharding as shd

# Packed widths are multiples of this many tokens: few compiled update shapes (9 up to Search-R1's
# 4,608-token context), at most PACK_BLOCK - 1 padding columns. Powers of two would pad a
# 4,100-token step to 8,192.
PACK_BLOCK = 512


def pack_width(longest: int, block: int = PACK_BLOCK) -> int:
    """The packed width for a batch whose longest episode has `longest` tokens."""
    if longest < 1 or block < 1:
        raise ValueError(f"need longest >= 1 and block >= 1, got {longest} and {block}")
    return -(-longest // block) * block


def pack_episodes(episodes: Sequence, width: int | None = None, rows: int | None = None) -> dict[str, np.ndarray]:
    """tokens, valid, loss_mask, turn_ids, old_logp as [rows, width] arrays, right-padded.

    Rows past len(episodes) are padding (valid all False) so the batch divides the mesh."""
    n = len(episodes)
    rows = rows or n
    width = width or pack_width(max(len(e.tokens) for e in episodes))
    out = {
        "tokens": np.zeros((rows, width), np.int32),
        "valid": np.zeros((rows, width), bool),
        "loss_mask": np.zeros((rows, width), np.float32),
        "turn_ids": np.full((rows, width), -1, np.int32),
        "old_logp": np.zeros((rows, width), np.float32),
    }
    for i, e in enumerate(episodes):
        k = len(e.tokens)
        if k > width:
            raise ValueError(f"episode {i} has {k} tokens, more than the packing width {width}")
        out["tokens"][i, :k] = e.tokens
        out["valid"][i, :k] = True
        out["loss_mask"][i, :k] = e.loss_mask
        out["turn_ids"][i, :k] = e.turn_ids
        out["old_logp"][i, :k] = e.logprobs
    return out


SCHEDULES = ("constant", "cosine")


def validate_optim(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the bad optim knob."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={cfg.schedule!r}: choose constant or cosine")
    if not cfg.lr > 0:
        raise ValueError(f"optim.lr={cfg.lr} must be > 0")


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after clipping by global norm, and its schedule (warm-up, then constant or cosine).

    The schedule is indexed by *training step*, not by optimizer update: Search-R1 (verl) steps its
    LR scheduler once per training step, so every mini-batch update of one step uses one rate.
    The rate is therefore a hyperparameter in the optimizer state (optax.inject_hyperparams) that
    the caller sets on each update: `PolicyUpdater.update(..., lr=schedule(k))` for the k-th
    training step counted from 0 (verl's first step runs at schedule(0), 0 during warm-up). It
    starts at the peak `cfg.lr` for callers that never set it."""
    validate_optim(cfg)
    # int(), not round(): verl computes int(lr_warmup_steps_ratio * total_steps).
    warmup = int(cfg.warmup_ratio * total_steps) if cfg.get("warmup_steps") is None else cfg.warmup_steps
    if cfg.schedule == "constant":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)], [warmup]
        )
    elif cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 1), max(total_steps, warmup + 1))
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        # Only the rate is a state hyperparameter, kept in float32: injected b1/b2 would take the
        # parameters' dtype, and b2 = 0.999 is 1.0 in bf16.
        optax.inject_hyperparams(
            lambda learning_rate: optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
            hyperparam_dtype=jnp.float32,
        )(learning_rate=cfg.lr),
    )
    return tx, schedule


def _has_learning_rate(opt_state) -> bool:
    return optax.tree_utils.tree_get(opt_state, "learning_rate") is not None


def _shift(x):
    """Targets for next-token prediction: position t's hidden state predicts token t+1."""
    return x[:, 1:]


def host_normalizers(loss_mask: np.ndarray) -> dict[str, np.ndarray]:
    """losses.normalizers of a whole mini-batch's [B, T] loss mask, on the host (micro-batches are
    cut to their own widths, so none of them sees the mini-batch's counts or width)."""
    mask = np.asarray(loss_mask, np.float32)[:, 1:]
    return {"tokens": np.float32(mask.sum()), "seqs": np.float32((mask.sum(axis=-1) > 0).sum()),
            "rows": np.float32(mask.shape[0]), "width": np.float32(mask.shape[1])}


@dataclasses.dataclass
class PolicyUpdater:
    graphdef: nnx.GraphDef
    loss_cfg: ml_collections.ConfigDict
    tx: optax.GradientTransformation
    mesh: Mesh
    temperature: float = 1.0
    micro_batch: int = 8
    tokenizer_vocab: int | None = None  # ids past it (embedding padding) get no probability
    # Rows per forward slice of `logprobs` (reference / old logprobs of the whole step's rows);
    # None: micro_batch. Memory only: the result is the same for any value.
    logprob_micro_batch: int | None = None
    # Slices of rows are padded to their own longest row, rounded up to this (few compiled widths).
    pack_block: int = PACK_BLOCK

    def __post_init__(self):
        self.loss_cfg = ml_collections.ConfigDict(self.loss_cfg.to_dict())  # frozen copy for tracing
        self._logprobs = jax.jit(self._logprobs_impl)
        self._zeros = jax.jit(self._zeros_impl)
        self._accumulate = jax.jit(self._accumulate_impl, donate_argnums=(1,))
        # Params and Adam state are updated in place. The summed gradients are not donated: no
        # output has their shape left to alias them (JAX warned of unusable donations); `update`
        # drops them as soon as the step is applied.
        self._apply = jax.jit(self._apply_impl, donate_argnums=(0, 1))
        self._sft = jax.jit(self._sft_impl, donate_argnums=(0, 1))
        # The compiled functions by name, for ahead-of-time lowering (python -m tspo_jax.plan).
        self.jitted = {"logprobs": self._logprobs, "accumulate": self._accumulate, "apply": self._apply,
                       "sft": self._sft}

    # --- model pieces ---------------------------------------------------------------------------
    def _token_logprobs(self, params, tokens, valid):
        model = nnx.merge(self.graphdef, params)
        with shd.activation_mesh(self.mesh):
            hidden, _ = model(tokens, valid=valid, return_hidden=True)
        logp, entropy = losses.token_logprobs_and_entropy(
            hidden[:, :-1], model.lm_head_kernel(), _shift(tokens),
            chunk_size=self.loss_cfg.logprob_chunk, temperature=self.temperature,
            vocab_limit=self.tokenizer_vocab)
        return logp, entropy

    def _logprobs_impl(self, params, tokens, valid):
        return self._token_logprobs(params, tokens, valid)[0]

    # --- RL update --------------------------------------------------------------------------------
    @staticmethod
    def _zeros_impl(params):
        return {"grads": jax.tree.map(jnp.zeros_like, params), "loss": jnp.zeros((), jnp.float32)}

    def _accumulate_impl(self, params, acc, batch, norm):
        """acc plus one micro-batch's gradient of its share of the mini-batch loss. Every
        aggregation divides by the whole mini-batch's counts (`norm`, verl's agg_loss with global
        token counts), so the summed gradients are the mini-batch's for any split into micro-batches."""
        cfg = self.loss_cfg

        def micro_loss(p):
            logp, entropy = self._token_logprobs(p, batch["tokens"], batch["valid"])
            ref = _shift(batch["ref_logp"]) if cfg.kl_coef != 0.0 else None
            return losses.policy_loss(
                logp, _shift(batch["old_logp"]), ref, _shift(batch["advantages"]), _shift(batch["loss_mask"]),
                entropy, cfg, norm=norm)

        (loss, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(params)
        return {"grads": jax.tree.map(jnp.add, acc["grads"], grads), "loss": acc["loss"] + loss}, metrics

    def _apply_impl(self, params, opt_state, acc, lr):
        grads = acc["grads"]
        metrics = {"actor/grad_norm": optax.global_norm(grads)}
        if lr is not None:
            metrics["actor/lr"] = lr
        # A non-finite loss or gradient is never applied: the update is skipped (params and Adam
        # moments stay as they were) and counted; the trainer stops after max_nonfinite_steps.
        finite = jnp.isfinite(acc["loss"]) & jnp.isfinite(metrics["actor/grad_norm"])

        def step(state):
            p, o = state
            if lr is not None:
                o = optax.tree_utils.tree_set(o, learning_rate=lr)
            updates, o = self.tx.update(grads, o, p)
            return optax.apply_updates(p, updates), o

        # A cond, not jnp.where(finite, new, old) per leaf: where keeps the new and the old state
        # alive at once (5.5 GiB of temporaries for 0.5B in fp32 on CPU, 0.5 GiB with the cond).
        params, opt_state = jax.lax.cond(finite, step, lambda state: state, (params, opt_state))
        metrics["actor/nonfinite_skips"] = 1.0 - finite.astype(jnp.float32)
        return params, opt_state, metrics

    # --- supervised warm start ------------------------------------------------------------------
    def _sft_impl(self, params, opt_state, batch, lr):
        def loss_fn(p):
            logp, _ = self._token_logprobs(p, batch["tokens"], batch["valid"])
            mask = _shift(batch["loss_mask"])
            return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        if lr is not None:
            opt_state = optax.tree_utils.tree_set(opt_state, learning_rate=lr)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"sft/loss": loss, "sft/grad_norm": optax.global_norm(grads)}

    # --- public API -------------------------------------------------------------------------------
    def shard(self, batch: dict[str, np.ndarray]):
        return shd.shard_batch(batch, self.mesh)

    def slices(self, valid: np.ndarray, rows: int) -> list[tuple[np.ndarray, int]]:
        """The batch's rows as slices of `rows` rows (all of them if that does not divide the
        batch or split over the batch devices), longest first, each with its own width: its longest row rounded up to pack_block.
        Verl (use_remove_padding) saves the padding by packing episodes into rows; bucketing rows by
        length saves most of it and keeps one episode per row. [(row ids, width), ...]."""
        valid = np.asarray(valid, bool)
        b, t = valid.shape
        lengths = np.where(valid.any(axis=1), t - np.argmax(valid[:, ::-1], axis=1), 0)
        order = np.argsort(-lengths, kind="stable")
        # A slice must split evenly over the batch devices, and the slices must cover the batch.
        m = rows if rows and b % rows == 0 and rows % shd.batch_devices(self.mesh) == 0 else b
        return [(order[s : s + m], min(pack_width(max(int(lengths[order[s]]), 1), self.pack_block), t))
                for s in range(0, b, m)]

    def logprobs(self, params, batch) -> np.ndarray:
        """[B, T] logprob of each token given the ones before it (column 0 is 0), on the host. One
        forward per slice of logprob_micro_batch rows at the slice's own width (`slices`)."""
        host = shd.to_host({"tokens": batch["tokens"], "valid": batch["valid"]})
        out = np.zeros(host["tokens"].shape, np.float32)
        parts = []
        for rows, width in self.slices(host["valid"], self.logprob_micro_batch or self.micro_batch):
            dev = self.shard({k: v[rows, :width] for k, v in host.items()})
            parts.append((rows, width, self._logprobs(params, dev["tokens"], dev["valid"])))
        for rows, width, lp in parts:
            out[rows, 1:width] = shd.to_host(lp)
        return out

    def update(self, params, opt_state, batch, lr=None):
        """One optimizer update on a mini-batch ([B, T] host or device arrays): gradients of
        micro-batches of micro_batch rows, bucketed by length (`slices`), summed, then one Optax
        step. With `lr`, the optimizer (built by make_optimizer) applies that rate, and
        metrics["actor/lr"] reports it. Metrics come back as host scalars."""
        lr = self._lr_on_mesh(opt_state, lr)  # a bad optimizer fails here, before any work
        host = shd.to_host(dict(batch))
        replicated = NamedSharding(self.mesh, P())
        norm = {k: shd.put_global(v, replicated) for k, v in host_normalizers(host["loss_mask"]).items()}
        acc = self._zeros(params)
        micro = []
        for rows, width in self.slices(host["valid"], self.micro_batch):
            mb = self.shard({k: v[rows, :width] for k, v in host.items()})
            acc, m = self._accumulate(params, acc, mb, norm)
            micro.append(m)
        params, opt_state, m = self._apply(params, opt_state, acc, lr)
        del acc
        micro, m = jax.device_get((micro, m))
        # With mini-batch normalisers the micro-batch values add up to the mini-batch's.
        metrics = {k: np.max([x[k] for x in micro]) if k == "actor/ratio_max" else np.sum([x[k] for x in micro],
                                                                                          dtype=np.float32)
                   for k in micro[0]}
        metrics.update(m)
        return params, opt_state, metrics

    def _lr_on_mesh(self, opt_state, lr):
        if lr is None:
            return None
        if not _has_learning_rate(opt_state):
            raise ValueError("a learning rate per call needs an optimizer with an injected learning_rate "
                             "hyperparameter: build it with update.make_optimizer")
        return shd.put_global(np.float32(lr), NamedSharding(self.mesh, P()))

    def sft_step(self, params, opt_state, batch, lr=None):
        """One supervised step; `lr` as in `update` (the warm start's own schedule)."""
        return self._sft(params, opt_state, batch, self._lr_on_mesh(opt_state, lr))
