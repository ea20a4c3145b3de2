"""Multi-turn search episodes through the real sampler, KV cache, tokenizer and MiniLM retriever.

A scripted Qwen2 (tests/scripted_model.py) makes the policy's moves deterministic, so every
episode's structure is known exactly; its small random layers keep each logprob dependent on the
whole context, so interrupt/resume on the cache is checked against re-prefilling from scratch.
"""


import jax
import numpy as np
import pytest
from flax import nnx

from scripted_model import scripted_model, successor_map
from tspo_jax import rollout, sampling
from tspo_jax.model import qwen2
from tspo_jax.demo_task import demo_paths
from tspo_jax.retrieval import HttpRetriever, RetrieverError, format_docs
from tspo_jax.retrieval.build_index import build_index
from tspo_jax.retrieval.local import LocalRetriever
from tspo_jax.tokenizer import load_tokenizer

# Scripts whose tokens each have one successor (successor_map checks it); the questions end in
# distinct tokens, so each row's first move is chosen by its question.
SEARCH_TURN = "<think>find</think><search>Dravel</search>"
ANSWER_TURN = "<answer>Oskaria</answer>"
Q_SEARCH, Q_ANSWER, Q_INVALID = "Where is Dravel? city", "Capital of Oskaria? country", "What now? born"
INVALID_TURN = " painter"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(demo_paths()["tokenizer"])


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    corpus = d / "corpus.jsonl"
    lines = list(open(demo_paths()["corpus"]))[:40]
    corpus.write_text("".join(lines))
    build_index(str(corpus), str(d / "index"), mode="exact", progress=False)
    r = LocalRetriever(str(d / "index"))
    yield r
    r.close()


def _cfg(**kw):
    base = dict(
        max_turns=2,
        max_response_length=24,
        max_obs_length=64,
        docs_per_search=2,
        greedy=True,
        template="{question}",
        use_chat_template=False,
    )
    base.update(kw)
    return rollout.RolloutConfig(**base)


def _runner(tok, retriever, after_obs: str, cfg, seed=0):
    enc = tok.encode
    obs_end = rollout.observation_ids(tok, "x", 64)[-1]
    invalid_end = enc(rollout.INVALID_ACTION_MESSAGE)[-1]
    chains = [
        [enc(Q_SEARCH)[-1]] + enc(SEARCH_TURN),
        [enc(Q_ANSWER)[-1]] + enc(ANSWER_TURN),
        [enc(Q_INVALID)[-1]] + enc(INVALID_TURN) + [tok.eos_id],
        [obs_end] + enc(after_obs),
        [invalid_end] + enc(ANSWER_TURN),
    ]
    model = scripted_model(tok.vocab_size, successor_map(chains), seed=seed)
    graphdef, state = nnx.split(model)
    smp = sampling.Sampler(
        graphdef,
        model.cfg,
        eos_ids=[tok.eos_id],
        pad_id=tok.pad_id,
        stop_strings=rollout.STOP_STRINGS,
        token_bytes=tok.token_bytes,
    )
    return rollout.EpisodeRunner(smp, tok, retriever, cfg), state


def test_search_then_answer_episode_is_exact(tok, retriever):
    runner, state = _runner(tok, retriever, ANSWER_TURN, _cfg())
    eps = runner.run(state, [Q_SEARCH, Q_ANSWER, Q_INVALID], uids=["s", "a", "i"], n=2)
    assert [e.uid for e in eps] == ["s", "s", "a", "a", "i", "i"]
    assert [e.group for e in eps] == [0, 0, 1, 1, 2, 2]
    s, a, inv = eps[0], eps[2], eps[4]

    # Row that searched: turn 0 searches "Dravel", gets the docs, turn 1 answers.
    assert [t.action for t in s.turns] == ["search", "answer"]
    assert s.turns[0].query == "Dravel" and s.answer == "Oskaria" and s.stop_reason == "answer"
    docs = retriever.search(["Dravel"], 2)[0]
    assert [d.id for d in s.turns[0].docs] == [d.id for d in docs]
    obs = rollout.observation_ids(tok, format_docs(docs), 64)
    prompt = tok.encode(Q_SEARCH)
    expect = prompt + tok.encode(SEARCH_TURN) + obs + tok.encode(ANSWER_TURN)
    assert s.tokens == expect
    p0, p1 = s.turns[0].policy_span, s.turns[1].policy_span
    o0 = s.turns[0].obs_span
    assert p0 == (len(prompt), len(prompt) + len(tok.encode(SEARCH_TURN)))
    assert o0 == (p0[1], p0[1] + len(obs)) and p1[0] == o0[1] and p1[1] == len(expect)
    assert s.loss_mask == [0] * len(prompt) + [1] * (p0[1] - p0[0]) + [0] * len(obs) + [1] * (p1[1] - p1[0])
    assert s.turn_ids == [-1] * len(prompt) + [0] * (o0[1] - p0[0]) + [1] * (p1[1] - p1[0])
    assert all(lp < 0 for lp, m in zip(s.logprobs, s.loss_mask) if m)
    assert all(lp == 0 for lp, m in zip(s.logprobs, s.loss_mask) if not m)
    assert s.turns[0].observation == tok.decode(obs)
    assert s.response_text.startswith(SEARCH_TURN + "\n\n<information>Doc 1(Title: ")

    # Row that answered at once.
    assert [t.action for t in a.turns] == ["answer"] and a.answer == "Oskaria"
    assert a.tokens == tok.encode(Q_ANSWER) + tok.encode(ANSWER_TURN)

    # Row that stopped on EOS without an action: the invalid-action message, then it answers.
    assert [t.action for t in inv.turns] == ["invalid", "answer"]
    assert inv.turns[0].stop == "eos" and inv.turns[0].observation == rollout.INVALID_ACTION_MESSAGE
    assert inv.tokens == (
        tok.encode(Q_INVALID)
        + tok.encode(INVALID_TURN)
        + [tok.eos_id]
        + tok.encode(rollout.INVALID_ACTION_MESSAGE)
        + tok.encode(ANSWER_TURN)
    )
    assert eps[1].tokens == s.tokens and eps[3].tokens == a.tokens  # greedy rows of a group agree


