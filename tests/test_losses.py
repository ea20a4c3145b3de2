"""Policy loss and chunked logprobs against float64 NumPy references, finite differences, and the
batch sharded over 8 fake CPU devices."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tspo_jax import losses as L

# ----------------------------------------------------------------------------- NumPy references


def np_log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_logprobs(logits, targets):
    return np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]


def np_entropy(logits):
    logp = np_log_softmax(logits)
    return -(np.exp(logp) * logp).sum(-1)


def np_agg(x, mask, agg, norm_len=None):
    if agg == "token-mean":
        return (x * mask).sum() / max(mask.sum(), 1)
    if agg == "seq-mean-token-mean":
        rows = [(x[b] * mask[b]).sum() / mask[b].sum() for b in range(x.shape[0]) if mask[b].sum() > 0]
        return sum(rows) / max(len(rows), 1)
    return (x * mask).sum() / (x.shape[0] * (norm_len or x.shape[1]))  # seq-sum


def np_kl(logp, ref, kind):
    d = ref - logp
    if kind == "low_var_kl":
        d = np.clip(d, -20, 20)
        return np.clip(np.exp(d) - d - 1, -10, 10)
    return {"k1": -d, "abs": np.abs(d), "mse": 0.5 * d * d}[kind]


def np_policy_loss(logp, old, ref, adv, mask, entropy, cfg):
    """PPO clip (+ dual clip) + kl_coef * KL - entropy_coef * entropy, each aggregated with cfg.agg."""
    ratio = np.exp(np.clip(logp - old, -20, 20))
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high))
    metrics = {
        "actor/pg_clipfrac": np_agg(
            (-adv * np.clip(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) > -adv * ratio).astype(float),
            mask,
            "token-mean",
        )
    }
    if cfg.dual_clip_c is not None:
        metrics["actor/pg_clipfrac_lower"] = np_agg(
            ((pg > -adv * cfg.dual_clip_c) & (adv < 0)).astype(float), mask, "token-mean"
        )
        pg = np.where(adv < 0, np.minimum(pg, -adv * cfg.dual_clip_c), pg)
    pg_loss = np_agg(pg, mask, cfg.agg, cfg.seq_sum_norm_len)
    loss = pg_loss
    if cfg.kl_coef:
        metrics["actor/kl_loss"] = np_agg(np_kl(logp, ref, cfg.kl_type), mask, cfg.agg, cfg.seq_sum_norm_len)
        loss = loss + cfg.kl_coef * metrics["actor/kl_loss"]
    if entropy is not None:
        metrics["actor/entropy"] = np_agg(entropy, mask, "token-mean")
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * np_agg(entropy, mask, cfg.agg, cfg.seq_sum_norm_len)
    metrics.update(
        {
            "actor/pg_loss": pg_loss,
            "actor/approx_kl": np_agg(old - logp, mask, "token-mean"),
            "actor/ratio_mean": np_agg(ratio, mask, "token-mean"),
            "actor/ratio_max": ratio[mask > 0].max() if mask.any() else 0.0,
            "actor/loss": loss,
        }
    )
    return loss, metrics


def config(**kw):
    cfg = L.default_config()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def random_batch(rng, b=4, t=7, all_masked_row=True):
    logp = -rng.exponential(1.5, (b, t))
    old = logp + rng.normal(0, 0.3, (b, t))
    ref = logp + rng.normal(0, 1.5, (b, t))  # some |ref - logp| > 2, where low_var_kl saturates
    adv = rng.normal(0, 1.5, (b, t))
    mask = (rng.random((b, t)) < 0.7).astype(np.float64)
    if all_masked_row:
        mask[1] = 0.0
    entropy = rng.uniform(0.1, 3.0, (b, t))
    return logp, old, ref, adv, mask, entropy


# ----------------------------------------------------------------------------- logprobs


def test_logprobs_and_entropy_from_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 8, (3, 5, 50))  # large spread: the softmax must be stable
    targets = rng.integers(0, 50, (3, 5))
    both = jax.jit(lambda x, t: (L.logprobs_from_logits(x, t), L.entropy_from_logits(x)))
    logp, ent = both(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    np.testing.assert_allclose(logp, np_logprobs(logits, targets), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ent, np_entropy(logits), rtol=1e-5, atol=1e-4)


def test_chunked_logprobs_match_reference():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 13, 8))
    w = rng.normal(0, 0.5, (8, 37))
    targets = rng.integers(0, 37, (3, 13))
    cases = [(1, 1.0), (4, 0.7), (64, 1.3)]  # one position per chunk; 13 % 4 != 0; chunk > T
    run_all = jax.jit(
        lambda h, w, t: [
            L.token_logprobs_and_entropy(h, w, t, chunk_size=c, temperature=temp) for c, temp in cases
        ]
    )
    results = run_all(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(targets))
    for (chunk, temperature), (logp, ent) in zip(cases, results):
        logits = h @ w / temperature
        np.testing.assert_allclose(
            logp, np_logprobs(logits, targets), rtol=1e-5, atol=1e-5, err_msg=str(chunk)
        )
        np.testing.assert_allclose(ent, np_entropy(logits), rtol=1e-5, atol=1e-5, err_msg=str(chunk))


def test_vocab_limit_gives_padding_rows_no_probability():
    """Qwen's embedding has rows past the tokenizer; the sampler never draws them, so the trainer's
    logprobs and entropy are over the first vocab_limit logits only (and finite)."""
    rng = np.random.default_rng(7)
    h = rng.normal(size=(2, 11, 8))
    w = rng.normal(0, 0.5, (8, 40))
    limit = 29
    targets = rng.integers(0, limit, (2, 11))
    logp, ent = jax.jit(
        lambda h, w, t: L.token_logprobs_and_entropy(h, w, t, chunk_size=4, temperature=0.8, vocab_limit=limit)
    )(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(targets))
    logits = (h @ w / 0.8)[..., :limit]
    np.testing.assert_allclose(logp, np_logprobs(logits, targets), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, np_entropy(logits), rtol=1e-5, atol=1e-5)
    grad = jax.grad(
        lambda w: L.token_logprobs_and_entropy(
            jnp.asarray(h, jnp.float32), w, jnp.asarray(targets), chunk_size=4, vocab_limit=limit
        )[0].sum()
    )(jnp.asarray(w, jnp.float32))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)[:, limit:]).max() == 0.0


def test_chunked_logprobs_accept_bfloat16():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(0, 0.3, (16, 40)), jnp.bfloat16)
    targets = rng.integers(0, 40, (2, 9))
    logp, ent = jax.jit(L.token_logprobs_and_entropy, static_argnames="chunk_size")(
        h, w, jnp.asarray(targets), chunk_size=4
    )
    assert logp.dtype == jnp.float32
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)  # the bf16 values, exact products
    np.testing.assert_allclose(logp, np_logprobs(logits, targets), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ent, np_entropy(logits), rtol=1e-4, atol=1e-4)


def test_chunked_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(2, 5, 4))
    w = rng.normal(0, 0.5, (4, 11))
    targets = rng.integers(0, 11, (2, 5))
    cot_lp, cot_ent = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))

    def np_objective(h, w):
        logits = h @ w / 0.8
        return (np_logprobs(logits, targets) * cot_lp + np_entropy(logits) * cot_ent).sum()

    def objective(h, w):
        logp, ent = L.token_logprobs_and_entropy(h, w, jnp.asarray(targets), chunk_size=2, temperature=0.8)
        return (logp * cot_lp + ent * cot_ent).sum()

    grads = jax.jit(jax.grad(objective, argnums=(0, 1)))(
        jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32)
    )
    for arg, grad in zip((h, w), grads):
        fd = np.zeros_like(arg)
        for idx in np.ndindex(arg.shape):
            plus, minus = arg.copy(), arg.copy()
            plus[idx] += 1e-6
            minus[idx] -= 1e-6
            args_p = (plus, w) if arg is h else (h, plus)
            args_m = (minus, w) if arg is h else (h, minus)
            fd[idx] = (np_objective(*args_p) - np_objective(*args_m)) / 2e-6
        np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5)


def test_chunking_bounds_backward_memory():
    # The backward pass of the chunked kernel must not hold the full [B, T, V] float32 logits.
    b, t, d, v = 2, 512, 32, 4096
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(h, w, targets):
        logp, ent = L.token_logprobs_and_entropy(h, w, targets, chunk_size=32)
        return logp.sum() + ent.sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, targets).compile()
    full_logits_bytes = b * t * v * 4
    assert compiled.memory_analysis().temp_size_in_bytes < full_logits_bytes / 2


# ----------------------------------------------------------------------------- policy loss

CONFIGS = [
    dict(agg=agg, kl_type=kl, dual_clip_c=dual, clip_eps_high=high)
    for (agg, kl), dual, high in zip(
        itertools.product(L.AGGREGATIONS, L.KL_TYPES),
        itertools.cycle([None, 3.0, 1.5]),
        itertools.cycle([0.2, 0.28]),
    )
]


def test_policy_loss_matches_reference():
    rng = np.random.default_rng(4)
    batch = random_batch(rng)
    cfgs = [config(entropy_coef=0.01, kl_coef=0.05, **kw) for kw in CONFIGS]
    # Every configuration in one jitted program: one compile instead of twelve.
    every_config = jax.jit(lambda *arrays: [L.policy_loss(*arrays, cfg) for cfg in cfgs])
    results = every_config(*[jnp.asarray(x, jnp.float32) for x in batch])
    for kw, cfg, (loss, metrics) in zip(CONFIGS, cfgs, results):
        want, want_metrics = np_policy_loss(*batch, cfg)
        assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6), kw
        assert set(metrics) == set(want_metrics), kw
        for key, value in want_metrics.items():
            assert float(metrics[key]) == pytest.approx(value, rel=1e-5, abs=1e-6), (kw, key)


def test_policy_loss_seq_sum_norm_and_optional_terms():
    rng = np.random.default_rng(5)
    logp, old, _, adv, mask, _ = random_batch(rng)
    cfg = config(agg="seq-sum", seq_sum_norm_len=500, kl_coef=0.0, entropy_coef=0.0)
    loss, metrics = L.policy_loss(
        *(jnp.asarray(x, jnp.float32) for x in (logp, old)),
        None,
        jnp.asarray(adv, jnp.float32),
        jnp.asarray(mask),
        None,
        cfg,
    )
    want, _ = np_policy_loss(logp, old, None, adv, mask, None, cfg)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert "actor/kl_loss" not in metrics and "actor/entropy" not in metrics


def test_extreme_log_ratios_keep_loss_and_gradient_finite():
    # exp(100) overflows float32: without the [-20, 20] clamps the gradient would be NaN.
    logp = jnp.array([[-100.1, -0.1, -30.0]])
    ref = jnp.array([[-0.1, -100.1, -30.0]])  # ref - logp = +100, -100, 0
    old = jnp.array([[-0.1, -100.1, -30.0]])  # log ratios -100, +100, 0
    adv, mask, entropy = jnp.array([[1.0, -1.0, 0.5]]), jnp.ones((1, 3)), jnp.ones((1, 3))
    cfg = config(dual_clip_c=3.0, kl_coef=0.1)
    loss_fn = jax.jit(jax.value_and_grad(lambda lp: L.policy_loss(lp, old, ref, adv, mask, entropy, cfg)[0]))
    loss, grad = loss_fn(logp)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    want, _ = np_policy_loss(*(np.asarray(x, np.float64) for x in (logp, old, ref, adv, mask, entropy)), cfg)
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_all_masked_batch_gives_zero_loss():
    z = jnp.zeros((2, 3))
    loss, metrics = jax.jit(lambda *a: L.policy_loss(*a, config()))(z - 1.0, z, z, z + 1.0, z, z + 1.0)
    assert float(loss) == 0.0 and float(metrics["actor/ratio_max"]) == 0.0


GRADIENT_CONFIGS = [
    dict(agg="token-mean", kl_type="low_var_kl", dual_clip_c=3.0),
    dict(agg="seq-mean-token-mean", kl_type="k1", clip_eps_high=0.28),
    dict(agg="seq-sum", kl_type="mse", entropy_coef=0.01),
]


def test_loss_gradient_wrt_logits_matches_finite_differences():
    rng = np.random.default_rng(7)
    b, t, v = 2, 4, 6
    logits = rng.normal(0, 1.5, (b, t, v))
    targets = rng.integers(0, v, (b, t))
    lp = np_logprobs(logits, targets)
    old = lp + rng.normal(0, 0.4, (b, t))
    ref = lp + rng.normal(0, 0.4, (b, t))
    adv = rng.normal(0, 1.0, (b, t))
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float64)
    cfgs = [config(kl_coef=0.1, **kw) for kw in GRADIENT_CONFIGS]

    def loss(x, cfg):
        rest = (jnp.asarray(a, jnp.float32) for a in (old, ref, adv, mask))
        logp = L.logprobs_from_logits(x, jnp.asarray(targets))
        return L.policy_loss(logp, *rest, L.entropy_from_logits(x), cfg)[0]

    grads = jax.jit(lambda x: [jax.grad(loss)(x, cfg) for cfg in cfgs])(jnp.asarray(logits, jnp.float32))
    for kw, cfg, grad in zip(GRADIENT_CONFIGS, cfgs, grads):

        def np_loss(x):
            return np_policy_loss(np_logprobs(x, targets), old, ref, adv, mask, np_entropy(x), cfg)[0]

        fd = np.zeros_like(logits)
        for idx in np.ndindex(logits.shape):
            plus, minus = logits.copy(), logits.copy()
            plus[idx] += 1e-6
            minus[idx] -= 1e-6
            fd[idx] = (np_loss(plus) - np_loss(minus)) / 2e-6
        assert np.abs(fd).max() > 1e-3, kw  # the check is not vacuous
        np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=2e-6, err_msg=str(kw))
        np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)


# ----------------------------------------------------------------------------- config, errors


def test_default_config_and_bad_knobs():
    cfg = L.default_config()
    assert (cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c, cfg.kl_type, cfg.kl_coef, cfg.agg) == (
        0.2,
        0.2,
        None,
        "low_var_kl",
        0.001,
        "token-mean",
    )
    L.validate_config(cfg)
    z = jnp.zeros((2, 3))
    for kw, msg in [
        (dict(agg="foo"), r"agg='foo'.*token-mean"),
        (dict(kl_type="bar"), r"kl_type='bar'.*low_var_kl"),
        (dict(dual_clip_c=0.5), "dual_clip_c"),
        (dict(clip_eps_low=1.5), "clip_eps_low"),
        (dict(seq_sum_norm_len=0), "seq_sum_norm_len"),
    ]:
        with pytest.raises(ValueError, match=msg):
            L.policy_loss(z, z, z, z, z, z, config(**kw))
    with pytest.raises(ValueError, match="needs ref_logp"):
        L.policy_loss(z, z, None, z, z, z, config())
    with pytest.raises(ValueError, match="needs entropy"):
        L.policy_loss(z, z, z, z, z, None, config())
    with pytest.raises(ValueError, match="advantages must have"):
        L.policy_loss(z, z, z, jnp.zeros((2, 4)), z, z, config())
    with pytest.raises(ValueError, match="chunk_size"):
        L.token_logprobs_and_entropy(
            jnp.zeros((1, 2, 3)), jnp.zeros((3, 4)), jnp.zeros((1, 2), int), chunk_size=0
        )
    with pytest.raises(ValueError, match="lm_head"):
        L.token_logprobs_and_entropy(
            jnp.zeros((1, 2, 3)), jnp.zeros((4, 4)), jnp.zeros((1, 2), int), chunk_size=1
        )
    with pytest.raises(ValueError, match="temperature"):
        L.token_logprobs_and_entropy(
            jnp.zeros((1, 2, 3)), jnp.zeros((3, 4)), jnp.zeros((1, 2), int), chunk_size=1, temperature=0.0
        )


# ----------------------------------------------------------------------------- sharded


def test_sharded_loss_and_gradient_match_single_device():
    assert jax.device_count() == 8
    rng = np.random.default_rng(3)
    b, t, d, v = 16, 10, 8, 24
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 0.4, (d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)))
    old, ref, adv = (jnp.asarray(rng.normal(-3, 0.5, (b, t)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((b, t)) < 0.7, jnp.float32)
    cfg = config(dual_clip_c=3.0, entropy_coef=0.01)

    def objective(h, w, targets, old, ref, adv, mask):
        logp, ent = L.token_logprobs_and_entropy(h, w, targets, chunk_size=3)
        return L.policy_loss(logp, old, ref, adv, mask, ent, cfg)

    step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
    want = step(h, w, targets, old, ref, adv, mask)
    mesh = jax.make_mesh((8,), ("data",))
    batch = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", *[None] * (x.ndim - 1))))  # noqa: E731
    with jax.set_mesh(mesh):
        got = step(
            batch(h), jax.device_put(w, NamedSharding(mesh, P())), *map(batch, (targets, old, ref, adv, mask))
        )
    (loss, metrics), (grad_h, grad_w) = got
    assert grad_h.sharding.spec[0] == "data"
    (want_loss, want_metrics), (want_h, want_w) = want
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    for key in want_metrics:
        assert float(metrics[key]) == pytest.approx(float(want_metrics[key]), rel=1e-5, abs=1e-7), key
    np.testing.assert_allclose(grad_h, want_h, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_w, want_w, rtol=1e-5, atol=1e-7)
