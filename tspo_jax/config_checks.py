"""Validation of a training config before any compute: every bad key or value is named with its fix.

ml_collections already refuses unknown keys on the command line (--config.foo=1); this checks
values and the relations between them.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from tspo_jax import advantages, data, losses, rewards, rollout, update
from tspo_jax import sharding as shd
from tspo_jax.model import qwen2
from tspo_jax.retrieval import index as index_lib

REQUIRED_SECTIONS = ("model", "data", "retriever", "rollout", "warmstart", "reward", "advantage", "loss", "optim",
                     "eval", "mesh")


log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


def _positive(c, *names):
    for n in names:
        v = c[n]
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"config.{n}={v!r} must be a positive integer")


def _check_fault_settings(c: ml_collections.ConfigDict) -> None:
    if c.get("checkpoint_async", "auto") not in ("auto", True, False):
        raise ConfigError(f"checkpoint_async={c.checkpoint_async!r}: choose 'auto', True or False")
    if not isinstance(c.get("restore_fallback", True), bool):
        raise ConfigError(f"restore_fallback={c.restore_fallback!r} must be True or False")
    _positive(c, *[k for k in ("max_nonfinite_steps",) if k in c])
    outage = c.retriever.get("max_outage_s", 0.0)
    if isinstance(outage, bool) or not isinstance(outage, (int, float)) or outage < 0:
        raise ConfigError(f"retriever.max_outage_s={outage!r} must be a number of seconds >= 0")


def validate_config(c: ml_collections.ConfigDict, *, check_files: bool = True, device_count: int | None = None) -> None:
    """Raises ConfigError naming the first bad key. `check_files=False` (the abstract planner)
    skips the existence of data and corpus files; `device_count` replaces the visible devices'
    count (a mesh for a topology this host does not have)."""
    missing = [s for s in REQUIRED_SECTIONS if s not in c]
    if missing:
        raise ConfigError(f"config lacks the section(s) {missing}; start from configs/demo.py")
    _positive(c, "total_steps", "prompts_per_step", "group_size", "mini_batch", "micro_batch", "ppo_epochs",
              "checkpoint_every", "keep_checkpoints")
    if c.mini_batch % c.micro_batch:
        raise ConfigError(f"mini_batch={c.mini_batch} must be a multiple of micro_batch={c.micro_batch}")
    _check_fault_settings(c)
    rows = c.prompts_per_step * c.group_size
    if rows % c.mini_batch:
        raise ConfigError(f"prompts_per_step * group_size = {rows} trajectories must be a multiple of "
                          f"mini_batch={c.mini_batch}")
    for name, path in (("data.train", c.data.train), ("data.test", c.data.test)):
        if check_files and path and not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"{name}={path!r} does not exist: point it at a Search-R1 parquet or JSONL file")
    if not c.data.train:
        raise ConfigError("data.train is empty: point it at a Search-R1 parquet or JSONL file")
    if c.data.get("prompt_source") not in data.PROMPT_SOURCES:
        raise ConfigError(f"data.prompt_source={c.data.get('prompt_source')!r}: choose 'template' (the question in "
                          "rollout.template) or 'column' (each row's own `prompt` chat messages)")
    if check_files and c.retriever.corpus and not c.retriever.spec and not os.path.exists(os.path.expanduser(c.retriever.corpus)):
        raise ConfigError(f"retriever.corpus={c.retriever.corpus!r} does not exist")
    try:
        index_lib.validate_mode(c.retriever.mode)
    except ValueError as e:
        raise ConfigError(f"retriever.{e}") from None
    if c.retriever.spec and (c.retriever.corpus or c.retriever.index_dir):
        log.warning("retriever.spec=%r is set, so retriever.corpus, index_dir and mode are unused (they only "
                    "say how to build an index when spec is empty)", c.retriever.spec)
    if "topk" in c.rollout:
        raise ConfigError("rollout.topk was renamed rollout.docs_per_search (documents per search; top_k is "
                          "the sampling knob): rename the key")
    if "num_turns" in c.reward:
        raise ConfigError("reward.num_turns is gone: the reward's turn slots follow rollout.max_turns + 1; "
                          "delete the key")
    try:
        rcfg = rollout.RolloutConfig(**c.rollout.to_dict())
    except TypeError as e:
        raise ConfigError(f"config.rollout has a key RolloutConfig does not know: {e}") from None
    except ValueError as e:
        raise ConfigError(f"config.rollout: {e}") from None
    if c.warmstart.steps and ":" not in c.warmstart.get("demonstrations", ""):
        raise ConfigError(f"warmstart.steps={c.warmstart.steps} needs warmstart.demonstrations, the function that "
                          "scripts a demonstration ('package.module:function', e.g. "
                          "'tspo_jax.demo_task:demonstrations'), or warmstart.steps=0")
    for mod, section in ((rewards, "reward"), (advantages, "advantage"), (losses, "loss")):
        try:
            mod.validate_config(c[section])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"config.{section}: {e}") from None
    try:
        update.validate_optim(c.optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    devices = jax.device_count() if device_count is None else device_count
    try:
        shape = shd.resolve_mesh_shape(tuple(c.mesh.shape), devices)
    except ValueError as e:
        raise ConfigError(f"mesh.shape: {e}") from None
    batch_devices = shd.batch_devices(shape)
    lp_rows = c.get("logprob_micro_batch")
    if lp_rows is not None and (not isinstance(lp_rows, int) or lp_rows < 1 or rows % lp_rows):
        raise ConfigError(f"logprob_micro_batch={lp_rows!r} must be a positive divisor of the step's {rows} "
                          "trajectories (rows per reference/old-logprob slice), or None for micro_batch")
    checked = [("micro_batch", c.micro_batch), ("warmstart.batch_size", c.warmstart.batch_size)]
    if lp_rows:
        checked.append(("logprob_micro_batch", lp_rows))
    for name, value in checked:
        if value % batch_devices:
            raise ConfigError(f"{name}={value} must be a multiple of the data x fsdp devices "
                              f"({batch_devices}) the batch is split over")
    if rcfg.slots % batch_devices:
        raise ConfigError(f"rollout.slots={rcfg.slots} must be a multiple of the data x fsdp devices "
                          f"({batch_devices}) the decode slots are split over (0: one slot per row)")
    chunk = c.model.get("attention_chunk", 1)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ConfigError(f"model.attention_chunk={chunk!r} must be a positive int (query positions per "
                          "attention chunk; 64 suits CPU)")
    if check_files and c.model.checkpoint and not os.path.isdir(os.path.expanduser(c.model.checkpoint)):
        raise ConfigError(f"model.checkpoint={c.model.checkpoint!r} is not a directory: give an HF checkpoint "
                          "directory, or '' to train a fresh model of shape model.arch")
    if check_files and c.model.checkpoint:
        _check_arch_matches_checkpoint(c.model)


def _check_arch_matches_checkpoint(m: ml_collections.ConfigDict) -> None:
    """model.arch is not read when model.checkpoint is set (its config.json wins): say so loudly
    when they disagree, so nobody edits an arch that does nothing."""
    path = os.path.join(os.path.expanduser(m.checkpoint), "config.json")
    if not m.get("arch") or not os.path.isfile(path):
        return
    ckpt = qwen2.Qwen2Config.from_hf_config(path)
    differ = {k: (v, getattr(ckpt, k)) for k, v in m.arch.items() if hasattr(ckpt, k) and getattr(ckpt, k) != v}
    if differ:
        log.warning("model.arch is unused while model.checkpoint is set, and disagrees with %s on %s "
                    "(config value, checkpoint value): the checkpoint's shape is used", path, differ)
