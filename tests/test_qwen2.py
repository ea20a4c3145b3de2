"""Qwen2 port vs Hugging Face transformers' PyTorch Qwen2ForCausalLM on the same random weights.

Tolerance: fp32 logits max |diff| <= 1e-4 (measured ~1e-6 on these tiny configs).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_reference import hf_logits, random_hf_model, tiny_hf_config
from tspo_jax.model import params as P
from tspo_jax.model import qwen2

TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_pair(request, tmp_path_factory):
    cfg = tiny_hf_config(tie=request.param)
    hf = random_hf_model(cfg, seed=int(request.param))
    d = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(d)
    return hf, P.load_hf_checkpoint(d), d


def _left_pad(rows, pad_id=0):
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), bool)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = True
    return ids, mask


def test_full_forward_matches_hf(hf_pair):
    hf, model, _ = hf_pair
    ids = np.random.RandomState(1).randint(0, 256, (3, 23))
    ours, _ = model(jnp.asarray(ids))
    diff = np.abs(np.asarray(ours) - hf_logits(hf, ids)).max()
    assert diff <= TOL, diff


def test_left_padded_batch_equals_each_row_alone(hf_pair):
    hf, model, _ = hf_pair
    rs = np.random.RandomState(2)
    rows = [rs.randint(1, 256, n) for n in (5, 19, 12, 1)]
    ids, mask = _left_pad(rows)
    ours, _ = model(jnp.asarray(ids), valid=jnp.asarray(mask))
    ours = np.asarray(ours)
    # HF on the padded batch with its attention mask, and on each row alone.
    ref_batch = hf_logits(hf, ids, mask.astype(np.int64))
    for i, r in enumerate(rows):
        alone = hf_logits(hf, r[None])[0]
        got = ours[i, mask[i]]
        assert np.abs(got - alone).max() <= TOL
        assert np.abs(got - ref_batch[i, mask[i]]).max() <= TOL


def test_prefill_then_decode_equals_full_forward(hf_pair):
    hf, model, _ = hf_pair
    cfg = model.cfg
    rs = np.random.RandomState(3)
    prompts = [rs.randint(1, 256, n) for n in (7, 3, 11)]
    cont = rs.randint(1, 256, (3, 6))
    ids, mask = _left_pad(prompts)
    cache = qwen2.KVCache.init(cfg, batch=3, max_len=ids.shape[1] + cont.shape[1])
    logits, cache = model(jnp.asarray(ids), valid=jnp.asarray(mask), cache=cache)
    step_logits = [np.asarray(logits)[:, -1]]
    for t in range(cont.shape[1]):
        logits, cache = model(jnp.asarray(cont[:, t : t + 1]), cache=cache)
        step_logits.append(np.asarray(logits)[:, 0])
    for i, p in enumerate(prompts):
        full = hf_logits(hf, np.concatenate([p, cont[i]])[None])[0]
        expect = full[len(p) - 1 :]
        got = np.stack([s[i] for s in step_logits])
        assert np.abs(got - expect).max() <= TOL
    np.testing.assert_array_equal(np.asarray(cache.index), [ids.shape[1] + cont.shape[1]] * 3)
    np.testing.assert_array_equal(np.asarray(cache.next_pos), [len(p) + 6 for p in prompts])


def _prompt_append_decode(model, ids, mask, obs, nxt):
    """Prefills left-padded prompts, appends obs[row] to the listed rows (a right-padded block, the
    other rows get invalid slots), then decodes nxt one token at a time. Returns the block's
    logits, its validity and each decode step's logits."""
    width = max(len(o) for o in obs.values())
    cache = qwen2.KVCache.init(model.cfg, batch=ids.shape[0], max_len=ids.shape[1] + width + nxt.shape[1])
    _, cache = model(jnp.asarray(ids), valid=jnp.asarray(mask), cache=cache)
    blk = np.zeros((ids.shape[0], width), np.int32)
    blk_valid = np.zeros((ids.shape[0], width), bool)
    for r, o in obs.items():
        blk[r, : len(o)] = o
        blk_valid[r, : len(o)] = True
    appended, cache = model(jnp.asarray(blk), valid=jnp.asarray(blk_valid), cache=cache)
    outs = []
    for t in range(nxt.shape[1]):
        logits, cache = model(jnp.asarray(nxt[:, t : t + 1]), cache=cache)
        outs.append(np.asarray(logits)[:, 0])
    return np.asarray(appended), blk_valid, outs


