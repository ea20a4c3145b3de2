"""Orbax checkpoints of the whole training state: params, optimizer state, step, RNG, data position.

Arrays are saved sharded (each host writes its own shards) and restored straight into the
shardings of an abstract target, so a run resumes on the same mesh without a host copy. The
data position and anything else JSON-able travel beside them in the same checkpoint step, so a
step directory is complete or absent (Orbax finalises it atomically).

Faults: a step that cannot be read back (a truncated or missing array file) is named in one log
line, moved aside to `corrupt.STEP` and the newest intact step is restored instead; Orbax deletes
an old step only after a newer one is finalised, so the last good step survives a crash at any
point of a save, async or not. The directory may be local or remote (gs://): see paths.py.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from tspo_jax import paths

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the step series inside a training workdir
CORRUPT_PREFIX = "corrupt."  # unreadable steps are renamed to this (not a step name Orbax reads)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message names the step, the file and the fix."""


def restore_error_reason(e: BaseException) -> str:
    """One readable line from the exception chain of a failed restore: the array and the cause."""
    texts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(texts)
    array = next((p for p in re.findall(r"'path': '([^']+?)/?'", text) if "/" not in p.rstrip("/")), None)
    cause = re.search(r"\b(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|FAILED_PRECONDITION)\b:?[^\n]{0,200}", text)
    first = next((line.strip() for line in texts[-1].splitlines() if line.strip()), type(e).__name__)
    parts = []
    if array:
        parts.append(f"array {array!r}")
    parts.append(cause.group(0).strip() if cause else first[:200])
    return ": ".join(parts)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1, async_save: bool = False):
        self.directory = str(paths.resolve(directory))
        self.async_save = bool(async_save)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                               enable_async_checkpointing=self.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts (async) or completes (sync) the save of `step`; False when the interval skips it."""
        saved = self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=force)
        if saved:
            if not self.async_save:
                self.manager.wait_until_finished()
            log.info("%s checkpoint %d to %s", "saving" if self.async_save else "saved", step, self.directory)
        return saved

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores `step` (default: the latest) into `abstract_state`'s structure, dtypes and
        shardings (ShapeDtypeStructs). An unreadable step is a CheckpointError naming it."""
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._read(step, ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                       meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def _read(self, step: int, args):
        """manager.restore of one step; any failure is a CheckpointError naming the step and cause."""
        try:
            return self.manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types; all mean unreadable
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is unreadable ({restore_error_reason(e)})") from e

    def restore_latest_intact(self, abstract_state: Any, *, fallback: bool = True) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest step that reads back, or None without checkpoints.

        With `fallback`, an unreadable step is logged in one line, moved aside to corrupt.STEP
        (so a resumed run can write that step again, and it is not counted against `keep`), and
        the next older step is tried. Without it, the first unreadable step is an error."""
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(abstract_state, step)
            except CheckpointError as e:
                if not fallback:
                    raise CheckpointError(
                        f"{e}. Set --config.restore_fallback=True to resume from the newest intact step, or move "
                        f"{self.directory}/{step} away") from None
                aside = self._set_aside(step)
                log.error("%s; moved it to %s and falling back to the previous step", e, aside)
                continue
            return step, state, meta
        return None

    def _set_aside(self, step: int) -> str:
        if jax.process_index() == 0:  # one process renames; the others wait below
            src = paths.resolve(self.directory) / str(step)
            dst = src.parent / f"{CORRUPT_PREFIX}{step}"
            if dst.exists():
                dst.rmtree()
            paths.move_dir(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"tspo_jax: checkpoint {step} set aside")
        self.manager.reload()
        return f"{self.directory}/{CORRUPT_PREFIX}{step}"

    def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
        """Only the params of a step (latest by default), into `abstract_params`' shardings; the
        optimizer state stays on disk (a partial restore: inference and evaluation need no more)."""
        self.manager.wait_until_finished()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory} holds no finished checkpoint step: train first")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"{self.directory} has no checkpoint of step {step}; it holds {self.all_steps()}")
        target = {"params": abstract_params}
        restored = self._read(step, ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
        return restored["state"]["params"], step

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """The params of a training workdir's checkpoint step (latest by default) and that step."""
    directory = paths.resolve(workdir) / CHECKPOINTS
    if not directory.is_dir():
        raise FileNotFoundError(f"training workdir {workdir} has no {CHECKPOINTS}/ directory yet: train first")
    checkpointer = Checkpointer(str(directory))
    try:
        return checkpointer.restore_params(abstract_params, step)
    finally:
        checkpointer.close()


def save_tree(path: str, tree: Any) -> None:
    """A single pytree (e.g. warm-started params) in its own directory, outside any step series."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(str(paths.resolve(path)), tree)
    ckptr.wait_until_finished()


def restore_tree(path: str, abstract_tree: Any) -> Any:
    """What `save_tree` wrote, into `abstract_tree`'s structure, dtypes and shardings."""
    return ocp.StandardCheckpointer().restore(str(paths.resolve(path)), abstract_tree)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a live pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
