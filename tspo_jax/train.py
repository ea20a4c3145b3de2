"""The main job: TSPO training of a search agent.

  python -m tspo_jax.train --config=configs/demo.py --workdir=runs/demo [--config.KEY=VALUE ...]

One step: prompts -> episodes (n per prompt, interrupt/resume rollout) -> rewards and FOLR turn
returns -> reference logprobs -> advantages -> ppo_epochs x mini-batches of the Optax update ->
metrics. The sampler reads the trainer's parameters in place (same arrays, same shardings).
A workdir that holds a checkpoint resumes from it; SIGTERM saves and exits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from tspo_jax import advantages as adv_lib
from tspo_jax import data, evaluation, host_memory, paths, rewards, rollout, run_flags
from tspo_jax import sharding as shd
from tspo_jax import update as update_lib
from tspo_jax import warmstart, xla_flags
from tspo_jax.metrics import MetricsWriter, plot_training, read_metrics
from tspo_jax.runtime import Runtime

log = logging.getLogger("tspo_jax.train")  # not __name__: it is __main__ under python -m


def episode_texts(episodes, examples_by_row) -> list[rewards.EpisodeText]:
    return [
        rewards.EpisodeText(
            question=ex.question, golds=list(ex.golds), data_source=ex.data_source,
            turn_texts=[t.text for t in ep.turns], observations=[t.retrieved_observation for t in ep.turns],
            response_text=ep.response_text)
        for ep, ex in zip(episodes, examples_by_row)
    ]


class Trainer:
    """The training loop over a Runtime (which holds everything the loop uses)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.rt = Runtime.build(config, workdir)
        self.config = config
        self.workdir = self.rt.workdir
        self.is_main = jax.process_index() == 0
        self.params = self.rt.params
        self.metrics = MetricsWriter(self.workdir, enabled=self.is_main)
        self._stop_requested = False

    # --- state ----------------------------------------------------------------------------------
    def train_state(self, step: int) -> dict:
        """What a checkpoint holds. The step is replicated on the mesh: Orbax cannot save a
        process-local array multi-host."""
        step = shd.put_global(np.int32(step), NamedSharding(self.rt.mesh, P()))
        return {"params": self.params, "opt_state": self.opt_state, "step": step}

    def init_or_restore(self) -> int:
        """Warm start (if configured), the frozen reference, then the latest checkpoint if any."""
        rt = self.rt
        self.params = warmstart.maybe_warm_start(rt, self.config.warmstart)
        # The reference policy is the initial policy: rebuilt the same way on every (re)start.
        self.ref_params = jax.tree.map(jnp.copy, self.params) if self.config.loss.kl_coef else None
        self.opt_state = rt.init_opt_state(self.params)
        self.stream = data.PromptStream(rt.train_examples, self.config.prompts_per_step, self.config.seed)
        found = rt.restore_latest_intact(fallback=self.config.get("restore_fallback", True))
        if found is None:
            self.metrics.truncate_after(-1)  # rows of a run killed before its first checkpoint
            return 0
        latest, self.params, self.opt_state, meta = found
        self.stream = data.PromptStream.from_state(rt.train_examples, meta["data"])
        self.metrics.truncate_after(latest)
        log.info("resumed from step %d in %s", latest, rt.checkpointer.directory)
        return latest

    def _save(self, step: int, data_state: dict, force: bool = False) -> bool:
        """Saves `step`; `data_state` is the prompt stream's position right after that step."""
        return self.rt.checkpointer.save(step, self.train_state(step), {"data": data_state, "step": step},
                                         force=force)

    # --- one step --------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        cfg = self.config
        timing = {}
        t_step = time.perf_counter()
        batch = next(self.stream)
        n = cfg.group_size
        rows = [ex for ex in batch for _ in range(n)]

        t0 = time.perf_counter()
        rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
        episodes = self.rt.runner.run(self.params_for_sampling(), [ex.policy_input for ex in batch],
                                   [ex.uid for ex in batch], n=n, rng=rng)
        timing["timing_s/gen"] = time.perf_counter() - t0
        timing["timing_s/retrieval"] = self.rt.runner.timing.get("retrieval", 0.0)
        host_memory.release_free_memory()  # the rollout's caches and temporaries (CPU hosts: see host_memory)

        t0 = time.perf_counter()
        rb = rewards.compute_rewards(episode_texts(episodes, rows), cfg.reward, num_turns=self.rt.rollout_cfg.num_turns)
        timing["timing_s/reward"] = time.perf_counter() - t0

        num_rows = len(episodes)  # validate_config: a multiple of the mini-batch, which divides the mesh
        packed = update_lib.pack_episodes(episodes)
        shd.assert_same_on_all_processes(packed["tokens"], "the episodes")
        group_ids = np.asarray([e.group for e in episodes], np.int32)

        t0 = time.perf_counter()
        # Host arrays: the updater slices rows by length and shards each slice itself.
        lp_batch = {"tokens": packed["tokens"], "valid": packed["valid"]}
        if self.ref_params is not None:
            packed["ref_logp"] = self.rt.updater.logprobs(self.ref_params, lp_batch)
        if cfg.recompute_old_logprobs:
            packed["old_logp"] = self.rt.updater.logprobs(self.params, lp_batch)
        timing["timing_s/ref"] = time.perf_counter() - t0
        host_memory.release_free_memory()

        t0 = time.perf_counter()
        dev = self.rt.updater.shard({"turn_ids": packed["turn_ids"], "loss_mask": packed["loss_mask"]})
        token_adv, adv_metrics = adv_lib.compute_advantages(
            cfg.advantage.name, rb.outcome, rb.turn_returns, rb.turn_valid, rb.first_occurrence, group_ids,
            dev["turn_ids"], dev["loss_mask"], num_groups=len(batch), eps=cfg.advantage.eps, correct=rb.em > 0)
        packed["advantages"] = shd.to_host(token_adv)
        timing["timing_s/adv"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        update_metrics = []
        order_rng = np.random.default_rng([cfg.seed, step])
        keys = [k for k in packed if k != "turn_ids"]
        for _ in range(cfg.ppo_epochs):
            perm = order_rng.permutation(num_rows)
            for s in range(0, num_rows, cfg.mini_batch):
                idx = perm[s : s + cfg.mini_batch]
                mb = {k: packed[k][idx] for k in keys}
                # One rate per training step (Search-R1 steps its scheduler per step; step 1 uses schedule(0)).
                self.params, self.opt_state, m = self.rt.updater.update(self.params, self.opt_state, mb,
                                                                     lr=self.rt.schedule(step - 1))
                update_metrics.append(m)
        jax.block_until_ready(self.params)
        timing["timing_s/update_actor"] = time.perf_counter() - t0
        host_memory.release_free_memory()
        timing["timing_s/step"] = time.perf_counter() - t_step

        metrics = {k: float(np.mean([float(m[k]) for m in update_metrics])) for k in update_metrics[0]}
        # A count, not a mean: how many of this step's updates were skipped as non-finite.
        metrics["actor/nonfinite_skips"] = float(sum(float(m["actor/nonfinite_skips"]) for m in update_metrics))
        metrics.update({k: float(v) for k, v in adv_metrics.items()})
        metrics.update(timing)
        n_tokens = int(packed["valid"].sum())
        resp = [len(e.tokens) - e.prompt_len for e in episodes]
        metrics.update({
            "critic/score/mean": float(rb.outcome.mean()),
            "critic/em/mean": float(rb.em.mean()),
            "critic/advantages/mean": float(packed["advantages"][packed["loss_mask"] > 0].mean()),
            "response_length/mean": float(np.mean(resp)),
            "env/turns/mean": float(np.mean([e.num_turns for e in episodes])),
            "env/searches/mean": float(np.mean([sum(t.action == "search" for t in e.turns) for e in episodes])),
            "env/answered_frac": float(np.mean([e.stop_reason == "answer" for e in episodes])),
            "perf/total_num_tokens": n_tokens,
            "perf/throughput": n_tokens / timing["timing_s/step"] / jax.device_count(),
            "perf/compiles": sum(self.rt.sampler.compile_counts.values()),
        })
        for src, v in adv_lib.reward_by_source(rb.outcome, [ex.data_source for ex in rows]).items():
            metrics[f"critic/score/{src}"] = v
        return metrics

    def params_for_sampling(self):
        """The trainer's own parameter arrays: the sampler runs on them in place, no copy."""
        return self.params

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, step: int, examples=None) -> dict:
        rt = self.rt
        examples = examples if examples is not None else rt.test_examples[: self.config.eval.max_examples]
        cfg = dataclasses.replace(rt.rollout_cfg, greedy=True)
        runner = rollout.EpisodeRunner(rt.sampler, rt.tokenizer, rt.retriever, cfg)
        result = evaluation.evaluate_examples(runner, self.params_for_sampling(), examples,
                                              batch_size=self.config.eval.batch_size)
        if self.is_main:
            evaluation.save_table(result, str(paths.resolve(self.workdir) / "eval"), f"step_{step}")
        return result

    # --- loop -------------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
        self._stop_requested = True

    def _preempted(self, step: int) -> bool:
        """Whether to save `step` and stop. Multi-host: JAX's preemption sync (the coordination
        service relays one host's SIGTERM to all, and every host answers True at the same step).
        One process: our own SIGTERM flag."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._stop_requested

    def train(self) -> dict:
        cfg = self.config
        start = self.init_or_restore()
        # Multi-host, JAX's preemption notifier owns SIGTERM: a handler of ours would replace it.
        own_handler = jax.process_count() == 1
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if own_handler else None
        last = {}
        # The last completed step and the prompt stream's position after it: what is saved if a
        # later step fails. `saved` is the newest step on disk (or being written).
        done, done_data, saved = start, self.stream.state(), start
        nonfinite_streak = 0
        try:
            if start == 0 and cfg.eval.every and self.rt.test_examples:
                last.update(_prefix(self.evaluate(0)["metrics"], "val/"))
                self.metrics.write(0, last)
            bar = tqdm(range(start + 1, cfg.total_steps + 1), initial=start, total=cfg.total_steps,
                       desc="tspo", disable=not self.is_main or not cfg.progress_bar)
            for step in bar:
                metrics = self.step(step)
                done, done_data = step, self.stream.state()
                if cfg.eval.every and self.rt.test_examples and (step % cfg.eval.every == 0 or step == cfg.total_steps):
                    metrics.update(_prefix(self.evaluate(step)["metrics"], "val/"))
                last = self.metrics.write(step, metrics)
                bar.set_postfix(reward=f"{metrics['critic/score/mean']:.3f}",
                                homog=f"{metrics['adv/homogenized_group_frac']:.2f}")
                nonfinite_streak = nonfinite_streak + 1 if metrics.get("actor/nonfinite_skips", 0) else 0
                too_many_nonfinite = nonfinite_streak >= cfg.get("max_nonfinite_steps", 3)
                preempted = self._preempted(step)
                if self._save(step, done_data, force=step == cfg.total_steps or preempted or too_many_nonfinite):
                    saved = step
                if too_many_nonfinite:
                    raise NonFiniteError(
                        f"the loss or the gradients were non-finite in {nonfinite_streak} consecutive steps "
                        f"(up to step {step}); those updates were skipped and step {step} is saved. Lower "
                        "optim.lr, check the advantages and rewards for NaN, or raise max_nonfinite_steps")
                if preempted:
                    log.warning("stopped by SIGTERM after step %d; rerun the same command to resume", step)
                    break
        except BaseException:
            # Save the last completed step on the way out (a retriever outage, any error in a
            # step): the rerun then continues from it instead of from the last periodic save.
            # Multi-host, a save is collective and an error may be one host's alone: there the
            # preemption sync and the periodic saves are what protect the run.
            if done > saved and jax.process_count() == 1:
                self._save_on_the_way_out(done, done_data)
            raise
        finally:
            if own_handler:
                signal.signal(signal.SIGTERM, previous)
        if self.is_main and paths.resolve(self.metrics.path).exists():
            plot_training(read_metrics(self.metrics.path), str(paths.resolve(self.workdir) / "training.png"),
                          title=f"{cfg.advantage.name} - {paths.resolve(self.workdir).name}")
        return last

    def _save_on_the_way_out(self, step: int, data_state: dict) -> None:
        leaves = jax.tree.leaves((self.params, self.opt_state))
        if any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            # A failed update had already consumed (donated) the step's arrays.
            log.error("cannot save step %d on the way out: the failed update consumed its parameters; "
                      "the rerun resumes from the last saved step", step)
            return
        try:
            self._save(step, data_state, force=True)
            self.rt.checkpointer.wait_until_finished()
            log.warning("saved step %d on the way out; rerun the same command to resume from it", step)
        except Exception as e:  # noqa: BLE001 - the original error is what the user must see
            log.error("could not save step %d on the way out: %s", step, e)

    def close(self):
        self.rt.close()
        self.metrics.close()


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def _prefix(d: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in d.items()}


# --- command line -----------------------------------------------------------------------------------
def main(argv):
    del argv
    xla_flags.use_memory_scheduler_on_cpu()  # before the Trainer asks JAX for devices
    run_flags.setup_logging()
    if run_flags.CONFIG.value is None or not run_flags.WORKDIR.value:
        raise app.UsageError("pass --config=configs/NAME.py and --workdir=DIR")
    trainer = Trainer(run_flags.CONFIG.value, run_flags.WORKDIR.value)
    try:
        last = trainer.train()
    finally:
        trainer.close()
    print(json.dumps({k: v for k, v in last.items() if k.startswith(("critic/", "val/", "adv/homog"))}, indent=1))


if __name__ == "__main__":
    app.run(main)
