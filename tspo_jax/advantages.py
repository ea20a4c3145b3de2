"""Advantage estimators over padded episode batches: jitted, static shapes, no loop over groups.

Groups (the n rollouts of one prompt) and turns are segment ids over padded arrays. Every
estimator maps `AdvantageInputs` to per-turn advantages [B, K]; `compute_advantages` spreads
them over the tokens by turn id and masks them with the loss mask. Estimators are chosen by
name from a registry, so a user can add one:

    @register_advantage("my_estimator")
    def my_estimator(inp: AdvantageInputs) -> jax.Array:  # [B, K]
        ...

Built in (TSPO.md defines grpo / tspo / tspo_turn; the rest are standard baselines):
  grpo       (r - mean_g) / (std_g + eps), std unbiased (torch.std), as Search-R1 / verl.
  dr_grpo    r - mean_g (Dr.GRPO: no division by the std).
  rloo       r - mean of the other members of the group = n / (n - 1) * (r - mean_g).
  tspo_turn  (G_k - mean) / (std + eps), mean and std pooled over the valid turns of the group.
  tspo       by group composition: mixed -> grpo; all wrong -> tspo_turn; all right -> 0.

Conventions, the same for every estimator:
* A group with one member keeps its raw value: mean 0, std 1, as verl does (so grpo gives
  r / (1 + eps), rloo and dr_grpo give r). The pooled turn statistics of tspo/tspo_turn follow
  the same rule when a group has a single valid turn.
* Group means are computed as min + mean(x - min), so a group whose values are all equal gets
  exactly 0 (a plain float32 mean of five 0.8s is off by an ulp, which (x - mean)/(0 + 1e-6)
  would blow up to ~0.1); otherwise it equals verl's value to float32 rounding.
* Rows whose group id is outside [0, num_groups) are padding: excluded from every statistic,
  advantage 0. Rows with an all-zero loss mask still count in their group's statistics.
* Correctness (for tspo's group composition and the metrics) is `correct` when given (pass
  RewardBatch.em), else outcome > 0.5, which separates right from wrong for binary EM and for
  Search-R1's v0.3 format values (right >= 0.8, wrong <= 0.3).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

CORRECT_THRESHOLD = 0.5


class AdvantageInputs(NamedTuple):
    """What an estimator sees. Segment ids run over [0, num_groups]; the last one collects padding."""

    outcome: jax.Array  # [B] float32
    turn_returns: jax.Array  # [B, K] float32
    turn_valid: jax.Array  # [B, K] bool, already False on padding rows
    first_occurrence: jax.Array  # [B] int32
    segment_ids: jax.Array  # [B] int32, group id, or num_groups for a padding row
    row_valid: jax.Array  # [B] bool
    correct: jax.Array  # [B] bool
    num_groups: int
    eps: jax.Array  # scalar float32


AdvantageFn = Callable[[AdvantageInputs], jax.Array]
_REGISTRY: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator adding an estimator `fn(AdvantageInputs) -> [B, K]` under `name`."""

    def add(fn: AdvantageFn) -> AdvantageFn:
        if name in _REGISTRY:
            raise ValueError(f"an advantage estimator named {name!r} is already registered.")
        _REGISTRY[name] = fn
        return fn

    return add


def available_advantages() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_advantage_fn(name: str) -> AdvantageFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown advantage estimator {name!r}; valid names: {available_advantages()}.")
    return _REGISTRY[name]


def default_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.name = "tspo"  # one of available_advantages()
    cfg.eps = 1e-6  # added to the std, as Search-R1 / verl
    return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    get_advantage_fn(cfg.name)
    if not cfg.eps > 0:
        raise ValueError(f"advantages.eps={cfg.eps} must be > 0 (1e-6 by default).")


# ----------------------------------------------------------------------------- group statistics
# Groups are reduced through a [B, G + 1] membership mask with where + sum/min/max (exact float32,
# no matmul whose precision depends on the backend). That is O(B * G), trivial for a 2,560-row
# batch, compiles far faster than scatters, and has no sharding ambiguity.


def _membership(segment_ids: jax.Array, num_groups: int) -> jax.Array:
    return segment_ids[:, None] == jnp.arange(num_groups + 1, dtype=segment_ids.dtype)[None, :]


def _group_sum(member: jax.Array, per_row: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(member, per_row[:, None], 0), axis=0)


_BIG = float(jnp.finfo(jnp.float32).max)