def test_interrupt_resume_equals_reprefill_from_scratch(tok, retriever):
    """Every turn searches until max_turns; the last turn (search disabled) ends the episode."""
    cache_runner, state = _runner(tok, retriever, SEARCH_TURN, _cfg(max_turns=3))
    naive_runner, _ = _runner(tok, retriever, SEARCH_TURN, _cfg(max_turns=3, resume="reprefill"))
    qs = [Q_SEARCH, Q_ANSWER, Q_INVALID]
    a = cache_runner.run(state, qs, n=1)
    b = naive_runner.run(state, qs, n=1)
    s = a[0]
    assert [t.action for t in s.turns] == ["search", "search", "search", "search_disabled"]
    assert s.stop_reason == "max_turns" and s.answer is None
    assert sum(t.obs_span is not None for t in s.turns) == 3
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.loss_mask == y.loss_mask and x.turn_ids == y.turn_ids
        assert np.abs(np.asarray(x.logprobs) - np.asarray(y.logprobs)).max() <= 1e-4
        assert [t.action for t in x.turns] == [t.action for t in y.turns]


def test_sampled_episode_logprobs_match_a_recomputed_forward(tok, retriever):
    runner, state = _runner(tok, retriever, ANSWER_TURN, _cfg(greedy=False, temperature=1.0))
    eps = runner.run(state, [Q_SEARCH, Q_ANSWER], n=3, seed=7)
    # One jitted forward over all episodes, right-padded (padding is masked, so each row is exact).
    width = max(len(ep.tokens) for ep in eps)
    tokens, valid = sampling.right_pad([ep.tokens for ep in eps], width, 0)
    fwd = jax.jit(lambda s, t, v: qwen2.apply(runner.sampler.graphdef, s, t, valid=v)[0])
    logp = np.asarray(jax.nn.log_softmax(fwd(state, tokens, valid), axis=-1))
    for i, ep in enumerate(eps):
        idx = np.asarray([j for j, m in enumerate(ep.loss_mask) if m])
        ref = logp[i, idx - 1, np.asarray(ep.tokens)[idx]]
        assert np.abs(np.asarray(ep.logprobs)[idx] - ref).max() <= 1e-4


def test_observation_truncated_to_max_obs_length(tok, retriever):
    runner, state = _runner(tok, retriever, ANSWER_TURN, _cfg(max_obs_length=20))
    ep = runner.run(state, [Q_SEARCH])[0]
    a, b = ep.turns[0].obs_span
    assert b - a == 20
    assert tok.decode(ep.tokens[a:b]).endswith("</information>\n\n")


def test_context_overflow_ends_the_episode(tok, retriever):
    runner, state = _runner(tok, retriever, SEARCH_TURN, _cfg(max_turns=4, max_context_length=128))
    eps = runner.run(state, [Q_SEARCH, Q_ANSWER])
    assert eps[0].stop_reason == "context"
    assert len(eps[0].tokens) <= 128
    assert eps[1].stop_reason == "answer"


def test_dead_retriever_is_a_clear_failure_or_an_error_observation(tok):
    # max_outage_s=0: fail at once (the default waits 10 min for a restarting server).
    dead = HttpRetriever("http://127.0.0.1:9", timeout_s=0.5, retries=0, max_outage_s=0)
    runner, state = _runner(tok, dead, ANSWER_TURN, _cfg())
    with pytest.raises(RetrieverError, match="127.0.0.1:9"):
        runner.run(state, [Q_SEARCH])
    runner, state = _runner(tok, dead, ANSWER_TURN, _cfg(on_retriever_error="observe"))
    ep = runner.run(state, [Q_SEARCH])[0]
    assert "Search failed" in ep.turns[0].observation and ep.answer == "Oskaria"


