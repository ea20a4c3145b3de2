"""The jitted sampler against transformers' generate and a recomputed forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import random_hf_model, tiny_hf_config
from tspo_jax import sampling
from tspo_jax.model import params as params_lib
from tspo_jax.model import qwen2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = random_hf_model(tiny_hf_config(tie=False), seed=11)
    d = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(d)
    model = params_lib.load_hf_checkpoint(d)
    graphdef, state = nnx.split(model)
    return hf, model, state, sampling.Sampler(graphdef, model.cfg, eos_ids=[7], pad_id=0)


PROMPTS = [[5, 17, 99], list(range(30, 45)), [200, 3, 3, 8, 250, 1, 77]]


def test_greedy_equals_transformers_generate_batched_left_padded(pair):
    hf, _, state, smp = pair
    res = smp.generate(state, PROMPTS, max_new_tokens=16, sampling=sampling.SamplingParams(greedy=True))
    # HF on the same left-padded batch.
    t = max(map(len, PROMPTS))
    ids = torch.zeros((3, t), dtype=torch.long)
    mask = torch.zeros((3, t), dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, t - len(p) :] = torch.tensor(p)
        mask[i, t - len(p) :] = 1
    out = hf.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0, eos_token_id=7
    )
    for i, r in enumerate(res):
        expect = out[i, t:].tolist()
        if 7 in expect:
            expect = expect[: expect.index(7) + 1]
        assert r["token_ids"] == expect
        assert r["stop"] == ("eos" if expect[-1] == 7 else "length")


@functools.lru_cache(maxsize=None)
def _jitted_forward(graphdef):
    return jax.jit(lambda s, t: qwen2.apply(graphdef, s, t)[0])


def _recomputed_logprobs(model, prompt, gen, temperature):
    graphdef, state = nnx.split(model)
    seq = np.zeros((1, 64), np.int32)  # one padded width: a single compile for every call
    n = len(prompt) + len(gen)
    seq[0, :n] = prompt + gen
    logits = _jitted_forward(graphdef)(state, jnp.asarray(seq))
    logp = jax.nn.log_softmax(logits[0] / temperature, axis=-1)
    pos = np.arange(len(prompt) - 1, n - 1)
    return np.asarray(logp[pos, np.asarray(gen)])


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 20)])
def test_sampled_logprobs_equal_recomputed_forward(pair, temperature, top_p, top_k):
    _, model, state, smp = pair
    params = sampling.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    res = smp.generate(state, PROMPTS, max_new_tokens=12, sampling=params, seed=3)
    for p, r in zip(PROMPTS, res):
        assert len(r["token_ids"]) >= 1
        ref = _recomputed_logprobs(model, p, r["token_ids"], temperature)
        assert np.abs(np.asarray(r["logprobs"]) - ref).max() <= 1e-4


def test_top_k_one_and_tiny_top_p_are_greedy(pair):
    _, _, state, smp = pair
    greedy = smp.generate(state, PROMPTS, max_new_tokens=10, sampling=sampling.SamplingParams(greedy=True))
    for params in (sampling.SamplingParams(top_k=1), sampling.SamplingParams(top_p=1e-6)):
        got = smp.generate(state, PROMPTS, max_new_tokens=10, sampling=params, seed=5)
        assert [g["token_ids"] for g in got] == [g["token_ids"] for g in greedy]


def test_top_k_samples_only_from_the_k_best(pair):
    _, model, state, smp = pair
    prompt = [[11, 12, 13]] * 8
    res = smp.generate(state, prompt, max_new_tokens=1, sampling=sampling.SamplingParams(top_k=3), seed=1)
    logits, _ = model(jnp.asarray(prompt[:1]))
    best3 = set(np.argsort(np.asarray(logits[0, -1]))[-3:].tolist())
    assert {r["token_ids"][0] for r in res} <= best3


def test_sampling_is_seeded(pair):
    _, _, state, smp = pair
    a = smp.generate(state, PROMPTS, max_new_tokens=8, seed=1)
    b = smp.generate(state, PROMPTS, max_new_tokens=8, seed=1)
    c = smp.generate(state, PROMPTS, max_new_tokens=8, seed=2)
    assert a == b
    assert [x["token_ids"] for x in a] != [x["token_ids"] for x in c]


def test_budget_per_row_and_context_limit(pair):
    _, _, state, smp = pair
    tokens, valid = sampling.left_pad(PROMPTS, 16, 0, num_rows=8)
    gen = smp.prefill(state, tokens, valid, max_len=32)
    budget = np.array([3, 5, 1, 0, 9, 9, 9, 9])
    active = np.arange(8) < 3
    gen, out = smp.decode(
        state,
        gen,
        jax.random.key(0),
        max_new=9,
        sampling=sampling.SamplingParams(greedy=True),
        active=active,
        budget=budget,
    )
    n = np.asarray(out.num_tokens)
    reasons = np.asarray(out.stop_reason)
    for i in range(3):
        assert n[i] <= budget[i]
        assert reasons[i] in (sampling.STOP_EOS, sampling.STOP_BUDGET)
        assert (reasons[i] == sampling.STOP_BUDGET) == (n[i] == budget[i])
    assert n[3:].tolist() == [0] * 5
    # A cache with 4 free slots stops every row for context after 4 tokens.
    gen = smp.prefill(state, tokens, valid, max_len=20)
    gen, out = smp.decode(
        state, gen, jax.random.key(0), max_new=10, sampling=sampling.SamplingParams(greedy=True), active=active
    )
    n = np.asarray(out.num_tokens)[:3]
    r = np.asarray(out.stop_reason)[:3]
    assert all((k == 4 and why == sampling.STOP_CONTEXT) or why == sampling.STOP_EOS for k, why in zip(n, r))


def test_similar_batches_do_not_recompile(pair):
    _, _, state, smp = pair
    smp.generate(state, PROMPTS, max_new_tokens=8)
    before = dict(smp.compile_counts)
    smp.generate(state, [[1, 2], [3, 4, 5, 6, 7], [8], [9, 9]], max_new_tokens=8, seed=4)  # same buckets
    smp.generate(state, PROMPTS[:1] * 3, max_new_tokens=8, seed=9)
    assert dict(smp.compile_counts) == before


def test_a_single_prompt_decodes_on_one_row(pair):
    """Rows are bucketed 1, 2, 4, ...: one prompt compiles a one-row shape (no padding to 8) and
    gives the tokens it gets inside a batch."""
    _, _, state, smp = pair
    greedy = sampling.SamplingParams(greedy=True)
    batched = smp.generate(state, PROMPTS, max_new_tokens=6, sampling=greedy)
    before = smp.compile_counts["decode"]
    alone = smp.generate(state, PROMPTS[1:2], max_new_tokens=6, sampling=greedy)
    assert smp.compile_counts["decode"] == before + 1
    assert alone[0]["token_ids"] == batched[1]["token_ids"]


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="use greedy=True"):
        sampling.SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingParams(top_p=0.0)


def test_sampler_on_a_mesh_splits_the_cache_by_rows_and_matches_one_device(pair):
    """Each device holds and decodes only its rows: the cache is batch-sharded, results unchanged."""
    from tspo_jax import sharding as shd

    hf, model, state, smp = pair
    mesh = shd.make_mesh((4, 2, 1))
    sharded = sampling.Sampler(nnx.graphdef(model), model.cfg, eos_ids=[7], pad_id=0, mesh=mesh)
    sharded_state = jax.device_put(state, shd.state_shardings(state, mesh))
    params = sampling.SamplingParams(greedy=True)
    expect = smp.generate(state, PROMPTS, max_new_tokens=10, sampling=params)
    got = sharded.generate(sharded_state, PROMPTS, max_new_tokens=10, sampling=params)
    assert [g["token_ids"] for g in got] == [e["token_ids"] for e in expect]
    tokens, valid = sampling.left_pad(PROMPTS, 16, 0, num_rows=8)
    gen = sharded.prefill(sharded_state, tokens, valid, max_len=64)
    assert gen.cache.k[0].sharding.spec[0] == shd.BATCH_AXES
    assert len(gen.cache.k[0].addressable_shards) == 8
    assert gen.cache.k[0].addressable_shards[0].data.shape[0] == 1  # 8 rows over 8 batch devices


def test_pinned_activations_decode_the_same_tokens_on_a_mesh(pair):
    """model.shard_activations on a (data, fsdp, tensor) mesh: prefill and the cached decode give the
    single-device greedy tokens."""
    from tspo_jax import sharding as shd
    from tspo_jax.model import qwen2

    _, model, state, smp = pair
    mesh = shd.make_mesh((1, 4, 2))
    pinned_cfg = model.cfg.replace(shard_activations=True)
    pinned = sampling.Sampler(nnx.graphdef(qwen2.abstract_model(pinned_cfg)), pinned_cfg, eos_ids=[7], pad_id=0,
                              mesh=mesh)
    sharded_state = jax.device_put(state, shd.state_shardings(state, mesh))
    params = sampling.SamplingParams(greedy=True)
    expect = smp.generate(state, PROMPTS, max_new_tokens=10, sampling=params)
    got = pinned.generate(sharded_state, PROMPTS, max_new_tokens=10, sampling=params)
    assert [g["token_ids"] for g in got] == [e["token_ids"] for e in expect]
