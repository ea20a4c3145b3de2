"""The policy's model and tokenizer, from an HF checkpoint, a training workdir, or scratch."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from tspo_jax import paths
from tspo_jax import sharding as shd
from tspo_jax.checkpointing import restore_params
from tspo_jax.model import params as params_lib
from tspo_jax.model import qwen2
from tspo_jax.tokenizer import load_tokenizer

POLICY_CONFIG = "policy_config.json"  # written into a workdir: how to rebuild its model
# The whole run config, also in the workdir. Not config.json: a directory holding that is read as
# an HF checkpoint.
RUN_CONFIG = "run_config.json"


def save_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        paths.write_text(paths.resolve(workdir) / RUN_CONFIG, config.to_json_best_effort(indent=2))


def saved_rollout(workdir: str) -> dict | None:
    """The rollout settings (prompt template, chat template, ...) a workdir was trained with, or
    None for a workdir written before they were saved."""
    path = paths.resolve(workdir) / RUN_CONFIG
    if not path.is_file():
        return None
    return paths.read_json(path).get("rollout")


def model_overrides(cfg: ml_collections.ConfigDict) -> dict:
    return dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, remat=cfg.remat,
                attention_chunk=cfg.get("attention_chunk", qwen2.Qwen2Config.attention_chunk),
                shard_activations=cfg.get("shard_activations", qwen2.Qwen2Config.shard_activations))


def build_policy(cfg: ml_collections.ConfigDict, mesh: Mesh) -> tuple[qwen2.Qwen2, object]:
    """config.model -> (sharded model, tokenizer).

    model.checkpoint: an HF directory (weights + tokenizer), or "" for a fresh model of shape
    model.arch with the tokenizer at model.tokenizer (the embedded demo)."""
    if cfg.checkpoint:
        if not os.path.isdir(cfg.checkpoint):
            raise FileNotFoundError(
                f"model.checkpoint={cfg.checkpoint!r} is not a directory: give an HF checkpoint directory "
                "(e.g. the one `python -m tspo_jax.model.build_offline_checkpoint` prints)")
        model = params_lib.load_hf_checkpoint(cfg.checkpoint, mesh=mesh, **model_overrides(cfg))
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.checkpoint)
        return model, tokenizer
    if not cfg.tokenizer:
        raise ValueError("model.checkpoint is empty, so model.tokenizer must name a tokenizer directory")
    tokenizer = load_tokenizer(cfg.tokenizer)
    arch = dict(cfg.arch.to_dict()) if hasattr(cfg.arch, "to_dict") else dict(cfg.arch)
    arch.setdefault("vocab_size", tokenizer.vocab_size)
    mcfg = qwen2.Qwen2Config(eos_token_id=tokenizer.eos_id, **arch, **model_overrides(cfg))
    model = qwen2.init_model(mcfg, seed=cfg.init_seed)
    shd.shard_model(model, mesh)
    return model, tokenizer


def save_policy_config(workdir: str, model: qwen2.Qwen2, tokenizer_dir: str) -> None:
    if jax.process_index() != 0:
        return
    saved = {"hf_config": model.cfg.to_hf_config(), "tokenizer": os.path.abspath(tokenizer_dir)}
    paths.write_text(paths.resolve(workdir) / POLICY_CONFIG, json.dumps(saved, indent=2))


def abstract_policy(workdir: str, **overrides) -> tuple[qwen2.Qwen2, str]:
    """The model structure a training workdir was trained with, and its tokenizer directory."""
    path = paths.resolve(workdir) / POLICY_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{workdir} is not a tspo_jax training workdir (no {POLICY_CONFIG})")
    saved = paths.read_json(path)
    cfg = qwen2.Qwen2Config.from_hf_config(saved["hf_config"], **overrides)
    return qwen2.abstract_model(cfg), saved["tokenizer"]


def params_of(model: nnx.Module) -> nnx.State:
    return nnx.state(model, nnx.Param)


GENERATION_CONFIG = "generation_config.json"
EXPORT_DTYPES = ("bfloat16", "float32")


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None) -> int:
    """Writes the policy of a training workdir's checkpoint (latest, or `step`) as an HF checkpoint
    directory: safetensors, config.json, the tokenizer files and generation_config.json. Returns
    the step. The parameters are restored on the host CPU (one process), so the model must fit in
    host memory; dtype: the written weights' dtype (None: the trained param_dtype)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {EXPORT_DTYPES}")
    run_path = os.path.join(workdir, RUN_CONFIG)
    param_dtype = "float32"
    if os.path.isfile(run_path):
        with open(run_path) as f:
            param_dtype = json.load(f).get("model", {}).get("param_dtype", param_dtype)
    # Compute in float32: the restored values are the checkpoint's whatever the compute dtype.
    abstract, tokenizer_dir = abstract_policy(workdir, param_dtype=param_dtype, dtype="float32")
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), params_of(abstract))
    params, step = restore_params(workdir, target, step)
    model = nnx.merge(nnx.graphdef(abstract), params)
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"{workdir}/{POLICY_CONFIG} names the tokenizer directory {tokenizer_dir}, "
                                "which no longer exists: restore it there to export")
    params_lib.export_hf_checkpoint(model, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype or param_dtype)
    if jax.process_index() == 0 and not os.path.isfile(os.path.join(out_dir, GENERATION_CONFIG)):
        # The tokenizer directory had none (an HF checkpoint's own is copied): HF's generate
        # and vLLM stop at these ids.
        tokenizer = load_tokenizer(tokenizer_dir)
        eos = sorted({tokenizer.eos_id, *([model.cfg.eos_token_id] if isinstance(model.cfg.eos_token_id, int)
                                          else list(model.cfg.eos_token_id or []))})
        with open(os.path.join(out_dir, GENERATION_CONFIG), "w") as f:
            json.dump({"eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": tokenizer.pad_id},
                      f, indent=2)
    return step
