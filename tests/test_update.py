"""The jitted policy update: packing, micro-batch gradient accumulation, sharding, the optimizer."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from tspo_jax import losses
from tspo_jax import sharding as shd
from tspo_jax import update as update_lib
from tspo_jax.model import qwen2


@dataclasses.dataclass
class Ep:
    tokens: list
    loss_mask: list
    turn_ids: list
    logprobs: list


def _episodes(rs, n=8, vocab=64):
    eps = []
    for _ in range(n):
        p, r = rs.randint(2, 6), rs.randint(3, 12)
        eps.append(
            Ep(
                tokens=rs.randint(0, vocab, p + r).tolist(),
                loss_mask=[0] * p + [1] * r,
                turn_ids=[-1] * p + [0] * r,
                logprobs=[0.0] * p + (-rs.rand(r)).tolist(),
            )
        )
    return eps


def test_pack_episodes_right_pads_without_touching_ids():
    rs = np.random.RandomState(0)
    eps = _episodes(rs, 3)
    packed = update_lib.pack_episodes(eps, width=16, rows=4)
    for i, e in enumerate(eps):
        n = len(e.tokens)
        assert packed["tokens"][i, :n].tolist() == e.tokens
        assert packed["valid"][i].sum() == n and packed["loss_mask"][i, :n].tolist() == e.loss_mask
        np.testing.assert_allclose(packed["old_logp"][i, :n], e.logprobs, rtol=1e-6)
    assert not packed["valid"][3].any()


def _setup(mesh_shape, micro):
    cfg = qwen2.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
    )
    model = qwen2.init_model(cfg, seed=1)
    mesh = shd.make_mesh(mesh_shape)
    shd.shard_model(model, mesh)
    loss_cfg = losses.default_config()
    loss_cfg.kl_coef = 0.0
    loss_cfg.entropy_coef = 0.0
    loss_cfg.logprob_chunk = 8
    tx = optax.sgd(1.0)
    upd = update_lib.PolicyUpdater(nnx.graphdef(model), loss_cfg, tx, mesh, micro_batch=micro)
    return model, upd, loss_cfg


def _batch(rs):
    packed = update_lib.pack_episodes(_episodes(rs, 8), width=16)
    packed["advantages"] = (rs.randn(*packed["tokens"].shape) * packed["loss_mask"]).astype(np.float32)
    packed["ref_logp"] = np.zeros_like(packed["old_logp"])
    return packed


def _reference_update(model, packed, loss_cfg, micro):
    """The same update by hand: the loss of the whole mini-batch at once (micro-batching is memory
    only: every aggregation divides by the mini-batch's counts), its gradient, SGD."""
    del micro
    params = nnx.state(model, nnx.Param)
    graphdef = nnx.graphdef(model)

    def loss(p):
        m = nnx.merge(graphdef, p)
        logits, _ = m(jnp.asarray(packed["tokens"]), valid=jnp.asarray(packed["valid"]))
        logp = losses.logprobs_from_logits(logits[:, :-1], jnp.asarray(packed["tokens"][:, 1:]))
        sl = lambda k: jnp.asarray(packed[k][:, 1:])  # noqa: E731
        return losses.policy_loss(
            logp, sl("old_logp"), None, sl("advantages"), sl("loss_mask"), None, loss_cfg
        )[0]

    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - g, params, grads)


def test_sharded_update_with_micro_batches_equals_the_reference():
    rs = np.random.RandomState(3)
    packed = _batch(rs)
    for mesh_shape, micro in (((8, 1, 1), 8), ((2, 2, 2), 4), ((1, 1, 1), 2)):
        devices = jax.devices()[: int(np.prod(mesh_shape))]
        if len(devices) < np.prod(mesh_shape):
            continue
        model, upd, loss_cfg = (
            _setup(mesh_shape, micro) if mesh_shape != (1, 1, 1) else _setup((-1, 1, 1), micro)
        )
        expect = _reference_update(model, packed, loss_cfg, micro)
        params = nnx.state(model, nnx.Param)
        opt_state = upd.tx.init(params)
        new, _, metrics = upd.update(
            params, opt_state, upd.shard({k: v for k, v in packed.items() if k != "turn_ids"})
        )
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expect)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
        assert np.isfinite(float(metrics["actor/grad_norm"])) and float(metrics["actor/grad_norm"]) > 0


def test_logprobs_match_a_plain_forward():
    rs = np.random.RandomState(4)
    model, upd, _ = _setup((8, 1, 1), 8)
    packed = _batch(rs)
    lp = np.asarray(upd.logprobs(nnx.state(model, nnx.Param), upd.shard(packed)))
    logits, _ = model(jnp.asarray(packed["tokens"]), valid=jnp.asarray(packed["valid"]))
    ref = np.asarray(losses.logprobs_from_logits(logits[:, :-1], jnp.asarray(packed["tokens"][:, 1:])))
    m = packed["valid"][:, 1:]
    np.testing.assert_allclose(lp[:, 1:][m], ref[m], atol=1e-5)
    assert (lp[:, 0] == 0).all()


