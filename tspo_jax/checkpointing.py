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

    def close(self):
        self.manager.close()


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Only the policy parameters of a training checkpoint (the latest step, or `step`), into
    `abstract_params`' structure, dtypes and shardings; the optimizer state stays on disk."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints/ directory at {directory}: train first")
    checkpointer = Checkpointer(directory)
    try:
        steps = checkpointer.manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint step: train first")
        step = checkpointer.latest_step() if step is None else int(step)
        if step not in steps:
            raise FileNotFoundError(f"{directory} has no checkpoint of step {step}; it has steps {sorted(steps)}")
        target = {"params": abstract_params}
        restored = checkpointer.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,  # skip opt_state and step
                )
            ),
        )
    finally:
        checkpointer.close()
    return restored["state"]["params"], step


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a live pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