def test_append_block_to_chosen_rows(hf_pair):
    """An observation appended to some rows only (the others get invalid slots), then decoding
    resumes: every row equals its own unpadded sequence run from scratch."""
    hf, model, _ = hf_pair
    rs = np.random.RandomState(4)
    prompts = [rs.randint(1, 256, n) for n in (4, 9, 6)]
    obs = {0: rs.randint(1, 256, 5), 2: rs.randint(1, 256, 2)}  # row 1 appends nothing
    nxt = rs.randint(1, 256, (3, 3))
    ids, mask = _left_pad(prompts)
    _, _, outs = _prompt_append_decode(model, ids, mask, obs, nxt)
    for i, p in enumerate(prompts):
        seq = np.concatenate([p, obs.get(i, np.zeros(0, int)), nxt[i]])
        full = hf_logits(hf, seq[None])[0][-3:]
        got = np.stack([o[i] for o in outs])
        assert np.abs(got - full).max() <= TOL


def test_chunked_attention_matches_hf_with_and_without_cache(hf_pair):
    """attention_chunk=4 splits these blocks into several query chunks (the last one ragged): the
    scoring forward, a chunked prompt, a chunked append to chosen rows, and the decode after it
    all equal HF on each row's unpadded sequence; gradients equal the unchunked model's."""
    hf, _, d = hf_pair
    model = P.load_hf_checkpoint(d, attention_chunk=4)
    unchunked = P.load_hf_checkpoint(d, attention_chunk=1024)
    rs = np.random.RandomState(6)
    prompts = [rs.randint(1, 256, n) for n in (14, 5, 11)]
    ids, mask = _left_pad(prompts)
    ours, _ = model(jnp.asarray(ids), valid=jnp.asarray(mask))
    for i, p in enumerate(prompts):
        assert np.abs(np.asarray(ours)[i, mask[i]] - hf_logits(hf, p[None])[0]).max() <= TOL

    obs = {0: rs.randint(1, 256, 9), 1: rs.randint(1, 256, 3)}  # row 2 appends nothing
    nxt = rs.randint(1, 256, (3, 2))
    appended, blk_valid, outs = _prompt_append_decode(model, ids, mask, obs, nxt)
    for i, p in enumerate(prompts):
        o = obs.get(i, np.zeros(0, int))
        full = hf_logits(hf, np.concatenate([p, o, nxt[i]])[None])[0]
        if len(o):
            got = appended[i, blk_valid[i]]
            assert np.abs(got - full[len(p) : len(p) + len(o)]).max() <= TOL
        assert np.abs(np.stack([x[i] for x in outs]) - full[-2:]).max() <= TOL

    from flax import nnx

    def loss(m, s):
        logits, _ = qwen2.apply(nnx.graphdef(m), s, jnp.asarray(ids), valid=jnp.asarray(mask))
        return (jax.nn.log_softmax(logits) * mask[..., None]).sum()

    g_chunked = jax.grad(functools.partial(loss, model))(nnx.state(model))
    g_plain = jax.grad(functools.partial(loss, unchunked))(nnx.state(unchunked))
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_plain)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


def test_jitted_functional_apply_and_remat_gradient(hf_pair):
    _, model, _ = hf_pair
    from flax import nnx

    ids = jnp.asarray(np.random.RandomState(5).randint(0, 256, (2, 9)))
    graphdef, state = nnx.split(model)
    remat_graphdef, _ = nnx.split(qwen2.abstract_model(model.cfg.replace(remat=True)))

    def loss(g, s):
        logits, _ = qwen2.apply(g, s, ids)
        return jax.nn.log_softmax(logits).mean()

    g1 = jax.jit(jax.grad(functools.partial(loss, graphdef)))(state)
    g2 = jax.jit(jax.grad(functools.partial(loss, remat_graphdef)))(state)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    fwd = jax.jit(functools.partial(qwen2.apply, graphdef))
    np.testing.assert_allclose(np.asarray(fwd(state, ids)[0]), np.asarray(model(ids)[0]), atol=1e-6)


def test_bf16_compute_is_close_to_fp32(hf_pair):
    _, _, path = hf_pair
    m32 = P.load_hf_checkpoint(path)
    m16 = P.load_hf_checkpoint(path, param_dtype="bfloat16", dtype="bfloat16")
    assert m16.embed[...].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.RandomState(6).randint(0, 256, (2, 12)))
    a = np.asarray(m32(ids)[0])
    b = np.asarray(m16(ids)[0].astype(jnp.float32))
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