def test_logprobs_in_row_slices_match_a_plain_forward_in_row_order():
    """The reference / old logprobs run in slices of logprob_micro_batch rows (every (B/m)-th row
    together): the result is the one forward's, rows in their original order."""
    rs = np.random.RandomState(5)
    model, upd, _ = _setup((2, 2, 2), 4)
    packed = _batch(rs)
    logits, _ = model(jnp.asarray(packed["tokens"]), valid=jnp.asarray(packed["valid"]))
    ref = np.asarray(losses.logprobs_from_logits(logits[:, :-1], jnp.asarray(packed["tokens"][:, 1:])))
    m = packed["valid"][:, 1:]
    for slice_rows in (4, 2):
        upd.logprob_micro_batch = slice_rows
        upd.__post_init__()  # a fresh trace for the new slice size
        lp = np.asarray(upd.logprobs(nnx.state(model, nnx.Param), upd.shard(packed)))
        np.testing.assert_allclose(lp[:, 1:][m], ref[m], atol=1e-5)


def test_pack_width_is_a_multiple_of_the_block_not_a_power_of_two():
    assert update_lib.pack_width(4100) == 4608 and update_lib.pack_width(4608) == 4608
    assert update_lib.pack_width(1) == 512 and update_lib.pack_width(65, block=64) == 128
    with pytest.raises(ValueError, match="longest"):
        update_lib.pack_width(0)


def test_optimizer_schedule_warms_up_then_holds():
    c = ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            schedule="constant",
            warmup_ratio=0.25,
            warmup_steps=None,
            weight_decay=0.01,
            b1=0.9,
            b2=0.999,
            grad_clip=1.0,
        )
    )
    _, sched = update_lib.make_optimizer(c, total_steps=20)
    assert (
        float(sched(0)) == 0.0 and abs(float(sched(5)) - 1e-3) < 1e-9 and abs(float(sched(19)) - 1e-3) < 1e-9
    )
    assert 0 < float(sched(2)) < 1e-3


def _ragged_batch(rs, rows=16):
    """Ragged rows of random tokens; two rows have no loss token at all (prompt only)."""
    eps = _episodes(rs, rows)
    for i in (3, rows - 6):
        eps[i].loss_mask = [0] * len(eps[i].loss_mask)
    packed = update_lib.pack_episodes(eps, width=24)
    packed["advantages"] = (rs.randn(*packed["tokens"].shape) * packed["loss_mask"]).astype(np.float32)
    packed["ref_logp"] = (packed["old_logp"] + 0.3 * rs.randn(*packed["old_logp"].shape)).astype(np.float32)
    packed["old_logp"] = (packed["old_logp"] + 0.2 * rs.randn(*packed["old_logp"].shape)).astype(np.float32)
    return {k: v for k, v in packed.items() if k != "turn_ids"}


@pytest.mark.parametrize("agg", losses.AGGREGATIONS)
def test_micro_batch_is_memory_only_for_every_aggregation(agg):
    """Finding 2: the update (params after one step) is the same for micro_batch m, m/2, m/4."""
    packed = _ragged_batch(np.random.RandomState(11))
    results = {}
    for micro in (16, 8, 4):
        model, upd, loss_cfg = _setup((2, 2, 2), micro)  # the batch split over 4 devices
        loss_cfg = ml_collections.ConfigDict(loss_cfg.to_dict())
        loss_cfg.agg, loss_cfg.kl_coef, loss_cfg.entropy_coef = agg, 0.01, 0.01
        # Blocks of 8: smaller micro-batches of the length-sorted rows are cut to widths 8, 16, 24.
        upd = dataclasses.replace(upd, loss_cfg=loss_cfg, pack_block=8)
        params = nnx.state(model, nnx.Param)
        before = [np.asarray(x) for x in jax.tree.leaves(params)]  # params are donated
        new, _, metrics = upd.update(params, upd.tx.init(params), upd.shard(packed))
        results[micro] = ([np.asarray(x) for x in jax.tree.leaves(new)], metrics)
    base, base_metrics = results[16]
    moved = max(np.abs(a - b).max() for a, b in zip(base, before))
    assert moved > 1e-4, (agg, moved)  # the update is not trivially zero
    for micro in (8, 4):  # params first, then the logged metrics (mini-batch values too)
        for a, b in zip(results[micro][0], base):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=f"{agg} micro_batch={micro}")
    for micro in (8, 4):
        for key in ("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/pg_clipfrac", "actor/ratio_max"):
            np.testing.assert_allclose(float(results[micro][1][key]), float(base_metrics[key]), rtol=1e-5,
                                       atol=1e-7, err_msg=f"{agg} {key} micro_batch={micro}")


