"""What the trainer builds, built abstractly: no weights, no data, no tokenizer download.

`build_abstract` makes, from a training config and a list of devices (real, or a TPU topology's),
the mesh, the model structure, the sampler, the updater and the optimizer through the same code
the trainer uses (policy.model_overrides, sharding.state_shardings, update.make_optimizer,
update.PolicyUpdater, sampling.Sampler), with parameters and optimizer state as
ShapeDtypeStructs that carry the shardings the real arrays get.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tspo_jax import rollout, sampling
from tspo_jax import sharding as shd
from tspo_jax import update as update_lib
from tspo_jax.model import qwen2
from tspo_jax.policy import model_overrides
from tspo_jax.stop_strings import build_stop_table
from tspo_jax.tokenizer import load_tokenizer

# A placeholder checkpoint (an unset $TSPO_MODEL_DIR) has no config.json: the released shapes of
# model.arch with the Qwen2.5 vocabulary stand in for it.
QWEN25_VOCAB = 151936


@dataclasses.dataclass
class AbstractRun:
    config: ml_collections.ConfigDict
    mesh: Mesh
    model_cfg: qwen2.Qwen2Config
    graphdef: nnx.GraphDef
    params: nnx.State  # ShapeDtypeStruct leaves with shardings
    opt_state: object
    ref_params: nnx.State | None
    sampler: sampling.Sampler
    updater: update_lib.PolicyUpdater
    tx: optax.GradientTransformation


def model_config(cfg: ml_collections.ConfigDict) -> qwen2.Qwen2Config:
    """config.model -> Qwen2Config, as policy.build_policy would make it, without reading weights."""
    overrides = model_overrides(cfg)
    ckpt = os.path.expanduser(cfg.checkpoint or "")
    if ckpt and os.path.isfile(os.path.join(ckpt, "config.json")):
        return qwen2.Qwen2Config.from_hf_config(ckpt, **overrides)
    arch = dict(cfg.arch.to_dict()) if hasattr(cfg.arch, "to_dict") else dict(cfg.arch)
    if "vocab_size" not in arch:
        # build_policy takes a fresh model's vocabulary from its tokenizer (a local directory).
        arch["vocab_size"] = load_tokenizer(cfg.tokenizer).vocab_size if cfg.tokenizer else QWEN25_VOCAB
    return qwen2.Qwen2Config(**arch, **overrides)


def mesh_for(shape, devices) -> Mesh:
    return shd.make_mesh(tuple(shape), devices=devices)


def with_shardings(values, shardings):
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), values, shardings)


def abstract_params(model_cfg: qwen2.Qwen2Config, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    model = qwen2.abstract_model(model_cfg)
    state = nnx.state(model, nnx.Param)
    shardings = shd.state_shardings(state, mesh)

    def place(var, s):
        v = var.get_value()
        return var.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))

    return nnx.graphdef(model), jax.tree.map(place, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_opt_state(tx: optax.GradientTransformation, params, mesh: Mesh):
    """tx.init's output with the shardings the trainer's state gets. On live sharded params, each
    Adam moment (a tree shaped like the params) comes out sharded like its parameter; the rest
    (the step count) is replicated by Trainer._on_mesh. jax.eval_shape drops shardings, and a
    compiled tx.init does not propagate them to its zeros, so they are put back here."""
    shapes = jax.eval_shape(tx.init, params)
    param_def = jax.tree.structure(params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, P())

    def like_params(x):
        return jax.tree.structure(x) == param_def

    def place(sub):
        if like_params(sub):
            return with_shardings(sub, param_shardings)
        return jax.ShapeDtypeStruct(sub.shape, sub.dtype, sharding=replicated)

    return jax.tree.map(place, shapes, is_leaf=like_params)


def planning_stop_table(vocab: int):
    """The rollout's stop strings over a byte-level stand-in vocabulary: the same automaton size
    (states x vocab table) as with the real tokenizer, whose files the planner does not need."""
    token_bytes = [bytes([i]) for i in range(256)] + [b""] * max(vocab - 256, 0)
    return build_stop_table(rollout.STOP_STRINGS, token_bytes[:vocab])


def build_abstract(config: ml_collections.ConfigDict, devices) -> AbstractRun:
    mesh = mesh_for(config.mesh.shape, devices)
    model_cfg = model_config(config.model)
    graphdef, params = abstract_params(model_cfg, mesh)
    tx, _ = update_lib.make_optimizer(config.optim, config.total_steps)
    opt_state = abstract_opt_state(tx, params, mesh)
    ref = params if config.loss.kl_coef else None
    sampler = sampling.Sampler(graphdef, model_cfg, eos_ids=[0], pad_id=0,
                               stop_table=planning_stop_table(model_cfg.vocab_size), mesh=mesh)
    updater = update_lib.PolicyUpdater(
        graphdef, model_cfg, config.loss, tx, mesh,
        temperature=1.0 if config.rollout.greedy else config.rollout.temperature,
        micro_batch=config.micro_batch, tokenizer_vocab=model_cfg.vocab_size,
        logprob_micro_batch=config.get("logprob_micro_batch"))
    return AbstractRun(config, mesh, model_cfg, graphdef, params, opt_state, ref, sampler, updater, tx)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs (each leaf by its sharding's shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total
