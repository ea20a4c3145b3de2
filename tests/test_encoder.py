"""BertEncoder parity with transformers' BertModel (PyTorch) + sentence-transformers style pooling."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from tspo_jax.model import encoder as E

TOL = 1e-4
SENTENCES = [
    "Who wrote the play Hamlet?",
    "Paris is the capital and most populous city of France, with an estimated population of 2,102,650 "
    "residents in January 2023 in an area of more than 105 km2.",
    "The mitochondrion is the powerhouse of the cell.",
    "query: how many moons does jupiter have",
    "a",
]


def torch_embed(model, ids, mask, pooling="mean", normalize=True):
    """Reference: HF last_hidden_state, then pooling exactly as sentence-transformers does it."""
    with torch.no_grad():
        h = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
        ).last_hidden_state
    if pooling == "cls":
        pooled = h[:, 0]
    else:
        m = torch.as_tensor(mask, dtype=torch.float32)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return h.numpy(), pooled.numpy()


def tiny_hf_model(tmp_path, seed, hidden_act="gelu", head=False):
    """A random fp32 BERT whose LayerNorms and biases are random too (defaults 1/0 would hide bugs)."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2,
        hidden_act=hidden_act,
        layer_norm_eps=1e-12,
    )
    model = (transformers.BertForMaskedLM if head else transformers.BertModel)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
    model.save_pretrained(tmp_path, safe_serialization=True)
    base = model.bert if head else model
    return base, json.loads((tmp_path / "config.json").read_text())


@nnx.jit
def forward(model, ids, mask):
    """Token states and pooled embeddings in one compiled call (eager mode compiles op by op)."""
    return model.hidden_states(ids, mask), model(ids, mask)


def ragged_batch(rng, lengths, length, vocab):
    """Token ids with junk (non-pad) ids in the padding, so only the mask can hide it."""
    ids = rng.integers(1, vocab, size=(len(lengths), length))
    mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return ids.astype(np.int32), mask


@pytest.mark.parametrize("hidden_act,pooling,head", [("gelu", "mean", False), ("gelu_new", "cls", True)])
def test_tiny_random_bert_matches_torch(tmp_path, hidden_act, pooling, head):
    hf, hf_cfg = tiny_hf_model(tmp_path, seed=1, hidden_act=hidden_act, head=head)
    cfg = E.EncoderConfig.from_hf_config(hf_cfg, pooling=pooling, max_length=40)
    model = E.load_params(nnx.eval_shape(lambda: E.BertEncoder(cfg, rngs=nnx.Rngs(0))), str(tmp_path))
    ids, mask = ragged_batch(np.random.default_rng(0), [7, 40, 1, 23], 40, cfg.vocab_size)
    ref_h, ref_pooled = torch_embed(hf, ids, mask, pooling)
    h, pooled = map(np.asarray, forward(model, ids, mask))
    valid = mask[..., None].astype(bool)
    assert np.abs(np.where(valid, h - ref_h, 0)).max() <= TOL
    assert np.abs(pooled - ref_pooled).max() <= TOL
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-5)


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    hf, hf_cfg = tiny_hf_model(tmp_path, seed=4)
    hf.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    hf.to(torch.float32)  # the reference: the same bf16-rounded weights, computed in fp32
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        assert f.get_slice("encoder.layer.0.attention.self.query.weight").get_dtype() == "BF16"
    cfg = E.EncoderConfig.from_hf_config(hf_cfg, max_length=40)
    model = E.load_params(nnx.eval_shape(lambda: E.BertEncoder(cfg, rngs=nnx.Rngs(0))), str(tmp_path))
    assert model.layers[0].query.kernel[...].dtype == np.float32
    ids, mask = ragged_batch(np.random.default_rng(0), [7, 40, 1, 23], 40, cfg.vocab_size)
    _, ref = torch_embed(hf, ids, mask)
    assert np.abs(np.asarray(forward(model, ids, mask)[1]) - ref).max() <= TOL


def test_unnormalized_mean_pooling_matches_torch(tmp_path):
    hf, hf_cfg = tiny_hf_model(tmp_path, seed=2)
    cfg = E.EncoderConfig.from_hf_config(hf_cfg, normalize=False, max_length=40)
    model = E.load_params(nnx.eval_shape(lambda: E.BertEncoder(cfg, rngs=nnx.Rngs(0))), str(tmp_path))
    ids, mask = ragged_batch(np.random.default_rng(1), [3, 11, 16], 16, cfg.vocab_size)
    _, ref = torch_embed(hf, ids, mask, normalize=False)
    assert np.abs(np.asarray(forward(model, ids, mask)[1]) - ref).max() <= TOL


@pytest.fixture(scope="module")
def minilm():
    return E.load_encoder()


