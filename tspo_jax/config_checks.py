"""Validation of a training config before any compute: every bad key or value is named with its fix.

ml_collections already refuses unknown keys on the command line (--config.foo=1); this checks
values and the relations between them.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from tspo_jax import advantages, losses, rewards, rollout

REQUIRED_SECTIONS = ("model", "data", "retriever", "rollout", "warmstart", "reward", "advantage", "loss", "optim",
                     "eval", "mesh")


class ConfigError(ValueError):
    pass


def _positive(c, *names):
    for n in names:
        v = c[n]
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"config.{n}={v!r} must be a positive integer")


def validate_config(c: ml_collections.ConfigDict) -> None:
    missing = [s for s in REQUIRED_SECTIONS if s not in c]
    if missing:
        raise ConfigError(f"config lacks the section(s) {missing}; start from configs/demo.py")
    _positive(c, "total_steps", "prompts_per_step", "group_size", "mini_batch", "micro_batch", "ppo_epochs",
              "checkpoint_every", "keep_checkpoints")
    if c.mini_batch % c.micro_batch:
        raise ConfigError(f"mini_batch={c.mini_batch} must be a multiple of micro_batch={c.micro_batch}")
    rows = c.prompts_per_step * c.group_size
    if rows % c.mini_batch:
        raise ConfigError(f"prompts_per_step * group_size = {rows} trajectories must be a multiple of "
                          f"mini_batch={c.mini_batch}")
    for name, path in (("data.train", c.data.train), ("data.test", c.data.test)):
        if path and not os.path.exists(os.path.expanduser(path)):
            raise ConfigError(f"{name}={path!r} does not exist: point it at a Search-R1 parquet or JSONL file")
    if not c.data.train:
        raise ConfigError("data.train is empty: point it at a Search-R1 parquet or JSONL file")
    if c.retriever.corpus and not c.retriever.spec and not os.path.exists(os.path.expanduser(c.retriever.corpus)):
        raise ConfigError(f"retriever.corpus={c.retriever.corpus!r} does not exist")
    if c.retriever.mode not in ("scann", "exact", "auto"):
        raise ConfigError(f"retriever.mode={c.retriever.mode!r}: choose scann, exact or auto")
    try:
        rcfg = rollout.RolloutConfig(**c.rollout.to_dict())
    except TypeError as e:
        raise ConfigError(f"config.rollout has a key RolloutConfig does not know: {e}") from None
    except ValueError as e:
        raise ConfigError(f"config.rollout: {e}") from None
    if c.reward.num_turns < rcfg.max_turns + 1:
        raise ConfigError(f"reward.num_turns={c.reward.num_turns} must be >= rollout.max_turns + 1 = {rcfg.max_turns + 1}")
    for mod, section in ((rewards, "reward"), (advantages, "advantage"), (losses, "loss")):
        try:
            mod.validate_config(c[section])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"config.{section}: {e}") from None
    if c.optim.schedule not in ("constant", "cosine"):
        raise ConfigError(f"optim.schedule={c.optim.schedule!r}: choose constant or cosine")
    if not c.optim.lr > 0:
        raise ConfigError(f"optim.lr={c.optim.lr} must be > 0")
    shape = tuple(c.mesh.shape)
    if len(shape) != 3:
        raise ConfigError(f"mesh.shape={shape} must have 3 entries (data, fsdp, tensor)")
    n = 1
    for s in shape:
        n *= s if s != -1 else 1
    if -1 not in shape and n != jax.device_count():
        raise ConfigError(f"mesh.shape={shape} needs {n} devices but {jax.device_count()} are visible; "
                          "use -1 for one axis")
    batch_devices = jax.device_count() // (shape[2] if shape[2] != -1 else 1)
    if -1 not in shape[:2]:
        batch_devices = shape[0] * shape[1]
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
    chunk = c.model.get("attention_chunk", 1)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ConfigError(f"model.attention_chunk={chunk!r} must be a positive int (query positions per "
                          "attention chunk; 64 suits CPU)")
    if c.model.checkpoint and not os.path.isdir(os.path.expanduser(c.model.checkpoint)):
        raise ConfigError(f"model.checkpoint={c.model.checkpoint!r} is not a directory: give an HF checkpoint "
                          "directory, or '' to train a fresh model of shape model.arch")
