"""Hugging Face safetensors checkpoints <-> (sharded) JAX parameters of the Qwen2 port.

Loading streams one tensor at a time from memory-mapped safetensors files and places it straight
into its sharded jax.Array (each process materialises only the shards it owns), so no full host
copy of the model ever exists. `KEY_MAP` is the one table that says how every HF weight maps to a
parameter of `Qwen2` and which transform it needs; export runs the same table backwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tspo_jax import sharding as shd
from tspo_jax.model.qwen2 import Qwen2, Qwen2Config, abstract_model

# --- safetensors I/O (bf16-capable, memory-mapped) ------------------------------------------------
_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as asked; the message says why."""


def read_safetensors_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header)")
        n = int.from_bytes(raw, "little")
        if n > 100 * 2**20:
            raise CheckpointError(f"{path} is not a safetensors file (header length {n} is implausible)")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """Lazy, memory-mapped access to the tensors of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        self.header, self._data_start = read_safetensors_header(path)
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self):
        return self.header.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        buf = self._mm[self._data_start + start : self._data_start + end]
        return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Writes tensors in key order, 8-byte aligned as the format requires."""
    header, offset, order = {}, 0, sorted(tensors)
    for k in order:
        a = np.ascontiguousarray(tensors[k])
        if a.dtype not in _ST_NAMES:
            raise CheckpointError(f"cannot write tensor {k} of dtype {a.dtype} to safetensors")
        header[k] = {
            "dtype": _ST_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for k in order:
            f.write(np.ascontiguousarray(tensors[k]).tobytes())
    os.replace(tmp, path)


class HFCheckpoint:
    """The weight files of an HF checkpoint directory: single file or sharded with an index."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {}
            for key, fname in weight_map.items():
                fpath = os.path.join(path, fname)
                if fpath not in files:
                    if not os.path.exists(fpath):
                        raise CheckpointError(f"{index} names {fname}, which is missing from {path}")
                    files[fpath] = SafetensorsFile(fpath)
                if key not in files[fpath].header:
                    raise CheckpointError(f"{index} says {key} is in {fname}, but that file lacks it")
            self._where = {k: files[os.path.join(path, f)] for k, f in weight_map.items()}
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self._where = {k: f for k in f.keys()}
        else:
            found = sorted(os.listdir(path))[:20]
            hint = (
                " (PyTorch .bin weights are not read: re-save with save_pretrained(..., "
                "safe_serialization=True))"
                if any(n.endswith(".bin") for n in found)
                else ""
            )
            raise CheckpointError(
                f"no weights in {path}: expected model.safetensors or model.safetensors.index.json; "
                f"found {found}{hint}"
            )
        self.path = path

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str):
        return self._where[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)


# --- the key map ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WeightRule:
    """One HF tensor <-> one NNX variable (the policy's KEY_MAP; the encoder's table too)."""

    hf_key: str  # may contain {i} for the layer index
    path: tuple  # NNX state path; "{i}" entries are replaced by the layer index
    to_jax: Callable[[np.ndarray, Qwen2Config], np.ndarray]
    to_hf: Callable[[np.ndarray, Qwen2Config], np.ndarray]

    def expand(self, num_layers: int) -> Iterator[tuple[str, tuple]]:
        """(HF key, state path) for every layer the rule covers."""
        if "{i}" not in self.hf_key:
            yield self.hf_key, self.path
            return
        for i in range(num_layers):
            yield self.hf_key.format(i=i), tuple(i if p == "{i}" else p for p in self.path)


def identity(x, cfg):
    return x


def transpose(x, cfg):
    return x.T


def _split_heads_in(n_attr):
    # HF Linear weight [heads*hd, embed] -> kernel [embed, heads, hd]
    return lambda x, cfg: x.T.reshape(cfg.hidden_size, getattr(cfg, n_attr), cfg.head_dim)


def _merge_heads_in(x, cfg):
    return x.reshape(cfg.hidden_size, -1).T


def _split_bias(n_attr):
    return lambda x, cfg: x.reshape(getattr(cfg, n_attr), cfg.head_dim)


def _merge_bias(x, cfg):
    return x.reshape(-1)


def _o_in(x, cfg):  # [embed, heads*hd] -> [heads, hd, embed]
    return x.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def _o_out(x, cfg):
    return x.reshape(-1, cfg.hidden_size).T


_LAYER = "model.layers.{i}."
KEY_MAP: tuple[WeightRule, ...] = (
    WeightRule("model.embed_tokens.weight", ("embed",), identity, identity),
    WeightRule("model.norm.weight", ("final_norm", "scale"), identity, identity),
    WeightRule("lm_head.weight", ("lm_head",), transpose, transpose),
    WeightRule(_LAYER + "input_layernorm.weight", ("layers", "{i}", "input_norm", "scale"), identity, identity),
    WeightRule(
        _LAYER + "post_attention_layernorm.weight",
        ("layers", "{i}", "post_attn_norm", "scale"),
        identity,
        identity,
    ),
    WeightRule(
        _LAYER + "self_attn.q_proj.weight",
        ("layers", "{i}", "attn", "q_kernel"),
        _split_heads_in("num_heads"),
        _merge_heads_in,
    ),
    WeightRule(
        _LAYER + "self_attn.q_proj.bias",
        ("layers", "{i}", "attn", "q_bias"),
        _split_bias("num_heads"),
        _merge_bias,
    ),
    WeightRule(
        _LAYER + "self_attn.k_proj.weight",
        ("layers", "{i}", "attn", "k_kernel"),
        _split_heads_in("num_kv_heads"),
        _merge_heads_in,
    ),
    WeightRule(
        _LAYER + "self_attn.k_proj.bias",
        ("layers", "{i}", "attn", "k_bias"),
        _split_bias("num_kv_heads"),
        _merge_bias,
    ),
    WeightRule(
        _LAYER + "self_attn.v_proj.weight",
        ("layers", "{i}", "attn", "v_kernel"),
        _split_heads_in("num_kv_heads"),
        _merge_heads_in,
    ),
    WeightRule(
        _LAYER + "self_attn.v_proj.bias",
        ("layers", "{i}", "attn", "v_bias"),
        _split_bias("num_kv_heads"),
        _merge_bias,
    ),
    WeightRule(_LAYER + "self_attn.o_proj.weight", ("layers", "{i}", "attn", "o_kernel"), _o_in, _o_out),
    WeightRule(_LAYER + "mlp.gate_proj.weight", ("layers", "{i}", "mlp", "gate_kernel"), transpose, transpose),
    WeightRule(_LAYER + "mlp.up_proj.weight", ("layers", "{i}", "mlp", "up_kernel"), transpose, transpose),
    WeightRule(_LAYER + "mlp.down_proj.weight", ("layers", "{i}", "mlp", "down_kernel"), transpose, transpose),
)


def expected_weights(cfg: Qwen2Config) -> Iterator[tuple[str, tuple, WeightRule]]:
    """Every (HF key, state path, rule) the config needs."""
    for rule in KEY_MAP:
        if rule.hf_key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        for key, path in rule.expand(cfg.num_layers):
            yield key, path, rule


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


# --- load -----------------------------------------------------------------------------------------
def load_hf_checkpoint(
    path: str, cfg: Qwen2Config | None = None, mesh: Mesh | None = None, rules=None, **cfg_overrides
) -> Qwen2:
    """Loads an HF Qwen2/Qwen2.5 checkpoint directory into a `Qwen2` model.

    With a mesh, every parameter is created directly with its sharding from the logical-axis
    rules. `cfg_overrides` (e.g. param_dtype="bfloat16", remat=True) adjust the config read from
    the directory's config.json.
    """
    ckpt = HFCheckpoint(path)
    cfg = cfg or Qwen2Config.from_hf_config(path, **cfg_overrides)
    model = abstract_model(cfg)
    state = nnx.state(model)
    shardings = shd.state_shardings(state, mesh, rules) if mesh is not None else None

    needed = list(expected_weights(cfg))
    needed_keys = {k for k, _, _ in needed}
    have = ckpt.keys()
    missing = sorted(needed_keys - have)
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} weight(s) the config needs, e.g. {missing[:5]}; "
            "is config.json from the same model as the weights?"
        )
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(k for k in have - needed_keys - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise CheckpointError(
            f"{path} has {len(unexpected)} weight(s) this Qwen2 config does not use, e.g. "
            f"{unexpected[:5]}; check num_hidden_layers and tie_word_embeddings in config.json"
        )

    dtype = cfg.jnp_param_dtype
    for hf_key, spath, rule in needed:
        var = _get_path(state, spath)
        want = tuple(var.get_value().shape)
        hf_shape = tuple(ckpt.shape(hf_key))
        try:
            host = rule.to_jax(ckpt.get(hf_key), cfg)
        except ValueError as e:
            raise CheckpointError(f"{hf_key}: shape {hf_shape} does not fit the config ({e})") from None
        if tuple(host.shape) != want:
            raise CheckpointError(
                f"{hf_key}: checkpoint shape {hf_shape} maps to {tuple(host.shape)}, but the config "
                f"needs {want}; config.json and the weights disagree"
            )
        host = host.astype(dtype) if host.dtype != dtype else host
        if shardings is None:
            var.set_value(jax.device_put(np.ascontiguousarray(host)))
        else:
            sharding: NamedSharding = _get_path(shardings, spath)
            # Each process builds only its own shards, straight from the memory-mapped tensor.
            var.set_value(
                jax.make_array_from_callback(want, sharding, lambda idx, h=host: np.ascontiguousarray(h[idx]))
            )
    nnx.update(model, state)
    return model


# --- export ---------------------------------------------------------------------------------------
def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def export_hf_checkpoint(
    model: Qwen2,
    out_dir: str,
    tokenizer_dir: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 4 * 2**30,
) -> str:
    """Writes an HF directory (safetensors + config.json [+ tokenizer files]) that
    `transformers.Qwen2ForCausalLM.from_pretrained` loads. On several hosts every process must
    call it (the gathers are collective); only process 0 writes."""
    cfg: Qwen2Config = model.cfg
    state = nnx.state(model)
    np_dtype = (
        np.dtype(ml_dtypes.bfloat16)
        if (dtype or cfg.param_dtype) == "bfloat16"
        else np.dtype(dtype or cfg.param_dtype)
    )
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for hf_key, spath, rule in expected_weights(cfg):
        host = rule.to_hf(_to_host(_get_path(state, spath).get_value()), cfg).astype(np_dtype)
        if size and size + host.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][hf_key] = np.ascontiguousarray(host)
        size += host.nbytes
    if not writer:
        return out_dir

    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0], {"format": "pt"})
    else:
        weight_map = {}
        total = 0
        for n, part in enumerate(shards, 1):
            fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(out_dir, fname), part, {"format": "pt"})
            weight_map.update({k: fname for k in part})
            total += sum(a.nbytes for a in part.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg = cfg.to_hf_config()
    hf_cfg["torch_dtype"] = str(np_dtype) if np_dtype != np.dtype(ml_dtypes.bfloat16) else "bfloat16"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.exists(p) and os.path.abspath(p) != os.path.abspath(os.path.join(dst, name)):
            shutil.copy(p, os.path.join(dst, name))
            copied.append(name)
    return copied