class Moments(NamedTuple):
    count: jax.Array  # [G + 1]
    mean: jax.Array
    std: jax.Array  # unbiased; 0 for groups with fewer than two items
    lo: jax.Array  # min (+max float for an empty group)
    hi: jax.Array  # max (-max float for an empty group)


def segment_moments(
    values: jax.Array, weights: jax.Array, segment_ids: jax.Array, num_groups: int
) -> Moments:
    """Count, mean, unbiased std, min and max per group of the weighted items.

    values, weights: [B] (one item per row) or [B, M] (M items per row, e.g. turns, pooled
    with the row's group); segment_ids: [B] in [0, num_groups], the last id collecting padding.
    """
    if values.ndim == 1:
        values, weights = values[:, None], weights[:, None]
    w = weights.astype(bool)
    values = values.astype(jnp.float32)
    member = _membership(segment_ids, num_groups)
    count = _group_sum(member, w.sum(axis=1).astype(jnp.float32))
    row_lo = jnp.where(w, values, _BIG).min(axis=1)
    row_hi = jnp.where(w, values, -_BIG).max(axis=1)
    lo = jnp.where(member, row_lo[:, None], _BIG).min(axis=0)
    hi = jnp.where(member, row_hi[:, None], -_BIG).max(axis=0)
    shift = jnp.where(count > 0, lo, 0.0)
    centered = jnp.where(w, values - shift[segment_ids][:, None], 0.0).sum(axis=1)
    mean = shift + _group_sum(member, centered) / jnp.maximum(count, 1.0)
    dev = jnp.where(w, values - mean[segment_ids][:, None], 0.0)
    var = _group_sum(member, (dev * dev).sum(axis=1)) / jnp.maximum(count - 1.0, 1.0)
    return Moments(count, mean, jnp.sqrt(var), lo, hi)


def group_normalize(values, weights, segment_ids, num_groups, eps, scale: bool = True) -> jax.Array:
    """(x - mean_g) / (std_g + eps) (or x - mean_g) with verl's one-item rule; 0 where not weighted.

    values, weights: [B] or [B, M], as in segment_moments.
    """
    m = segment_moments(values, weights, segment_ids, num_groups)
    single = m.count == 1
    expand = (lambda x: x[:, None]) if values.ndim == 2 else (lambda x: x)  # noqa: E731
    mean = expand(jnp.where(single, 0.0, m.mean)[segment_ids])
    adv = values - mean
    if scale:
        adv = adv / (expand(jnp.where(single, 1.0, m.std)[segment_ids]) + eps)
    return jnp.where(weights, adv, 0.0)


def _per_turn(traj_adv: jax.Array, k: int) -> jax.Array:
    return jnp.broadcast_to(traj_adv[:, None], (traj_adv.shape[0], k))


def _pooled_turn_advantage(inp: AdvantageInputs) -> jax.Array:
    return group_normalize(inp.turn_returns, inp.turn_valid, inp.segment_ids, inp.num_groups, inp.eps)


def group_composition(inp: AdvantageInputs):
    """(all_right, all_wrong, mixed) per group id in [0, num_groups] from its members' correctness."""
    member = _membership(inp.segment_ids, inp.num_groups)
    count = _group_sum(member, inp.row_valid.astype(jnp.int32))
    right = _group_sum(member, (inp.correct & inp.row_valid).astype(jnp.int32))
    all_right = (right == count) & (count > 0)
    all_wrong = (right == 0) & (count > 0)
    mixed = ~all_right & ~all_wrong & (count > 0)
    return all_right, all_wrong, mixed


# ----------------------------------------------------------------------------- estimators


@register_advantage("grpo")
def grpo(inp: AdvantageInputs) -> jax.Array:
    adv = group_normalize(inp.outcome, inp.row_valid, inp.segment_ids, inp.num_groups, inp.eps)
    return _per_turn(adv, inp.turn_returns.shape[1])


@register_advantage("dr_grpo")
def dr_grpo(inp: AdvantageInputs) -> jax.Array:
    adv = group_normalize(inp.outcome, inp.row_valid, inp.segment_ids, inp.num_groups, inp.eps, scale=False)
    return _per_turn(adv, inp.turn_returns.shape[1])


@register_advantage("rloo")
def rloo(inp: AdvantageInputs) -> jax.Array:
    m = segment_moments(inp.outcome, inp.row_valid, inp.segment_ids, inp.num_groups)
    n = m.count[inp.segment_ids]
    loo = n / jnp.maximum(n - 1.0, 1.0) * (inp.outcome - m.mean[inp.segment_ids])
    adv = jnp.where(inp.row_valid, jnp.where(n > 1, loo, inp.outcome), 0.0)
    return _per_turn(adv, inp.turn_returns.shape[1])


