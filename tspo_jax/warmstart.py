"""An optional supervised warm start before RL.

The warm start trains the policy on demonstration episodes (scripted Search-R1-style episodes
whose observations come from the real retriever), so that a small policy trained from scratch
can produce the tags before RL starts. Observation tokens are masked out of the loss, exactly
as in RL, and are tokenized by the same function the rollout uses.

The demonstrations come from the function `warmstart.demonstrations` names ("module:function"),
so the trainer knows no task: it is called as fn(example, search_fn) with search_fn(query) ->
[(title, text), ...] and returns [(role, text), ...] segments, role "policy" (trained on) or
"observation" (the environment's `<information>` block, masked); it raises LookupError when the
retriever missed a passage the demonstration needs (the example is skipped). It may instead return
a list of such episodes (alternative demonstrations of one question): each warm-start row then
draws a question uniformly and one of its episodes uniformly, so a converged policy takes the
alternatives in their proportions.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time

import ml_collections
import numpy as np

from tspo_jax import checkpointing, paths, rollout
from tspo_jax import update as update_lib
from tspo_jax.retrieval import OBSERVATION_HEAD, OBSERVATION_TAIL
from tspo_jax.runtime import Runtime

log = logging.getLogger(__name__)

POLICY, OBSERVATION = "policy", "observation"  # the roles of a demonstration's segments


@dataclasses.dataclass
class Demonstration:
    """A demonstration episode in the rollout's layout (what pack_episodes reads)."""

    tokens: list[int]
    loss_mask: list[int]

    @property
    def turn_ids(self) -> list[int]:
        return [0] * len(self.tokens)

    @property
    def logprobs(self) -> list[float]:
        return [0.0] * len(self.tokens)


def load_builder(name: str):
    """"package.module:function" -> the function."""
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"warmstart.demonstrations={name!r} must be 'package.module:function'")
    return getattr(importlib.import_module(module), attr)


def _is_episode(segments) -> bool:
    return all(isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) for s in segments)


def demonstration_episodes(examples, tokenizer, retriever, rollout_cfg: rollout.RolloutConfig,
                           builder) -> list[list[Demonstration]]:
    """One list of demonstrations per example the builder scripts (skipped ones left out)."""
    def search_fn(query):
        return [(d.title, d.text) for d in retriever.search([query], rollout_cfg.docs_per_search)[0]]

    out, skipped = [], 0
    for ex in examples:
        try:
            built = builder(ex, search_fn)
        except LookupError:
            skipped += 1
            continue
        variants = [built] if _is_episode(built) else list(built)
        if not variants:
            raise ValueError(f"the demonstration builder returned no episode for {ex.uid!r}")
        out.append([_tokenize(ex, segments, tokenizer, rollout_cfg) for segments in variants])
    log.info("warm start: demonstrations for %d questions, %d episodes (%d skipped: no demonstration)",
             len(out), sum(map(len, out)), skipped)
    return out


def _tokenize(ex, segments, tokenizer, rollout_cfg) -> Demonstration:
    tokens = rollout.build_prompt(tokenizer, ex.policy_input, rollout_cfg)
    mask = [0] * len(tokens)
    for role, text in segments:
        if role == OBSERVATION:
            body = text[len(OBSERVATION_HEAD) : -len(OBSERVATION_TAIL)]
            ids = rollout.observation_ids(tokenizer, body, rollout_cfg.max_obs_length)
            mask += [0] * len(ids)
        elif role == POLICY:
            ids = tokenizer.encode(text)
            mask += [1] * len(ids)
        else:
            raise ValueError(f"a demonstration segment has role {role!r}: use {POLICY!r} or {OBSERVATION!r}")
        tokens += ids
    return Demonstration(tokens, mask)


def sft_optimizer_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The optim section the warm start trains with: AdamW, no weight decay, warm-up over a tenth
    of its steps, then cosine decay to 0 (the end of the warm start takes small steps, so the
    policy it hands RL does not depend on its last few batches); clipped at norm 1."""
    return ml_collections.ConfigDict(dict(
        lr=cfg.lr, schedule="cosine", warmup_ratio=0.0, warmup_steps=max(cfg.steps // 10, 1),
        weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0))


def maybe_warm_start(rt: Runtime, cfg: ml_collections.ConfigDict):
    """The run's params after the warm start: loaded if already done, else trained and saved."""
    if not cfg.steps:
        return rt.params
    directory = paths.resolve(cfg.from_dir or paths.resolve(rt.workdir) / "warmstart")
    target = str(directory / "params")
    if (directory / "params").exists():
        params = checkpointing.restore_tree(target, rt.abstract_params())
        log.info("warm start loaded from %s", directory)
        return params
    if cfg.from_dir:
        raise FileNotFoundError(f"warmstart.from_dir={cfg.from_dir!r} holds no warm start (no {target})")

    tx, schedule = update_lib.make_optimizer(sft_optimizer_config(cfg), cfg.steps)
    updater = dataclasses.replace(rt.updater, tx=tx, temperature=1.0)
    demos = demonstration_episodes(rt.train_examples, rt.tokenizer, rt.retriever, rt.rollout_cfg,
                                   load_builder(cfg.demonstrations))
    if not demos:
        raise ValueError("the warm start found no demonstration episodes; set warmstart.steps=0")
    width = max(len(d.tokens) for variants in demos for d in variants)
    width = -(-width // 64) * 64
    rng = np.random.default_rng(cfg.seed)
    params, opt_state = rt.params, tx.init(rt.params)
    rows = cfg.batch_size
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = rng.choice(len(demos), size=rows, replace=len(demos) < rows)
        picks = [demos[i][int(rng.integers(len(demos[i])))] for i in idx]
        batch = update_lib.pack_episodes(picks, width=width)
        # The warm start's own warm-up, one rate per SFT step (as the optimizer's count gave it).
        params, opt_state, m = updater.sft_step(params, opt_state, updater.shard(batch), lr=schedule(step))
        if step % max(cfg.steps // 10, 1) == 0 or step == cfg.steps - 1:
            log.info("warm start step %d/%d: loss %.4f", step + 1, cfg.steps, float(m["sft/loss"]))
    log.info("warm start: %d steps in %.1f s", cfg.steps, time.perf_counter() - t0)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointing.save_tree(target, params)
    return params
