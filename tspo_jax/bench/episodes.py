"""Multi-turn search episodes: interrupt/resume on the KV cache vs re-prefilling every turn (both
ours, JAX) vs the Search-R1 loop in PyTorch; one scripted model, one retriever, same episodes.

The retriever is an exact in-process index (MiniLM encoder) over a bench corpus made from the demo
corpus with longer passages, so that top-3 documents make a ~500-token observation. All three
methods are checked to produce the same token sequences before any time is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy as np
from flax import nnx

from tspo_jax import rollout, sampling
from tspo_jax.runtime import make_sampler
from tspo_jax.bench import costs, scripted, searchr1, timing
from tspo_jax.bench import torch_kv as torch_kv_lib
from tspo_jax.bench.configs import BenchmarkError, EpisodeSpec

log = logging.getLogger(__name__)

CORPUS_PASSAGES = 64


def bench_corpus(tokenizer, doc_tokens: int, out_dir: str) -> str:
    """Writes (once) a corpus of CORPUS_PASSAGES passages of >= doc_tokens tokens each, built from
    the demo corpus: passage i is demo passage i's title and the texts of passages i, i+1, ..."""
    from tspo_jax.demo_task import demo_paths

    with open(demo_paths()["corpus"]) as f:
        demo = [json.loads(line)["contents"].split("\n", 1) for line in f if line.strip()]
    rows = []
    for i in range(CORPUS_PASSAGES):
        title, words, j = demo[i][0], [], i
        while len(tokenizer.encode(" ".join(words))) < doc_tokens:
            words.append(demo[j % len(demo)][1])
            j += 1
        rows.append(json.dumps({"id": str(i), "contents": f"{title}\n{' '.join(words)}"}))
    text = "\n".join(rows) + "\n"
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = os.path.join(out_dir, f"bench_corpus_{key}.jsonl")
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return path


def bench_retriever(tokenizer, spec: EpisodeSpec, cache_dir: str):
    """An exact LocalRetriever over the bench corpus (index built on first use, then reused)."""
    from tspo_jax.retrieval.build_index import build_index
    from tspo_jax.retrieval.local import LocalRetriever

    corpus = bench_corpus(tokenizer, spec.doc_tokens, cache_dir)
    index_dir = corpus[: -len(".jsonl")] + "_index"
    if not os.path.exists(os.path.join(index_dir, "manifest.json")):
        build_index(corpus, index_dir, mode="exact", max_length=128, overwrite=True, progress=False)
    return LocalRetriever(index_dir)


def rollout_config(spec: EpisodeSpec, resume: str) -> rollout.RolloutConfig:
    return rollout.RolloutConfig(
        max_turns=spec.max_turns,
        max_response_length=spec.max_response_length,
        max_obs_length=spec.max_obs_length,
        docs_per_search=spec.docs_per_search,
        greedy=True,
        resume=resume,
        template="{question}",
        use_chat_template=False,
    )


def episode_limit(cfg, episodes: list[rollout.Episode], limits: costs.Limits) -> float:
    """The least time the episodes' own work takes: the prompts' prefill, then each turn's decode
    steps (all live rows step together; the turn lasts as long as its longest row) and one append
    of the observations; every token goes through the model exactly once."""
    total = costs.prefill_cost(cfg, [e.prompt_len for e in episodes]).seconds(limits)
    ctx = np.array([e.prompt_len for e in episodes])
    turns = max(e.num_turns for e in episodes)
    for k in range(turns):
        live = [i for i, e in enumerate(episodes) if e.num_turns > k]
        lens = {i: episodes[i].turns[k].policy_span[1] - episodes[i].turns[k].policy_span[0] for i in live}
        for s in range(max(lens.values()) - 1):  # the turn's first token comes from the last forward
            rows = [(int(ctx[i]) + s, 1) for i in live if s < lens[i] - 1]
            total += costs.forward_tokens_cost(cfg, rows).seconds(limits)
        for i in live:
            ctx[i] += lens[i]
        obs = [(int(ctx[i]), episodes[i].turns[k].obs_span) for i in live if episodes[i].turns[k].obs_span]
        if obs:
            # The last policy token and the observation go in together.
            total += costs.forward_tokens_cost(cfg, [(c - 1, 1 + s[1] - s[0]) for c, s in obs]).seconds(limits)
            for i in live:
                span = episodes[i].turns[k].obs_span
                ctx[i] += (span[1] - span[0]) if span else 0
    return total


