"""Before RL: the retrieval index the run needs, and an optional supervised warm start.

The warm start trains the policy on demonstration episodes (scripted Search-R1-style episodes
whose observations come from the real retriever), so that a small policy trained from scratch
can produce the tags before RL starts. Observation tokens are masked out of the loss, exactly
as in RL, and are tokenized by the same function the rollout uses.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from tspo_jax import rollout
from tspo_jax import update as update_lib
from tspo_jax.checkpointing import abstract_like

log = logging.getLogger(__name__)


def ensure_index(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """retriever.spec if given (URL or index dir); else an index of retriever.corpus, built once."""
    if cfg.spec:
        return cfg.spec
    if not cfg.corpus:
        raise ValueError("set retriever.spec (a URL or an index directory) or retriever.corpus (a JSONL to index)")
    index_dir = os.path.expanduser(cfg.index_dir or os.path.join(workdir, "index"))
    # Process 0 builds while the others wait; a process whose disk does not share index_dir then
    # builds its own copy (the retriever runs on every host).
    if jax.process_index() == 0:
        _build_index_if_missing(cfg, index_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tspo_jax: retrieval index built")
        _build_index_if_missing(cfg, index_dir)
    return index_dir


def _build_index_if_missing(cfg: ml_collections.ConfigDict, index_dir: str) -> None:
    if os.path.exists(os.path.join(index_dir, "manifest.json")):
        return
    from tspo_jax.retrieval.build_index import build_index

    log.info("building the %s index of %s into %s", cfg.mode, cfg.corpus, index_dir)
    build_index(cfg.corpus, index_dir, mode=cfg.mode, overwrite=True, progress=False)


# --- supervised warm start ------------------------------------------------------------------------
class _Demo:
    """A demonstration episode in the rollout's layout (what pack_episodes reads)."""

    def __init__(self, tokens, loss_mask):
        self.tokens, self.loss_mask = tokens, loss_mask
        self.turn_ids = [0] * len(tokens)
        self.logprobs = [0.0] * len(tokens)


def demonstration_episodes(examples, tokenizer, retriever, rollout_cfg: rollout.RolloutConfig) -> list[_Demo]:
    from tspo_jax.demo_task import OBSERVATION, DemonstrationUnavailable, demonstrations

    def search_fn(query):
        return [(d.title, d.text) for d in retriever.search([query], rollout_cfg.topk)[0]]

    head, tail = "\n\n<information>", "</information>\n\n"
    out, skipped = [], 0
    for ex in examples:
        try:
            segments = demonstrations(ex, search_fn)
        except DemonstrationUnavailable:
            skipped += 1
            continue
        tokens = rollout.build_prompt(tokenizer, ex.policy_input, rollout_cfg)
        mask = [0] * len(tokens)
        for role, text in segments:
            if role == OBSERVATION:
                body = text[len(head) : -len(tail)]
                ids = rollout.observation_ids(tokenizer, body, rollout_cfg.max_obs_length)
                mask += [0] * len(ids)
            else:
                ids = tokenizer.encode(text)
                mask += [1] * len(ids)
            tokens += ids
        out.append(_Demo(tokens, mask))
    log.info("warm start: %d demonstration episodes (%d skipped: retrieval missed a needed passage)",
             len(out), skipped)
    return out


def maybe_warm_start(trainer, cfg: ml_collections.ConfigDict):
    """The trainer's params after the warm start: loaded if already done, else trained and saved."""
    if not cfg.steps:
        return trainer.params
    directory = os.path.abspath(os.path.expanduser(cfg.from_dir or os.path.join(trainer.workdir, "warmstart")))
    ckptr = ocp.StandardCheckpointer()
    target = os.path.join(directory, "params")
    if os.path.exists(target):
        params = ckptr.restore(target, abstract_like(trainer.params))
        log.info("warm start loaded from %s", directory)
        return params
    if cfg.from_dir:
        raise FileNotFoundError(f"warmstart.from_dir={cfg.from_dir!r} holds no warm start (no {target})")

    sft_tx = optax.chain(optax.clip_by_global_norm(1.0),
                         optax.adamw(optax.warmup_constant_schedule(0.0, cfg.lr, max(cfg.steps // 10, 1)),
                                     weight_decay=0.0))
    updater = update_lib.PolicyUpdater(trainer.graphdef, trainer.model_cfg, trainer.config.loss, sft_tx,
                                       trainer.mesh, tokenizer_vocab=trainer.sampler.tokenizer_vocab)
    demos = demonstration_episodes(trainer.train_examples, trainer.tokenizer, trainer.retriever,
                                   trainer.rollout_cfg)
    if not demos:
        raise ValueError("the warm start found no demonstration episodes; set warmstart.steps=0")
    width = max(len(d.tokens) for d in demos)
    width = -(-width // 64) * 64
    rng = np.random.default_rng(cfg.seed)
    params, opt_state = trainer.params, sft_tx.init(trainer.params)
    rows = cfg.batch_size
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = rng.choice(len(demos), size=rows, replace=len(demos) < rows)
        batch = update_lib.pack_episodes([demos[i] for i in idx], width=width)
        params, opt_state, m = updater.sft_step(params, opt_state, updater.shard(batch))
        if step % max(cfg.steps // 10, 1) == 0 or step == cfg.steps - 1:
            log.info("warm start step %d/%d: loss %.4f", step + 1, cfg.steps, float(m["sft/loss"]))
    log.info("warm start: %d steps in %.1f s", cfg.steps, time.perf_counter() - t0)
    os.makedirs(directory, exist_ok=True)
    ckptr.save(target, params)
    ckptr.wait_until_finished()
    return params