@pytest.mark.parametrize(
    "text,expect",
    [
        ("<think>x</think><search> who is X </search>", ("search", "who is X")),
        ("<search> a <search> b </search>", ("search", "b")),  # nested: the innermost
        ("<search>   </search>", ("invalid", None)),  # empty query
        ("no opening tag </search>", ("invalid", None)),
        ("<answer> 42 </answer>", ("answer", "42")),
        ("<search> q </search> then <answer> x </answer>", ("search", "q")),  # the tag that stopped the turn
        ("<answer> never closed", ("invalid", None)),
        ("", ("invalid", None)),
    ],
)
def test_parse_action(text, expect):
    assert rollout.parse_action(text) == expect


def test_long_query_is_cut_before_retrieval():
    action, q = rollout.parse_action("<search> " + "word " * 2000 + "</search>")
    assert action == "search" and len(q) > 9000
    assert len(q[: rollout.MAX_QUERY_CHARS]) == rollout.MAX_QUERY_CHARS


def test_bad_rollout_config():
    with pytest.raises(ValueError, match="resume must be"):
        rollout.RolloutConfig(resume="sometimes")
    with pytest.raises(ValueError, match=r"\{question\}"):
        rollout.RolloutConfig(template="no placeholder")


# --- the slot engine ----------------------------------------------------------------------------
def _same_episodes(a, b, logprob_tol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.loss_mask == y.loss_mask and x.turn_ids == y.turn_ids
        assert (x.uid, x.group, x.stop_reason, x.answer) == (y.uid, y.group, y.stop_reason, y.answer)
        assert [(t.action, t.policy_span, t.obs_span, t.stop) for t in x.turns] == [
            (t.action, t.policy_span, t.obs_span, t.stop) for t in y.turns
        ]
        assert np.abs(np.asarray(x.logprobs) - np.asarray(y.logprobs)).max() <= logprob_tol


def _runners(tok, retriever, after_obs, variants, **base):
    """One scripted model; a runner per variant (RolloutConfig overrides) sharing its sampler."""
    first, state = _runner(tok, retriever, after_obs, _cfg(**base))
    runners = {}
    for name, kw in variants.items():
        runners[name] = rollout.EpisodeRunner(first.sampler, tok, retriever, _cfg(**base, **kw))
    return runners, state


QS = [Q_SEARCH, Q_ANSWER, Q_INVALID, Q_SEARCH, Q_INVALID]


def test_slots_greedy_equal_lockstep_and_reprefill_with_refill(tok, retriever):
    """5 questions x 2 = 10 rows in 3 slots (refilled as episodes end, in an order set by their
    lengths); decode chunks of 5 steps cut turns (and the stop-string matcher) across calls."""
    runners, state = _runners(tok, retriever, SEARCH_TURN, {
        "slots": dict(slots=3, decode_chunk=5),
        "slots_reprefill": dict(slots=3, decode_chunk=7, resume="reprefill"),
        # Refills and appends one row per call, and 2 rows per call: the same episodes.
        "fill1": dict(slots=3, decode_chunk=5, fill_rows=1),
        "fill2": dict(slots=4, decode_chunk=5, fill_rows=2),
        "lockstep": dict(engine="lockstep"),
        "lockstep_reprefill": dict(engine="lockstep", resume="reprefill"),
    }, max_turns=3)
    got = {name: r.run(state, QS, n=2) for name, r in runners.items()}
    ref = got["lockstep"]
    assert {e.stop_reason for e in ref} == {"answer", "max_turns"}
    assert max(e.num_turns for e in ref) == 4 and min(e.num_turns for e in ref) == 1
    for name in ("slots", "slots_reprefill", "fill1", "fill2", "lockstep_reprefill"):
        _same_episodes(got[name], ref)
    st = runners["slots"].stats
    assert st["cache_rows"] == 3 and runners["lockstep"].stats["cache_rows"] == 10
    assert runners["slots"].sampler.compile_counts["refill"] >= 1
    assert 0 < st["occupancy"] <= 1 and st["live_steps"] == sum(sum(e.loss_mask) for e in got["slots"])
    # KV memory grows with the slots, not with the rows.
    assert st["kv_bytes"] * 3 < runners["lockstep"].stats["kv_bytes"]


def test_sampled_episodes_do_not_depend_on_slots_or_engine(tok, retriever):
    runners, state = _runners(tok, retriever, ANSWER_TURN, {
        "all": dict(slots=0), "quarter": dict(slots=2, decode_chunk=3), "lockstep": dict(engine="lockstep"),
    }, greedy=False, temperature=4.0, max_response_length=12)
    qs = [Q_SEARCH, Q_ANSWER, Q_INVALID, Q_SEARCH]
    got = {name: r.run(state, qs, n=2, seed=3) for name, r in runners.items()}
    assert runners["quarter"].stats["cache_rows"] == 2  # 8 rows in 2 slots
    _same_episodes(got["quarter"], got["all"])
    _same_episodes(got["lockstep"], got["all"])
    other = runners["all"].run(state, qs, n=2, seed=4)
    assert [e.tokens for e in other] != [e.tokens for e in got["all"]]  # the seed matters
    # Rows of one group sample differently (their keys differ by episode).
    assert got["all"][0].tokens != got["all"][1].tokens


def test_slots_on_a_mesh_split_over_batch_devices_and_equal_one_device(tok, retriever):
    from tspo_jax import sharding as shd

    runners, state = _runners(tok, retriever, SEARCH_TURN, {"one": dict(slots=4, decode_chunk=6)}, max_turns=2)
    expect = runners["one"].run(state, QS, n=2)
    mesh = shd.make_mesh((2, 2, 2))
    smp = runners["one"].sampler
    sharded = sampling.Sampler(smp.graphdef, smp.cfg, eos_ids=[tok.eos_id], pad_id=tok.pad_id,
                               stop_strings=rollout.STOP_STRINGS, token_bytes=tok.token_bytes, mesh=mesh)
    runner = rollout.EpisodeRunner(sharded, tok, retriever, _cfg(max_turns=2, slots=4, decode_chunk=6))
    placed = jax.device_put(state, shd.state_shardings(state, mesh))
    got = runner.run(placed, QS, n=2)
    _same_episodes(got, expect)
    # Decoding from a copy gathered over fsdp (kept split over tensor) gives the same episodes.
    gathered = sharded.gathered(placed)
    specs = [x.sharding.spec for x in jax.tree.leaves(gathered)]
    assert not any("fsdp" in str(sp) for sp in specs) and any("tensor" in str(sp) for sp in specs)
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(placed))  # there was something to gather
    runner.cfg = _cfg(max_turns=2, slots=4, decode_chunk=6, gather_params=True)
    _same_episodes(runner.run(placed, QS, n=2), expect)
    gen = sharded.init_slots(4, 64)
    assert gen.cache.k[0].sharding.spec[0] == shd.BATCH_AXES
    assert gen.cache.k[0].addressable_shards[0].data.shape[0] == 1  # 4 slots over 4 batch devices
    # 6 slots are padded to 8 (a multiple of the 4 batch devices), not to a power of two.
    runner.cfg = _cfg(max_turns=2, slots=6)
    runner.run(state, QS, n=2)
    assert runner.stats["cache_rows"] == 8