@register_advantage("tspo_turn")
def tspo_turn(inp: AdvantageInputs) -> jax.Array:
    return _pooled_turn_advantage(inp)


@register_advantage("tspo")
def tspo(inp: AdvantageInputs) -> jax.Array:
    _, all_wrong, mixed = group_composition(inp)
    trajectory = grpo(inp)
    turn = _pooled_turn_advantage(inp)
    mixed_row = mixed[inp.segment_ids][:, None]
    wrong_row = all_wrong[inp.segment_ids][:, None]
    return jnp.where(mixed_row, trajectory, jnp.where(wrong_row, turn, 0.0))


# ----------------------------------------------------------------------------- entry point


def _replicated(x: jax.Array) -> jax.Array:
    # Under a mesh with Explicit axes, reducing a batch-sharded [B, G] membership mask over B
    # has no unambiguous output sharding; replicate first. Auto meshes leave it to the partitioner.
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def _check_shapes(outcome, turn_returns, turn_valid, first_occurrence, group_ids, turn_ids, loss_mask):
    if outcome.ndim != 1:
        raise ValueError(f"outcome must be [B], got shape {outcome.shape}.")
    b = outcome.shape[0]
    expected = {
        "turn_returns": (turn_returns, 2),
        "turn_valid": (turn_valid, 2),
        "first_occurrence": (first_occurrence, 1),
        "group_ids": (group_ids, 1),
        "turn_ids": (turn_ids, 2),
        "loss_mask": (loss_mask, 2),
    }
    for name, (x, ndim) in expected.items():
        if x.ndim != ndim or x.shape[0] != b:
            raise ValueError(
                f"{name} must have {ndim} dims and B={b} rows like outcome, got shape {x.shape}."
            )
    if turn_valid.shape != turn_returns.shape:
        raise ValueError(
            f"turn_valid {turn_valid.shape} and turn_returns {turn_returns.shape} must match ([B, K])."
        )
    if turn_ids.shape != loss_mask.shape:
        raise ValueError(f"turn_ids {turn_ids.shape} and loss_mask {loss_mask.shape} must match ([B, T]).")


@functools.partial(jax.jit, static_argnames=("name", "num_groups"))
def compute_advantages(
    name: str,
    outcome,
    turn_returns,
    turn_valid,
    first_occurrence,
    group_ids,
    turn_ids,
    loss_mask,
    *,
    num_groups: int,
    eps=1e-6,
    correct=None,
):
    """Per-token advantages [B, T] float32 (0 off the loss mask) and a dict of scalar metrics.

    name and num_groups are static. turn_ids[b, t] is the 0-based turn of token t (-1 for
    prompt and padding); a policy token of turn k gets the estimator's A[b, k]. Pass
    correct=RewardBatch.em (see the module docstring for the fallback).

    Metrics (float32 scalars; group fractions are over non-empty groups):
      adv/homogenized_group_frac   groups whose token advantages are all 0
      adv/reward_std_mean          mean within-group unbiased std of the outcome (0 for size 1)
      adv/{all_wrong,all_right,mixed}_group_frac
      adv/folr_rescued_frac        all-wrong groups whose turn returns differ (FOLR gives signal)
      adv/folr_hit_frac, adv/k_star_mean   rows with a k*, and their mean 0-based k*
      adv/token_adv_mean, adv/token_adv_abs_max   over policy tokens
      adv/policy_tokens_without_turn   loss-mask tokens with no valid turn id (should be 0)
      adv/padding_rows             rows outside [0, num_groups)
    """
    fn = get_advantage_fn(name)
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int (the number of prompts), got {num_groups!r}.")
    outcome, turn_returns = jnp.asarray(outcome, jnp.float32), jnp.asarray(turn_returns, jnp.float32)
    turn_valid, first_occurrence = jnp.asarray(turn_valid, bool), jnp.asarray(first_occurrence, jnp.int32)
    group_ids, turn_ids = jnp.asarray(group_ids, jnp.int32), jnp.asarray(turn_ids, jnp.int32)
    loss_mask = jnp.asarray(loss_mask)
    _check_shapes(outcome, turn_returns, turn_valid, first_occurrence, group_ids, turn_ids, loss_mask)
    if correct is None:
        correct = outcome > CORRECT_THRESHOLD
    correct = jnp.asarray(correct, bool)
    if correct.shape != outcome.shape:
        raise ValueError(f"correct must be [B] like outcome, got shape {correct.shape}.")

    # Per-row arrays are tiny: group statistics run on a replicated copy; token arrays stay sharded.
    outcome, turn_returns, turn_valid, first_occurrence, group_ids, correct = map(
        _replicated, (outcome, turn_returns, turn_valid, first_occurrence, group_ids, correct)
    )
    row_valid = (group_ids >= 0) & (group_ids < num_groups)
    inp = AdvantageInputs(
        outcome=outcome,
        turn_returns=turn_returns,
        turn_valid=turn_valid & row_valid[:, None],
        first_occurrence=first_occurrence,
        segment_ids=jnp.where(row_valid, group_ids, num_groups),
        row_valid=row_valid,
        correct=correct,
        num_groups=num_groups,
        eps=jnp.asarray(eps, jnp.float32),
    )
    turn_adv = fn(inp).astype(jnp.float32)
    if turn_adv.shape != turn_returns.shape:
        raise ValueError(
            f"estimator {name!r} returned shape {turn_adv.shape}, expected [B, K] = {turn_returns.shape}."
        )

    k = turn_returns.shape[1]
    policy = (loss_mask > 0) & row_valid[:, None]
    has_turn = (turn_ids >= 0) & (turn_ids < k)
    gathered = jnp.take_along_axis(turn_adv, jnp.clip(turn_ids, 0, k - 1), axis=1)
    token_adv = jnp.where(policy & has_turn, gathered, 0.0)
    metrics = _metrics(inp, token_adv, policy, has_turn)
    return token_adv, metrics