def method_limits(cfg, episodes: list[rollout.Episode], max_response_length: int, limits: costs.Limits) -> dict:
    """Least time of each method's own work on these episodes (live rows step together):
    interrupt/resume as `episode_limit`; re-prefill runs the whole context so far before every
    turn, then the turn's decode steps; Search-R1 does the same but decodes to the per-turn limit."""
    out = {"interrupt_resume": episode_limit(cfg, episodes, limits)}
    turns = max(e.num_turns for e in episodes)
    for name in ("reprefill", "searchr1_torch"):
        total = 0.0
        for k in range(turns):
            live = [e for e in episodes if e.num_turns > k]
            ctx = [e.turns[k].policy_span[0] for e in live]
            total += costs.forward_tokens_cost(cfg, [(0, c) for c in ctx]).seconds(limits)
            lens = [e.turns[k].policy_span[1] - e.turns[k].policy_span[0] for e in live]
            steps = max_response_length - 1 if name == "searchr1_torch" else max(lens) - 1
            for s in range(steps):
                rows = [(c + s, 1) for c, n in zip(ctx, lens) if name == "searchr1_torch" or s < n - 1]
                total += costs.forward_tokens_cost(cfg, rows).seconds(limits)
        out[name] = total
    return out


def synthetic_episodes(rows: int, prompt_len: int, turn_len: int, obs_len: int, searches: int) -> list[rollout.Episode]:
    """Episodes of the scripted shape (searches x (turn + observation), then one last turn), for
    projecting `method_limits` onto a model too slow to run them here."""
    episodes = []
    for r in range(rows):
        pos, turns = prompt_len, []
        for k in range(searches + 1):
            obs = (pos + turn_len, pos + turn_len + obs_len) if k < searches else None
            turns.append(rollout.Turn("search", (pos, pos + turn_len), obs, "", None))
            pos = obs[1] if obs else pos + turn_len
        episodes.append(rollout.Episode(str(r), prompt_len, [0] * pos, [], [], [], turns, None, ""))
    return episodes


def _check_same(ours, reprefill, sr1, script: scripted.Script, spec: EpisodeSpec):
    for i, (a, b, c) in enumerate(zip(ours, reprefill, sr1)):
        if a.tokens != b.tokens:
            raise BenchmarkError(f"row {i}: interrupt/resume and re-prefill episodes differ")
        if a.tokens != c.tokens:
            raise BenchmarkError(f"row {i}: our episode and the Search-R1 loop's differ")
        actions = [t.action for t in a.turns]
        want = ["search"] * spec.max_turns + ["search_disabled"]
        if actions != want or any(t.text != script.turn_text for t in a.turns):
            raise BenchmarkError(f"row {i}: the scripted model did not follow the script ({actions})")


def _check_all_same(ref: list[rollout.Episode], others: dict[str, list]):
    """Every contender's episodes are the reference's token for token."""
    for name, eps in others.items():
        for i, (a, b) in enumerate(zip(ref, eps)):
            if a.tokens != (b if isinstance(b, list) else b.tokens):
                raise BenchmarkError(f"row {i}: {name}'s episode differs from the slot engine's")


# Our contenders: the slot engine at S = rows (the default engine, named as before) and at
# S = rows / 4, the lockstep engine, and re-prefill (lockstep, the whole context every turn).
OURS = {
    "interrupt_resume": dict(engine="slots", slots=0),
    "slots_quarter": dict(engine="slots", slots=-4),  # -4: rows / 4
    "lockstep": dict(engine="lockstep"),
    "reprefill": dict(engine="lockstep", resume="reprefill"),
}