@pytest.fixture(scope="module")
def minilm_torch():
    path = E.default_encoder_path()
    return transformers.BertModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(
        path
    )


def test_real_minilm_matches_torch(minilm, minilm_torch):
    model, tokenizer, cfg = minilm
    hf, hf_tok = minilm_torch
    assert (cfg.hidden_size, cfg.num_layers, cfg.max_length) == (384, 6, 256)
    # Reference tokenization comes from transformers' own tokenizer, not ours.
    batch = hf_tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="np")
    _, ref = torch_embed(hf, batch["input_ids"], batch["attention_mask"])
    out = E.encode(model, tokenizer, SENTENCES, batch_size=4)
    assert out.dtype == np.float32 and out.shape == (len(SENTENCES), 384)
    assert np.abs(out - ref).max() <= TOL


def test_real_minilm_truncates_long_text_like_torch(minilm, minilm_torch):
    hf, hf_tok = minilm_torch
    model = minilm[0]
    tokenizer = E.load_encoder_tokenizer(E.default_encoder_path(), max_length=24)
    long_text = " ".join(SENTENCES * 3)
    batch = hf_tok(
        [long_text, SENTENCES[0]], padding=True, truncation=True, max_length=24, return_tensors="np"
    )
    _, ref = torch_embed(hf, batch["input_ids"], batch["attention_mask"])
    assert np.abs(E.encode(model, tokenizer, [long_text, SENTENCES[0]]) - ref).max() <= TOL


def test_prefix_is_prepended(minilm):
    model, tokenizer, _ = minilm
    with_prefix = E.encode(model, tokenizer, ["how many moons does jupiter have"], prefix="query: ")
    spelled_out = E.encode(model, tokenizer, [SENTENCES[3]])
    np.testing.assert_allclose(with_prefix, spelled_out, atol=1e-6)


def test_bucketing_keeps_order_and_reuses_programs(minilm):
    model, tokenizer, _ = minilm
    texts = SENTENCES * 2  # 10 texts, mixed lengths
    one_by_one = np.concatenate([E.encode(model, tokenizer, [t], batch_size=1) for t in texts])
    batched = E.encode(model, tokenizer, texts, batch_size=4)  # sorted + padded rows/lengths
    np.testing.assert_allclose(batched, one_by_one, atol=2e-6)
    compiled = E._embed._cache_size()
    E.encode(model, tokenizer, texts[::-1], batch_size=4)
    assert E._embed._cache_size() == compiled  # same buckets, no new programs
    assert E.encode(model, tokenizer, []).shape == (0, 384)


def test_bucket_sizes():
    assert [E.length_bucket(n, 256) for n in (1, 16, 17, 32, 33, 250, 256)] == [16, 16, 32, 32, 64, 256, 256]
    assert E.length_bucket(100, 64) == 64
    assert [E.row_bucket(n, 48) for n in (1, 2, 3, 5, 33, 48)] == [1, 2, 4, 8, 48, 48]


def test_bad_inputs_raise_clear_errors(tmp_path, minilm):
    model, tokenizer, _ = minilm
    with pytest.raises(ValueError, match="list of strings"):
        E.encode(model, tokenizer, "one string")
    with pytest.raises(ValueError, match="batch_size"):
        E.encode(model, tokenizer, ["x"], batch_size=0)
    with pytest.raises(ValueError, match="config.json"):
        E.load_encoder(tmp_path)
    with pytest.raises(ValueError, match="hidden_act"):
        E.EncoderConfig(
            vocab_size=10,
            hidden_size=8,
            num_layers=1,
            num_heads=2,
            intermediate_size=8,
            hidden_act="swish-ish",
        )
    with pytest.raises(ValueError, match="max_length"):
        E.load_encoder(max_length=1000)


def test_checkpoint_problems_name_the_tensor(tmp_path):
    _, hf_cfg = tiny_hf_model(tmp_path, seed=3)
    cfg = E.EncoderConfig.from_hf_config(hf_cfg, max_length=40)

    def abstract(c):
        return nnx.eval_shape(lambda: E.BertEncoder(c, rngs=nnx.Rngs(0)))

    wrong = E.EncoderConfig.from_hf_config({**hf_cfg, "intermediate_size": 50}, max_length=40)
    with pytest.raises(ValueError, match="intermediate.dense.*has shape"):
        E.load_params(abstract(wrong), str(tmp_path))
    deeper = E.EncoderConfig.from_hf_config({**hf_cfg, "num_hidden_layers": 3}, max_length=40)
    with pytest.raises(ValueError, match="missing tensor 'encoder.layer.2"):
        E.load_params(abstract(deeper), str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        E.load_params(abstract(cfg), str(tmp_path))
    shutil.copy(os.path.join(E.default_encoder_path(), "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="safetensors"):
        E.load_encoder(tmp_path)