def _metrics(inp: AdvantageInputs, token_adv, policy, has_turn) -> dict[str, jax.Array]:
    g = inp.num_groups
    segs = inp.segment_ids
    reward = segment_moments(inp.outcome, inp.row_valid, segs, g)
    present = (reward.count > 0).at[g].set(False)
    num_present = jnp.maximum(present.sum(), 1)

    row_absmax = _replicated(jnp.max(jnp.abs(token_adv), axis=1))
    group_absmax = jnp.where(_membership(segs, g), row_absmax[:, None], -1.0).max(axis=0)
    homogenized = present & (group_absmax == 0.0)

    all_right, all_wrong, mixed = group_composition(inp)
    returns = segment_moments(inp.turn_returns, inp.turn_valid, segs, g)
    rescued = all_wrong & (returns.hi > returns.lo)

    hit = inp.row_valid & (inp.first_occurrence >= 0)
    num_rows = jnp.maximum(inp.row_valid.sum(), 1)
    num_policy = jnp.maximum(policy.sum(), 1)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return {
        "adv/homogenized_group_frac": f32(homogenized.sum() / num_present),
        "adv/reward_std_mean": f32(jnp.where(present, reward.std, 0.0).sum() / num_present),
        "adv/all_wrong_group_frac": f32(all_wrong.sum() / num_present),
        "adv/all_right_group_frac": f32(all_right.sum() / num_present),
        "adv/mixed_group_frac": f32(mixed.sum() / num_present),
        "adv/folr_rescued_frac": f32(rescued.sum() / jnp.maximum(all_wrong.sum(), 1)),
        "adv/folr_hit_frac": f32(hit.sum() / num_rows),
        "adv/k_star_mean": f32(jnp.where(hit, inp.first_occurrence, 0).sum() / jnp.maximum(hit.sum(), 1)),
        "adv/token_adv_mean": f32(jnp.where(policy, token_adv, 0.0).sum() / num_policy),
        "adv/token_adv_abs_max": f32(jnp.max(jnp.abs(token_adv))),
        "adv/policy_tokens_without_turn": f32((policy & ~has_turn).sum()),
        "adv/padding_rows": f32((~inp.row_valid).sum()),
    }


def reward_by_source(outcome, sources: Sequence[str]) -> dict[str, float]:
    """Mean outcome per data source (host side), e.g. {'nq': 0.41, 'hotpotqa': 0.27}."""
    outcome = np.asarray(outcome, np.float64)
    if outcome.ndim != 1 or len(sources) != outcome.shape[0]:
        raise ValueError(
            f"reward_by_source needs one source per outcome: {outcome.shape} outcomes, "
            f"{len(sources)} sources."
        )
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for value, source in zip(outcome, sources):
        sums[source] = sums.get(source, 0.0) + float(value)
        counts[source] = counts.get(source, 0) + 1
    return {source: sums[source] / counts[source] for source in sums}
