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

from tspo_jax import rollout
from tspo_jax.runtime import make_sampler
from tspo_jax.bench import costs, scripted, searchr1, timing
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


def measure(jmodel, tmodel, tokenizer, retriever, script: scripted.Script, spec: EpisodeSpec, *,
            reps: int, limits: costs.Limits, profile_dir: str | None = None) -> dict:
    graphdef, params = nnx.split(jmodel)
    sampler = make_sampler(graphdef, jmodel.cfg, tokenizer)
    questions = [scripted.QUESTIONS[i % len(scripted.QUESTIONS)] for i in range(spec.rows)]
    prompts = [list(script.prompts[i % len(script.prompts)]) for i in range(spec.rows)]
    runners = {m: rollout.EpisodeRunner(sampler, tokenizer, retriever, rollout_config(spec, m))
               for m in ("cache", "reprefill")}
    last: dict = {}
    sr1_stats: dict = {}

    def ours(method):
        def run():
            last[method] = runners[method].run(params, questions, n=1)
            return {"retrieval": runners[method].timing.get("retrieval", 0.0)}
        return run

    def search_r1():
        last["searchr1"] = searchr1.run_episodes(
            tmodel, tokenizer, retriever, prompts, rollout_config(spec, "reprefill"), sr1_stats)
        return {"retrieval": sr1_stats["retrieval_s"]}

    contenders = {"interrupt_resume": ours("cache"), "reprefill": ours("reprefill"), "searchr1_torch": search_r1}
    samples = timing.interleaved(contenders, reps)
    _check_same(last["cache"], last["reprefill"], last["searchr1"], script, spec)

    episodes = last["cache"]
    policy_tokens = sum(sum(e.loss_mask) for e in episodes)
    own_limits = method_limits(jmodel.cfg, episodes, spec.max_response_length, limits)
    limit = own_limits["interrupt_resume"]
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
    }
    for name, s in samples.items():
        med = s.median()
        out[name] = {
            **s.summary(),
            "episodes_per_s": spec.rows / med,
            "policy_tokens_per_s": policy_tokens / med,
            "pct_of_limit": 100 * limit / med,
            "own_limit_s": own_limits[name],
            "pct_of_own_limit": 100 * own_limits[name] / med,
        }
    base = out["interrupt_resume"]["episodes_per_s"]
    out["ratio_vs_reprefill"] = base / out["reprefill"]["episodes_per_s"]
    out["ratio_vs_searchr1_torch"] = base / out["searchr1_torch"]["episodes_per_s"]
    out["compile_counts"] = dict(sampler.compile_counts)
    if profile_dir:
        from tspo_jax.bench.profile import profile

        out["interrupt_resume_profile"] = profile(contenders["interrupt_resume"], f"{profile_dir}/episodes")
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
        return {"model": "scripted " + cfg_summary(cfg), "torch_threads": threads, **measure(jmodel, tmodel, tokenizer, retriever, script, spec,
                                                                  reps=reps, limits=limits,
                                                                  profile_dir=profile_dir)}
    finally:
        retriever.close()


def cfg_summary(cfg) -> str:
    return f"{cfg.num_layers}x{cfg.hidden_size} vocab {cfg.vocab_size} {'tied' if cfg.tie_word_embeddings else 'untied'}"
