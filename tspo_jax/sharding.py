"""Device mesh, logical-axis rules, and the sharding of parameters and batches.

Mesh axes are (data, fsdp, tensor). Parameters are sharded over (fsdp, tensor) by the logical
names every parameter carries (`logical_axes` metadata, see model/qwen2.py); batches are sharded
over (data, fsdp). The same code runs on 1 CPU, 8 fake CPU devices, a GPU node or a TPU pod: the
mesh shape is the only thing that changes.

Multi-host, every process runs the same host-side Python on the same data: batches go onto the
mesh with `put_global` (each process copies its own shards) and come back whole with `to_host`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import zlib
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical parameter axis -> mesh axis (or None: replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
}

log = logging.getLogger(__name__)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) shape with its -1 entry (if any) filled from `num_devices`."""
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot fill mesh {shape}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {tuple(shape)} needs {math.prod(shape)} devices but {num_devices} are visible; "
            "change the mesh shape (one entry may be -1)"
        )
    return tuple(shape)


def batch_devices(mesh_or_shape) -> int:
    """Devices a batch is split over: data x fsdp."""
    if isinstance(mesh_or_shape, Mesh):
        return mesh_or_shape.shape["data"] * mesh_or_shape.shape["fsdp"]
    return mesh_or_shape[0] * mesh_or_shape[1]


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One entry may be -1: it takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
) -> P:
    """PartitionSpec for a parameter. A dimension the mesh axis does not divide is replicated
    (e.g. 2 KV heads on a tensor axis of 4), and a mesh axis is used at most once per array."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axes = rules.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def without_axis(sharding: NamedSharding, axis: str) -> NamedSharding:
    """The same layout with `axis` no longer splitting anything (replicated over it)."""
    if not isinstance(sharding, NamedSharding):  # one device: nothing to gather
        return sharding

    def drop(entry):
        if entry == axis:
            return None
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a != axis)
            return kept[0] if len(kept) == 1 else (kept or None)
        return entry

    return NamedSharding(sharding.mesh, P(*(drop(e) for e in sharding.spec)))


def _is_var(x):
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None):
    """NamedSharding for every variable of an NNX state, from its `logical_axes` metadata."""

    def one(var):
        axes = getattr(var, "logical_axes", None) or (None,) * len(var.get_value().shape)
        return NamedSharding(mesh, logical_to_spec(axes, var.get_value().shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Moves a model's parameters onto the mesh by their logical axes (in place) and returns it."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v.get_value(), state, is_leaf=_is_var)
    placed = jax.device_put(values, jax.tree.map(lambda s: s, shardings, is_leaf=_is_var))
    nnx.update(model, placed)
    return model


def activation_mesh(mesh: Mesh | None):
    """Context for tracing a model call: its activations may then be pinned to this mesh's axes
    (qwen2.constrain, model.shard_activations). Usable inside jit, where jax.set_mesh is not."""
    if mesh is None or mesh.size == 1:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def batch_spec(ndim: int) -> P:
    """Batch-major arrays: the leading axis over (data, fsdp), the rest replicated."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def shard_batch(tree, mesh: Mesh):
    """Places every array of a host batch on the mesh, split along its leading axis.

    Every process holds the same whole batch (host-side rollout runs on each); each copies only
    the rows its own devices hold."""
    return jax.tree.map(lambda x: put_global(x, batch_sharding(mesh, np.ndim(x))), tree)


def put_global(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array, the same on every process, as a jax.Array laid out by `sharding`."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    # Multi-process: device_put would first compare the whole array across processes (an
    # all-gather per array); each process copies its own shards instead.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(tree):
    """NumPy copies of a pytree of arrays, whole on every process.

    Multi-process, an array sharded over the mesh has shards on other hosts: they are gathered,
    since host-side Python (parsing, retrieval, packing) runs the same on every process."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def maybe_initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts multi-host JAX when asked to (explicit arguments, or JAX_COORDINATOR_ADDRESS /
    TSPO_NUM_PROCESSES in the environment; on Cloud TPU the arguments are auto-detected).
    Returns True when running with more than one process."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("TSPO_NUM_PROCESSES"):
        num_processes = int(os.environ["TSPO_NUM_PROCESSES"])
    if process_id is None and os.environ.get("TSPO_PROCESS_ID"):
        process_id = int(os.environ["TSPO_PROCESS_ID"])
    on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if coordinator_address or on_tpu_pod:
        if jax.config.jax_cpu_collectives_implementation is None:
            # CPU processes reach each other's devices only through a collectives library.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if not jax.distributed.is_initialized():
            jax.distributed.initialize(
                coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
            )
        log.info(
            "jax.distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
    return jax.process_count() > 1


def assert_same_on_all_processes(x: np.ndarray, what: str) -> None:
    """Fails loudly when host-side work that every process repeats gave different results
    (e.g. a retriever that differs between hosts): the processes would train on different data."""
    if jax.process_count() > 1:
        checksum = np.uint32(zlib.crc32(np.ascontiguousarray(x).tobytes()))
        multihost_utils.assert_equal(checksum, f"{what} differ between processes")