def test_abstract_calls_lower_without_weights_or_data(tok, retriever):
    runners, state = _runners(tok, retriever, ANSWER_TURN, {"x": {}})
    smp = runners["x"].sampler
    shapes = jax.eval_shape(lambda: state)
    gen = smp.abstract_cache(6, 160)
    assert gen.cache.k[0].shape == (6, smp.cfg.num_kv_heads, 160, smp.cfg.head_dim)
    for name in ("prefill", "refill", "append", "decode"):
        fn, args, kw = smp.abstract_call(name, shapes, rows=6, length=160, block=32, block_rows=2, chunk=8)
        assert fn.lower(*args, **kw) is not None
    with pytest.raises(ValueError, match="unknown function"):
        smp.abstract_call("score", shapes, rows=6, length=160)


@pytest.mark.parametrize("rows, fill_rows, expect", [
    (10, 0, [(0, 10, 16)]),  # all at once, padded to a power of two
    (10, 4, [(0, 4, 4), (4, 8, 4), (8, 10, 2)]),
    (5, 3, [(0, 3, 3), (3, 5, 2)]),  # never padded past fill_rows (3, not 4)
    (640, 128, [(a, a + 128, 128) for a in range(0, 640, 128)]),
    (1, 128, [(0, 1, 1)]),
])
def test_fill_calls_split_and_pad(rows, fill_rows, expect):
    assert rollout.fill_calls(rows, fill_rows) == expect


def test_bad_slot_settings():
    with pytest.raises(ValueError, match="fill_rows must be"):
        rollout.RolloutConfig(fill_rows=-1)
    with pytest.raises(ValueError, match="decode_chunk must be"):
        rollout.RolloutConfig(decode_chunk=0)
    with pytest.raises(ValueError, match="slots must be"):
        rollout.RolloutConfig(slots=-2)
    with pytest.raises(ValueError, match="engine must be"):
        rollout.RolloutConfig(engine="vllm")