def test_slices_sort_rows_by_length_and_cut_each_to_its_own_width():
    _, upd, _ = _setup((2, 2, 2), 4)
    upd = dataclasses.replace(upd, pack_block=8)
    lengths = np.array([3, 24, 0, 9, 17, 8, 1, 16])
    valid = np.arange(24)[None, :] < lengths[:, None]
    got = upd.slices(valid, 4)
    assert [w for _, w in got] == [24, 8]  # rows 24, 17, 16, 9 then 8, 3, 1, 0 (an empty row)
    assert [sorted(r.tolist()) for r, _ in got] == [[1, 3, 4, 7], [0, 2, 5, 6]]
    assert len(upd.slices(valid, 3)) == 1  # 3 does not divide 8 rows: one slice of all


def test_logprobs_by_length_slices_equal_one_full_width_forward():
    """Each row's logprobs do not depend on the slice it went in or the slice's width."""
    model, upd, _ = _setup((2, 2, 2), 4)
    packed = _ragged_batch(np.random.RandomState(3))
    params = nnx.state(model, nnx.Param)
    full = np.asarray(upd.jitted["logprobs"](params, packed["tokens"], packed["valid"]))
    got = dataclasses.replace(upd, pack_block=8).logprobs(params, packed)
    assert got.shape == packed["tokens"].shape and np.all(got[:, 0] == 0)
    mask = packed["valid"][:, 1:]
    assert np.abs(full[mask]).min() > 0  # real logprobs, not zeros
    np.testing.assert_allclose(got[:, 1:][mask], full[mask], atol=1e-5, rtol=0)


def test_update_applies_and_reports_the_given_learning_rate():
    """Finding 1 (updater side): update(lr=...) applies exactly that rate and logs it as actor/lr."""
    c = ml_collections.ConfigDict(dict(lr=1e-3, schedule="constant", warmup_ratio=0.5, warmup_steps=None,
                                       weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1e9))
    tx, sched = update_lib.make_optimizer(c, total_steps=10)
    model, upd, _ = _setup((8, 1, 1), 8)
    upd = dataclasses.replace(upd, tx=tx)
    packed = _ragged_batch(np.random.RandomState(5), rows=8)
    params = nnx.state(model, nnx.Param)
    before = [np.asarray(x) for x in jax.tree.leaves(params)]
    rate = float(sched(2))
    assert 0 < rate < c.lr
    new, opt_state, metrics = upd.update(params, tx.init(params), upd.shard(packed), lr=rate)
    assert float(metrics["actor/lr"]) == np.float32(rate)
    assert float(optax.tree_utils.tree_get(opt_state, "learning_rate")) == np.float32(rate)
    # Adam's first step moves each weight by lr * m/(sqrt(v)+eps) ~ lr * sign(g): at most the rate.
    step = max(np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(new), before))
    assert 0.5 * rate < step <= rate * 1.0001
    with np.testing.assert_raises_regex(ValueError, "make_optimizer"):
        _, plain, _ = _setup((8, 1, 1), 8)
        plain.update(params, plain.tx.init(params), plain.shard(packed), lr=rate)


def test_a_non_finite_update_is_skipped_and_leaves_params_and_adam_state_untouched():
    """The guard in update/apply (a lax.cond): a NaN loss applies nothing (params, moments, step
    count and rate exactly as before) and is counted; the next finite update applies as usual."""
    c = ml_collections.ConfigDict(dict(lr=1e-3, schedule="constant", warmup_ratio=0.0, warmup_steps=0,
                                       weight_decay=0.01, b1=0.9, b2=0.999, grad_clip=1.0))
    tx, _ = update_lib.make_optimizer(c, total_steps=10)
    model, upd, _ = _setup((8, 1, 1), 8)
    upd = dataclasses.replace(upd, tx=tx)
    rs = np.random.RandomState(11)
    good = _ragged_batch(rs, rows=8)
    params = nnx.state(model, nnx.Param)
    params, opt_state, m1 = upd.update(params, tx.init(params), upd.shard(good), lr=1e-3)
    assert float(m1["actor/nonfinite_skips"]) == 0.0
    before = [np.asarray(x).copy() for x in jax.tree.leaves((params, opt_state))]
    bad = dict(good, advantages=np.where(good["loss_mask"] > 0, np.nan, 0.0).astype(np.float32))
    params, opt_state, m2 = upd.update(params, opt_state, upd.shard(bad), lr=5e-4)
    assert float(m2["actor/nonfinite_skips"]) == 1.0
    after = [np.asarray(x) for x in jax.tree.leaves((params, opt_state))]
    assert len(after) == len(before)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    params, opt_state, m3 = upd.update(params, opt_state, upd.shard(good), lr=5e-4)
    assert float(m3["actor/nonfinite_skips"]) == 0.0
    assert float(optax.tree_utils.tree_get(opt_state, "learning_rate")) == np.float32(5e-4)
    counts = [int(x) for x in jax.tree.leaves(opt_state) if np.asarray(x).dtype == np.int32]
    assert counts and all(c == 2 for c in counts)  # two applied updates: the skipped one did not count
    moved = max(np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(params), before))
    assert moved > 0