def _our_runners(sampler, tokenizer, retriever, base: rollout.RolloutConfig, rows: int) -> dict:
    import dataclasses

    runners = {}
    for name, kw in OURS.items():
        kw = dict(kw)
        if kw.get("slots", 0) < 0:
            kw["slots"] = sampling.round_up(max(1, rows // -kw["slots"]), sampler.row_multiple)
        runners[name] = rollout.EpisodeRunner(sampler, tokenizer, retriever, dataclasses.replace(base, **kw))
    return runners


def _kv_bytes_per_token(cfg) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize


def _time_all(runners, params, questions, torch_fns: dict, reps: int, seed: int = 0):
    """Times our runners and the PyTorch contenders interleaved; returns samples, the last
    episodes of each and each runner's stats."""
    last: dict = {}
    stats: dict = {}

    def ours(name):
        def run():
            r = runners[name]
            last[name] = r.run(params, questions, n=1, seed=seed)
            stats[name] = dict(r.stats)
            return {"retrieval": r.timing.get("retrieval", 0.0)}
        return run

    def theirs(name):
        def run():
            st: dict = {}
            last[name] = torch_fns[name](st)
            stats[name] = st
            return {"retrieval": st["retrieval_s"]}
        return run

    contenders = {n: ours(n) for n in runners} | {n: theirs(n) for n in torch_fns}
    return timing.interleaved(contenders, reps), last, stats, contenders


def _summarise(samples, stats, rows: int, policy_tokens: int, kv_per_token: int, peak_sr1: int) -> dict:
    out = {}
    for name, s in samples.items():
        med = s.median()
        st = stats.get(name, {})
        out[name] = {
            **s.summary(),
            "episodes_per_s": rows / med,
            "policy_tokens_per_s": policy_tokens / med,
            "occupancy": st.get("occupancy"),
            "kv_bytes": st.get("kv_bytes", peak_sr1 if name == "searchr1_torch" else None),
            "cache_rows": st.get("cache_rows"),
        }
    return out


def measure(jmodel, tmodel, tokenizer, retriever, script: scripted.Script, spec: EpisodeSpec, *,
            reps: int, limits: costs.Limits, profile_dir: str | None = None) -> dict:
    graphdef, params = nnx.split(jmodel)
    sampler = make_sampler(graphdef, jmodel.cfg, tokenizer)
    questions = [scripted.QUESTIONS[i % len(scripted.QUESTIONS)] for i in range(spec.rows)]
    prompts = [list(script.prompts[i % len(script.prompts)]) for i in range(spec.rows)]
    base = rollout_config(spec, "cache")
    runners = _our_runners(sampler, tokenizer, retriever, base, spec.rows)
    sr1_stats: dict = {}

    def search_r1(st):
        eps = searchr1.run_episodes(tmodel, tokenizer, retriever, prompts, rollout_config(spec, "reprefill"), st)
        sr1_stats.update(st)
        return eps

    def torch_kv(st):
        return torch_kv_lib.run_episodes(tmodel, tokenizer, retriever, prompts, base, stats=st)

    samples, last, stats, contenders = _time_all(runners, params, questions,
                                                 {"searchr1_torch": search_r1, "torch_kv_reuse": torch_kv}, reps)
    _check_same(last["interrupt_resume"], last["reprefill"], last["searchr1_torch"], script, spec)
    _check_all_same(last["interrupt_resume"], {n: last[n] for n in ("slots_quarter", "lockstep", "torch_kv_reuse")})

    episodes = last["interrupt_resume"]
    policy_tokens = sum(sum(e.loss_mask) for e in episodes)
    own_limits = method_limits(jmodel.cfg, episodes, spec.max_response_length, limits)
    limit = own_limits["interrupt_resume"]
    kv_tok = _kv_bytes_per_token(jmodel.cfg)
    # Search-R1's biggest generate: every row's longest context plus the per-turn limit.
    peak_sr1 = spec.rows * (max(len(e.tokens) for e in episodes) + spec.max_response_length) * kv_tok
    out = {
        "rows": spec.rows,
        "turns": rollout_config(spec, "cache").num_turns,
        "searches_per_episode": spec.max_turns,
        "topk": spec.docs_per_search,  # the results files keep their key
        "policy_tokens_per_turn": len(script.turn_ids),
        "observation_tokens": [s[1] - s[0] for s in (t.obs_span for t in episodes[0].turns) if s],
        "episode_tokens": [len(e.tokens) for e in episodes],
        "max_response_length": spec.max_response_length,
        "limit_s": limit,
        "searchr1_generated_tokens": sr1_stats["generated_tokens"],
        "searchr1_prefilled_tokens": sr1_stats["prefilled_tokens"],
        "slots_quarter_slots": runners["slots_quarter"].cfg.slots,
    }
    out.update(_summarise(samples, stats, spec.rows, policy_tokens, kv_tok, peak_sr1))
    for name in ("interrupt_resume", "reprefill", "searchr1_torch"):
        out[name].update(pct_of_limit=100 * limit / out[name]["median_s"]["total"],
                         own_limit_s=own_limits[name],
                         pct_of_own_limit=100 * own_limits[name] / out[name]["median_s"]["total"])
    for name in ("slots_quarter", "lockstep", "torch_kv_reuse"):
        out[name]["pct_of_limit"] = 100 * limit / out[name]["median_s"]["total"]
    base_rate = out["interrupt_resume"]["episodes_per_s"]
    for name in ("reprefill", "searchr1_torch", "lockstep", "torch_kv_reuse"):
        out[f"ratio_vs_{name}"] = base_rate / out[name]["episodes_per_s"]
    out["compile_counts"] = dict(sampler.compile_counts)
    if profile_dir:
        from tspo_jax.bench.profile import profile

        out["interrupt_resume_profile"] = profile(contenders["interrupt_resume"], f"{profile_dir}/episodes")
    return out


def measure_long_tail(jmodel, tmodel, tokenizer, retriever, script: scripted.LongTailScript, spec: EpisodeSpec, *,
                      reps: int, profile_dir: str | None = None) -> dict:
    """The long-tailed shape: sampled turns (top_k=2 between the next filler and the search call).
    Our four contenders sample the same episodes (per-episode keys); the PyTorch contenders are
    given the slot engine's tokens of the warm-up run, so every method does the same work."""
    import dataclasses

    graphdef, params = nnx.split(jmodel)
    sampler = make_sampler(graphdef, jmodel.cfg, tokenizer)
    rows = spec.long_tail_rows
    questions = [scripted.QUESTIONS[i % len(scripted.QUESTIONS)] for i in range(rows)]
    prompts = [list(script.prompts[i % len(script.prompts)]) for i in range(rows)]
    base = dataclasses.replace(rollout_config(spec, "cache"), greedy=False, temperature=1.0, top_k=2)
    runners = _our_runners(sampler, tokenizer, retriever, base, rows)
    ref = runners["interrupt_resume"].run(params, questions, n=1)
    forced = [[e.tokens[t.policy_span[0]:t.policy_span[1]] for t in e.turns] for e in ref]

    def search_r1(st):
        return [e.tokens for e in searchr1.run_episodes(tmodel, tokenizer, retriever, prompts,
                                                         dataclasses.replace(base, resume="reprefill"), st, forced=forced)]

    def torch_kv(st):
        return torch_kv_lib.run_episodes(tmodel, tokenizer, retriever, prompts, base, forced=forced, stats=st)

    samples, last, stats, contenders = _time_all(runners, params, questions,
                                                 {"searchr1_torch": search_r1, "torch_kv_reuse": torch_kv}, reps)
    _check_all_same(ref, {n: last[n] for n in last})
    lens = np.array([t.policy_span[1] - t.policy_span[0] for e in ref for t in e.turns])
    policy_tokens = int(lens.sum())
    kv_tok = _kv_bytes_per_token(jmodel.cfg)
    peak_sr1 = rows * (max(len(e.tokens) for e in ref) + spec.max_response_length) * kv_tok
    out = {
        "rows": rows,
        "slots_quarter_slots": runners["slots_quarter"].cfg.slots,
        "turns": int(sum(e.num_turns for e in ref)),
        "turn_tokens": {"mean": float(lens.mean()), "median": float(np.median(lens)), "p90": float(np.percentile(lens, 90)),
                        "max": int(lens.max()), "at_limit": int((lens >= spec.max_response_length).sum())},
        "max_response_length": spec.max_response_length,
        "policy_tokens": policy_tokens,
        "episode_tokens_mean": float(np.mean([len(e.tokens) for e in ref])),
        "actions": {a: sum(t.action == a for e in ref for t in e.turns) for a in ("search", "invalid", "search_disabled")},
    }
    out.update(_summarise(samples, stats, rows, policy_tokens, kv_tok, peak_sr1))
    base_rate = out["interrupt_resume"]["episodes_per_s"]
    for name in ("slots_quarter", "lockstep", "reprefill", "searchr1_torch", "torch_kv_reuse"):
        out[f"ratio_vs_{name}"] = base_rate / out[name]["episodes_per_s"]
    quarter = out["slots_quarter"]["episodes_per_s"]
    out["quarter_ratio_vs_lockstep"] = quarter / out["lockstep"]["episodes_per_s"]
    out["quarter_ratio_vs_torch_kv_reuse"] = quarter / out["torch_kv_reuse"]["episodes_per_s"]
    out["compile_counts"] = dict(sampler.compile_counts)
    if profile_dir:
        from tspo_jax.bench.profile import profile

        out["slots_quarter_profile"] = profile(contenders["slots_quarter"], f"{profile_dir}/episodes_long_tail")
    return out


def build_and_measure(bc, dtype, tokenizer, *, reps, limits, cache_dir, profile_dir=None,
                      calibrate_threads=True) -> dict:
    """Builds the scripted model pair and the retriever for `bc`, then measures."""
    from tspo_jax.bench import configs

    spec = bc.episodes
    script = scripted.make_script(tokenizer, spec.turn_tokens, scripted.observation_example(tokenizer, spec.max_obs_length))
    cfg = configs.model_config(bc, dtype, tokenizer.vocab_size).replace(tie_word_embeddings=False)
    t0 = time.perf_counter()
    from tspo_jax.model import qwen2

    jmodel = scripted.script_weights(qwen2.init_model(cfg, seed=1), script.successors)
    tmodel = configs.torch_model(jmodel, dtype)
    threads = configs.calibrate_torch_threads(tmodel) if calibrate_threads else None
    retriever = bench_retriever(tokenizer, spec, cache_dir)
    log.info("episodes: scripted models and retriever ready in %.1fs", time.perf_counter() - t0)
    try:
        out = {"model": "scripted " + cfg_summary(cfg), "torch_threads": threads,
               **measure(jmodel, tmodel, tokenizer, retriever, script, spec, reps=reps, limits=limits,
                         profile_dir=profile_dir)}
        if spec.long_tail_rows:
            del jmodel, tmodel
            lt = scripted.make_long_tail_script(tokenizer, scripted.observation_example(tokenizer, spec.max_obs_length),
                                                mean_turn=spec.mean_turn)
            jmodel = scripted.long_tail_weights(qwen2.init_model(cfg, seed=1), lt)
            tmodel = configs.torch_model(jmodel, dtype)
            log.info("episodes: the long-tailed shape (%d rows)", spec.long_tail_rows)
            out["long_tailed"] = measure_long_tail(jmodel, tmodel, tokenizer, retriever, lt, spec,
                                                   reps=spec.long_tail_reps or reps,
                                                   profile_dir=profile_dir)
        return out
    finally:
        retriever.close()


def cfg_summary(cfg) -> str:
    return f"{cfg.num_layers}x{cfg.hidden_size} vocab {cfg.vocab_size} {'tied' if cfg.tie_word_embeddings else 'untied'}"
