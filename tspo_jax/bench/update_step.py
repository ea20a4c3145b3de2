"""One policy-update step: our jitted PolicyUpdater vs the same loss and AdamW in plain PyTorch.

The fixed batch holds ragged, right-padded episodes: a prompt, then policy turns (trained on)
alternating with observations (masked out), turn-level advantages, and old / reference logprobs
set to the model's own logprobs plus noise so the PPO ratios sit near 1, as in training. Both
steps see the same batch and start from the same weights; their first loss and gradient norm are
compared to show they compute the same thing.
"""

from __future__ import annotations

import gc
import logging

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tspo_jax import losses
from tspo_jax import sharding as shd
from tspo_jax import update as update_lib
from tspo_jax.bench import costs, timing, torch_ppo

log = logging.getLogger(__name__)

LR = 1e-6  # Search-R1's


def synthetic_episodes(rows: int, width: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """tokens, valid, loss_mask, advantages (per turn) as [rows, width]; no logprobs yet."""
    rng = np.random.default_rng(seed)
    out = {
        "tokens": rng.integers(1, vocab, (rows, width)).astype(np.int32),
        "valid": np.zeros((rows, width), bool),
        "loss_mask": np.zeros((rows, width), np.float32),
        "advantages": np.zeros((rows, width), np.float32),
    }
    for i in range(rows):
        n = int(rng.integers(width // 2, width + 1))
        out["valid"][i, :n] = True
        pos = max(1, n // 8)  # the prompt
        while pos < n:
            turn = int(rng.integers(width // 32 + 1, width // 8 + 2))
            end = min(n, pos + turn)
            out["loss_mask"][i, pos:end] = 1.0
            out["advantages"][i, pos:end] = rng.standard_normal()
            pos = end + int(rng.integers(width // 16 + 1, width // 4 + 2))  # the observation
    out["tokens"][~out["valid"]] = 0
    return out


def optimizer_config(lr: float = LR) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=lr, schedule="constant", warmup_ratio=0.0, warmup_steps=0, weight_decay=0.01, b1=0.9, b2=0.999,
        grad_clip=1.0))


def make_updater(model, rows: int, lr: float = LR):
    mesh = shd.make_mesh((-1, 1, 1))
    if rows % mesh.size:
        raise ValueError(f"the update batch has {rows} rows; it must divide over the {mesh.size} devices")
    tx, _ = update_lib.make_optimizer(optimizer_config(lr), total_steps=1000)
    loss_cfg = losses.default_config()  # Search-R1: clip 0.2, low_var_kl 0.001, entropy 0.001, token-mean
    updater = update_lib.PolicyUpdater(nnx.graphdef(model), loss_cfg, tx, mesh, micro_batch=rows)
    return updater, tx


def with_logprobs(updater, params, batch: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """old_logp / ref_logp = the model's logprobs plus noise, 0 off the policy tokens."""
    lp = updater.logprobs(params, batch)
    rng = np.random.default_rng(seed + 1)
    mask = batch["loss_mask"]
    out = dict(batch)
    out["old_logp"] = ((lp + 0.05 * rng.standard_normal(lp.shape)) * mask).astype(np.float32)
    out["ref_logp"] = ((lp + 0.05 * rng.standard_normal(lp.shape)) * mask).astype(np.float32)
    return out


def fits_side_by_side(cfg, available_bytes: int | None) -> bool:
    """Whether both steps' training state (params, grads, two AdamW moments each, plus slack for
    activations) fits in memory at once; if not they are timed one after the other."""
    if available_bytes is None:
        return True
    per_side = 5 * cfg.num_params() * costs.dtype_bytes(cfg.param_dtype)
    return 2 * per_side < 0.8 * available_bytes


def measure(jmodel, tmodel, spec, *, reps: int, limits: costs.Limits, profile_dir: str | None = None,
            side_by_side: bool = True) -> dict:
    """Times both steps. The step consumes `jmodel`'s parameter buffers (donated: no second copy in
    memory), so the model is unusable afterwards. side_by_side=False times all of PyTorch's
    repetitions first, frees its optimizer state and gradients, then ours (for models whose two
    training states do not fit in memory together)."""
    cfg = jmodel.cfg
    updater, tx = make_updater(jmodel, spec.rows)
    # Replicated over the (data-only) mesh and spelled as the step returns them (P()), so the
    # step compiles once; placed any other way it compiles again on its second call.
    replicated = NamedSharding(updater.mesh, P())
    params = jax.device_put(nnx.state(jmodel, nnx.Param), replicated, donate=True)
    host = synthetic_episodes(spec.rows, spec.width, cfg.vocab_size)
    host = with_logprobs(updater, params, host)
    batch = {k: v for k, v in host.items() if k != "turn_ids"}  # the updater shards its micro-batches
    state = {"params": params, "opt_state": jax.device_put(tx.init(params), replicated)}
    first: dict = {}

    def ours():
        p, o, m = updater.update(state["params"], state["opt_state"], batch)
        jax.block_until_ready(p)
        state["params"], state["opt_state"] = p, o
        first.setdefault("ours", {k: float(m[k]) for k in ("actor/loss", "actor/grad_norm")})
        return {}

    step = torch_ppo.TorchPolicyStep(tmodel, lr=LR)
    tbatch = torch_ppo.to_torch(host, tmodel.device)

    def theirs():
        loss, norm = step(tbatch)
        if tmodel.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        first.setdefault("torch", {"actor/loss": loss, "actor/grad_norm": norm})
        return {}

    prof = compiles = None
    if side_by_side:
        samples = timing.interleaved({"ours": ours, "torch": theirs}, reps)
    else:
        samples = timing.interleaved({"ours": ours}, reps)
        if profile_dir:
            from tspo_jax.bench.profile import profile

            prof = profile(ours, f"{profile_dir}/update")
        compiles = _update_compiles(updater)
        state.clear()  # free our parameters, moments and gradients before PyTorch allocates its own
        params = None  # noqa: F841 - drop the last reference
        gc.collect()
        samples.update(timing.interleaved({"torch": theirs}, reps))
    lengths = host["valid"].sum(axis=1)
    tokens = int(lengths.sum())
    cost = costs.update_cost(cfg, lengths)
    limit = cost.seconds(limits)
    out = {
        "rows": spec.rows,
        "width": spec.width,
        "tokens": tokens,
        "policy_tokens": int(host["loss_mask"].sum()),
        "flops": cost.flops,
        "limit_s": limit,
        "first_step": first,
        "schedule": "interleaved" if side_by_side else "blocked (our repetitions, then PyTorch's: memory)",
        "loss_rel_diff": abs(first["ours"]["actor/loss"] - first["torch"]["actor/loss"])
        / max(abs(first["torch"]["actor/loss"]), 1e-12),
        "grad_norm_rel_diff": abs(first["ours"]["actor/grad_norm"] - first["torch"]["actor/grad_norm"])
        / max(first["torch"]["actor/grad_norm"], 1e-12),
    }
    for name, s in samples.items():
        med = s.median()
        out[name] = {
            **s.summary(),
            "tokens_per_s": tokens / med,
            "pct_of_limit": 100 * limit / med,
            "pct_of_matmul_rate": 100 * cost.flops / med / limits.matmul_flops,
        }
    out["ratio_vs_torch"] = out["ours"]["tokens_per_s"] / out["torch"]["tokens_per_s"]
    if side_by_side:
        compiles = _update_compiles(updater)
        if profile_dir:
            from tspo_jax.bench.profile import profile

            prof = profile(ours, f"{profile_dir}/update")
    out["ours"]["compiles"] = compiles
    if prof:
        out["ours_profile"] = prof
    return out


def _update_compiles(updater) -> int | None:
    """Executables of the update's two compiled functions (gradients of a micro-batch, the step)."""
    sizes = [_cache_size(updater.jitted[name]) for name in ("accumulate", "apply")]
    return None if None in sizes else sum(sizes)


def _cache_size(jitted) -> int | None:
    """How many executables a jitted function holds (a private JAX API: None if it moved)."""
    try:
        return int(jitted._cache_size())
    except Exception:  # noqa: BLE001
        return None