# --- export ---------------------------------------------------------------------------------------
def test_export_reloads_in_transformers_with_same_logits(hf_pair, tmp_path):
    hf, model, _ = hf_pair
    out = P.export_hf_checkpoint(model, str(tmp_path / "export"))
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = np.random.RandomState(7).randint(0, 256, (2, 10))
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(hf, ids)).max() == 0.0


def test_load_export_round_trip_is_bit_exact(hf_pair, tmp_path):
    _, model, src = hf_pair
    out = P.export_hf_checkpoint(model, str(tmp_path / "export"), max_shard_bytes=20_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))  # sharded on purpose
    a, b = P.HFCheckpoint(src), P.HFCheckpoint(out)
    expect = {k for k, _, _ in P.expected_weights(model.cfg)}
    assert b.keys() == expect
    for k in expect:
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), k
    again = P.load_hf_checkpoint(out)
    ids = jnp.asarray(np.random.RandomState(8).randint(0, 256, (1, 8)))
    assert np.array_equal(np.asarray(again(ids)[0]), np.asarray(model(ids)[0]))


def test_export_bf16_loads_in_transformers(hf_pair, tmp_path):
    hf, model, _ = hf_pair
    out = P.export_hf_checkpoint(model, str(tmp_path / "bf16"), dtype="bfloat16")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert P.HFCheckpoint(out).get("model.embed_tokens.weight").dtype.name == "bfloat16"


# --- configs ----------------------------------------------------------------------------------------
def test_presets_have_the_released_sizes():
    # Parameter counts of the released Qwen2.5 models (billions, as reported by Qwen).
    expect = {
        "qwen2.5-0.5b": 0.49,
        "qwen2.5-1.5b": 1.54,
        "qwen2.5-3b": 3.09,
        "qwen2.5-7b": 7.61,
        "qwen2.5-14b": 14.7,
        "qwen2.5-32b": 32.5,
        "qwen2.5-72b": 72.7,
    }
    for name, billions in expect.items():
        n = qwen2.preset(name).num_params() / 1e9
        assert abs(n - billions) / billions < 0.01, (name, n)
    with pytest.raises(ValueError, match="unknown Qwen2.5 preset"):
        qwen2.preset("qwen2.5-2b")


def test_from_hf_config_round_trip():
    cfg = tiny_hf_config(tie=False)
    ours = qwen2.Qwen2Config.from_hf_config(cfg.to_dict())
    assert ours.num_kv_heads == 2 and ours.head_dim == 16 and not ours.tie_word_embeddings
    assert qwen2.Qwen2Config.from_hf_config(ours.to_hf_config()) == ours


# --- bad input ------------------------------------------------------------------------------------
def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(False).to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(P.CheckpointError, match="no weights in .*model.safetensors.*safe_serialization"):
        P.load_hf_checkpoint(str(tmp_path))
    with pytest.raises(P.CheckpointError, match="does not exist"):
        P.load_hf_checkpoint(str(tmp_path / "nope"))


def test_missing_and_unexpected_and_misshaped_keys(hf_pair, tmp_path):
    _, model, src = hf_pair
    tensors = {k: P.HFCheckpoint(src).get(k) for k in P.HFCheckpoint(src).keys()}
    cfg_json = open(os.path.join(src, "config.json")).read()

    def write(name, ts):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg_json)
        P.write_safetensors(str(d / "model.safetensors"), ts)
        return str(d)

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(P.CheckpointError, match=r"lacks 1 weight.*model.layers.1.mlp.up_proj.weight"):
        P.load_hf_checkpoint(write("missing", missing))
    extra = dict(
        tensors, **{"model.layers.2.mlp.up_proj.weight": tensors["model.layers.1.mlp.up_proj.weight"]}
    )
    with pytest.raises(P.CheckpointError, match="does not use.*model.layers.2"):
        P.load_hf_checkpoint(write("extra", extra))
    bad = dict(tensors)
    bad["model.layers.0.mlp.gate_proj.weight"] = np.zeros((100, 64), np.float32)
    with pytest.raises(P.CheckpointError, match=r"gate_proj.weight: checkpoint shape \(100, 64\)"):
        P.load_hf_checkpoint(write("shape", bad))


def test_config_of_another_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(ValueError, match="not a Qwen2/Qwen2.5 causal LM"):
        qwen2.Qwen2Config.from_hf_config(str(tmp_path))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        qwen2.Qwen2Config(
            vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=3
        )
