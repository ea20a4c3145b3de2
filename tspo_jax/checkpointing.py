"""Orbax checkpoints of the whole training state: params, optimizer state, step, RNG, data position.

Arrays are saved sharded (each host writes its own shards) and restored straight into the
shardings of an abstract target, so a run resumes on the same mesh without a host copy. The
data position and anything else JSON-able travel beside them in the same checkpoint step, so a
step directory is complete or absent (Orbax finalises it atomically).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the step series inside a training workdir


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        saved = self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force)
        if saved:
            self.manager.wait_until_finished()
            log.info("saved checkpoint %d to %s", step, self.directory)
        return saved

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into `abstract_state`'s structure, dtypes and shardings (ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
        """Only the params of a step (latest by default), into `abstract_params`' shardings; the
        optimizer state stays on disk (a partial restore: inference and evaluation need no more)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory} holds no finished checkpoint step: train first")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"{self.directory} has no step {step}; it holds {sorted(self.manager.all_steps())}")
        target = {"params": abstract_params}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
        return restored["state"]["params"], step

    def close(self):
        self.manager.close()


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """The params of a training workdir's checkpoint step (latest by default) and that step."""
    directory = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"training workdir {workdir} has no {CHECKPOINTS}/ directory yet: train first")
    checkpointer = Checkpointer(directory)
    try:
        return checkpointer.restore_params(abstract_params, step)
    finally:
        checkpointer.close()


def save_tree(path: str, tree: Any) -> None:
    """A single pytree (e.g. warm-started params) in its own directory, outside any step series."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), tree)
    ckptr.wait_until_finished()


def restore_tree(path: str, abstract_tree: Any) -> Any:
    """What `save_tree` wrote, into `abstract_tree`'s structure, dtypes and shardings."""
    return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract_tree)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a live pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
