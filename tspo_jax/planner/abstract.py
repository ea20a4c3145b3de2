"""What the trainer builds, built abstractly: no weights, no data, no retriever.

`build_abstract` asks `runtime.Runtime.abstract` (the builder every entry point uses) for the run
on a mesh of the target's devices (real, or a TPU topology's): the model structure, the sampler,
the updater and the optimizer, with parameters and optimizer state as ShapeDtypeStructs that carry
the shardings the real arrays get.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from tspo_jax import sharding as shd
from tspo_jax.runtime import Runtime

log = logging.getLogger(__name__)

# Every Qwen2.5 size has this embedding vocabulary (151,665 tokens padded to a multiple of 128).
QWEN25_VOCAB = 151936


@dataclasses.dataclass
class AbstractRun:
    config: ml_collections.ConfigDict
    runtime: Runtime
    params: object  # ShapeDtypeStruct leaves with shardings
    opt_state: object
    ref_params: object | None
    slots: int = 0  # decode rows the rollout is planned at (0: rollout.slots, or all rows)

    @property
    def mesh(self) -> Mesh:
        return self.runtime.mesh

    @property
    def model_cfg(self):
        return self.runtime.model_cfg

    @property
    def sampler(self):
        return self.runtime.sampler

    @property
    def updater(self):
        return self.runtime.updater


def _with_vocab(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A pod config names a checkpoint that is not on this machine (e.g. an unset $TSPO_MODEL_DIR):
    the released Qwen2.5 shapes of model.arch then need the vocabulary, which all sizes share."""
    m = config.model
    readable = any(d and os.path.isfile(os.path.join(os.path.expanduser(d), f))
                   for d, f in ((m.checkpoint, "config.json"), (m.tokenizer or m.checkpoint, "tokenizer.json")))
    if readable or "vocab_size" in m.arch:
        return config
    log.info("model.checkpoint %r is not here: planning model.arch with the Qwen2.5 vocabulary (%d)",
             m.checkpoint, QWEN25_VOCAB)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.arch.vocab_size = QWEN25_VOCAB
    return config


def build_abstract(config: ml_collections.ConfigDict, devices, slots: int = 0) -> AbstractRun:
    mesh = shd.make_mesh(tuple(config.mesh.shape), devices=devices)
    rt = Runtime.abstract(_with_vocab(config), mesh=mesh)
    params = rt.abstract_params()
    ref = params if config.loss.kl_coef else None
    return AbstractRun(config, rt, params, rt.abstract_opt_state(), ref, slots)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs (each leaf by its sharding's shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total
