"""The benchmark: its cost model against XLA's own count and brute force, its PyTorch baselines
against our modules (same loss, same gradients, same episodes), its timing harness, and a smoke
run of `python -m tspo_jax.benchmark` on the shrunken tiny config (no timing assertions)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tspo_jax import losses, rollout, sampling
from tspo_jax.bench import configs, costs, scripted, searchr1, timing, torch_ppo, update_step
from tspo_jax.model import params as params_lib
from tspo_jax.model import qwen2

# The demo policy's shape with the demo tokenizer's vocabulary (scripted episodes use its ids).
TINY = qwen2.Qwen2Config(vocab_size=configs.load_bench_tokenizer("demo").vocab_size, **configs.TINY_ARCH)


@pytest.fixture(scope="module")
def tok():
    return configs.load_bench_tokenizer("demo")


@pytest.fixture(scope="module")
def pair():
    jm = configs.random_model(TINY, seed=3)
    return jm, configs.torch_model(jm, "float32")


# --- cost model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_weight_counts_match_the_model_arrays(tie):
    cfg = TINY.replace(tie_word_embeddings=tie)
    model = configs.random_model(cfg)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    sizes = {jax.tree_util.keystr(p): x.size for p, x in leaves}
    assert cfg.num_params() == sum(sizes.values())
    kernels = sum(n for k, n in sizes.items() if "kernel" in k)
    head = cfg.vocab_size * cfg.hidden_size
    assert costs.matmul_weights(cfg) == kernels + head
    embed_read = head if tie else 0  # an untied table is only looked up, a tied one is the head
    assert costs.weights_read(cfg) == 4 * (sum(sizes.values()) - head + embed_read)


def test_forward_flops_match_xla_cost_analysis():
    """One token per row (no attention beyond itself): XLA's FLOP count of our forward is the
    matmul count plus elementwise work, which is small for this shape."""
    model = configs.random_model(TINY)
    graphdef, state = nnx.split(model)
    tokens = jnp.ones((16, 1), jnp.int32)
    compiled = jax.jit(lambda s, t: qwen2.apply(graphdef, s, t)[0]).lower(state, tokens).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    xla = analysis["flops"]
    ours = costs.forward_tokens_cost(TINY, [(0, 1)] * 16).flops
    assert ours <= xla <= 1.1 * ours, (ours, xla)
    # A block of several tokens needs the LM head at its last token only (sampling), or at every
    # token (training): our forward computes all, so XLA's count matches all_logits=True.
    block = jnp.ones((4, 5), jnp.int32)
    compiled = jax.jit(lambda s, t: qwen2.apply(graphdef, s, t)[0]).lower(state, block).compile()
    analysis = compiled.cost_analysis()
    xla = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
    full = costs.forward_tokens_cost(TINY, [(0, 5)] * 4, all_logits=True).flops
    last = costs.forward_tokens_cost(TINY, [(0, 5)] * 4).flops
    head = 2 * TINY.hidden_size * TINY.vocab_size
    assert full - last == pytest.approx(4 * 4 * head)
    assert full <= xla <= 1.15 * full, (full, xla)


def test_attention_flops_count_every_key_once():
    cfg = TINY
    cached, new = 5, 4
    brute = sum(costs.attention_flops(cfg, cached + j + 1) for j in range(new))
    head = 2 * cfg.hidden_size * cfg.vocab_size
    matmuls = new * (2 * costs.matmul_weights(cfg) - head) + head  # the LM head at the last token only
    got = costs.forward_tokens_cost(cfg, [(cached, new)]).flops - matmuls
    assert math.isclose(got, brute, rel_tol=1e-12)


def test_decode_step_bytes_are_weights_plus_the_caches_read():
    cfg = TINY
    steps = costs.decode_steps(cfg, [3, 10], 4)
    kv = costs.kv_bytes_per_token(cfg)
    assert kv == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    for s, c in enumerate(steps):
        assert c.bytes == costs.weights_read(cfg) + kv * ((3 + s + 1) + (10 + s + 1))
    lim = costs.Limits(bandwidth=1e9, matmul_flops=1e12)
    assert costs.sequential_limit(steps, lim) == pytest.approx(sum(max(c.flops / 1e12, c.bytes / 1e9) for c in steps))
    with pytest.raises(ValueError, match="positive"):
        costs.Limits(bandwidth=0.0, matmul_flops=1.0)


def test_episode_limit_forwards_every_token_but_the_last_once():
    from tspo_jax.bench.episodes import episode_limit

    def turn(a, b, obs):
        return rollout.Turn("search", (a, b), obs, "", None)

    # Row 0: prompt 3, turn 4, obs 5, turn 2. Row 1: prompt 6, turn 1, obs 2, turn 3.
    eps = [
        rollout.Episode("a", 3, list(range(14)), [], [], [], [turn(3, 7, (7, 12)), turn(12, 14, None)], None, ""),
        rollout.Episode("b", 6, list(range(12)), [], [], [], [turn(6, 7, (7, 9)), turn(9, 12, None)], None, ""),
    ]
    flops_bound = costs.Limits(bandwidth=1e30, matmul_flops=1.0)
    got = episode_limit(TINY, eps, flops_bound)
    head = 2 * TINY.hidden_size * TINY.vocab_size
    body = 2 * costs.matmul_weights(TINY) - head
    brute = 0.0
    for e in eps:
        n = len(e.tokens) - 1  # the last token is sampled, never fed back
        brute += n * body + sum(costs.attention_flops(TINY, p + 1) for p in range(n))
        # Logits are needed where the model samples: at the end of the prompt / an observation,
        # and after each sampled policy token except a turn's last.
        brute += head * sum(t.policy_span[1] - t.policy_span[0] for t in e.turns)
    assert got == pytest.approx(brute, rel=1e-12)


def test_method_limits_count_each_methods_own_work():
    from tspo_jax.bench.episodes import method_limits, synthetic_episodes

    eps = synthetic_episodes(rows=2, prompt_len=5, turn_len=3, obs_len=4, searches=2)
    assert [len(e.tokens) for e in eps] == [5 + 3 * 3 + 2 * 4] * 2
    flops_bound = costs.Limits(bandwidth=1e30, matmul_flops=1.0)
    got = method_limits(TINY, eps, max_response_length=6, limits=flops_bound)
    w = 2 * costs.matmul_weights(TINY)
    head = 2 * TINY.hidden_size * TINY.vocab_size
    # Re-prefill: before turn k the whole context (5, 12, 19 tokens) again (logits at its last
    # token only), then 2 decode steps.
    ctx = [5, 12, 19]
    brute = 0.0
    for c in ctx:
        brute += c * (w - head) + head + sum(costs.attention_flops(TINY, p + 1) for p in range(c))
        brute += sum(w + costs.attention_flops(TINY, c + s + 1) for s in range(2))
    assert got["reprefill"] == pytest.approx(2 * brute, rel=1e-12)
    # Search-R1 decodes to the limit: 5 steps a turn instead of 2.
    extra = sum(w + costs.attention_flops(TINY, c + s + 1) for c in ctx for s in range(2, 5))
    assert got["searchr1_torch"] == pytest.approx(2 * (brute + extra), rel=1e-12)
    assert got["interrupt_resume"] < got["reprefill"] < got["searchr1_torch"]


# --- timing harness ---------------------------------------------------------------------------------
def test_interleaved_rotates_the_order_and_excludes_warmup():
    calls = []

    def make(name, durations):
        it = iter(durations)

        def run():
            calls.append(name)
            return {"part": next(it)}

        return run

    s = timing.interleaved({"a": make("a", [9.0, 1.0, 3.0, 2.0]), "b": make("b", [7.0, 5.0, 4.0, 6.0])}, reps=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert s["a"].first["part"] == 9.0 and s["a"].parts["part"] == [1.0, 3.0, 2.0]
    assert s["a"].median("part") == 2.0 and s["b"].median("part") == 5.0
    assert s["a"].spread("part") == pytest.approx(1.0)
    assert s["a"].summary()["reps"] == 3
    with pytest.raises(ValueError, match="reps"):
        timing.interleaved({"a": lambda: {}}, reps=0)
    with pytest.raises(ValueError, match="bad duration"):
        timing.interleaved({"a": lambda: {"x": -1.0}}, reps=1)


def test_profile_summarises_ops_per_module(tmp_path):
    from tspo_jax.bench.profile import profile

    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    prof = profile(lambda: f(x).block_until_ready(), str(tmp_path))
    mods = [m for m in prof["modules"] if "lambda" in m]
    assert prof["wall_s"] > 0 and mods, prof["modules"].keys()
    ops = prof["modules"][mods[0]]["top_ops"]
    assert ops and all(ms >= 0 and n >= 1 for _, ms, n, _ in ops)


# --- PyTorch baselines --------------------------------------------------------------------------------
def _numpy_loss(logp, old, ref, adv, mask, ent, eps=0.2, kl=0.001, ec=0.001):
    ratio = np.exp(np.clip(logp - old, -20, 20))
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    d = np.clip(ref - logp, -20, 20)
    klv = np.clip(np.exp(d) - d - 1, -10, 10)
    mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    return mean(pg) + kl * mean(klv) - ec * mean(ent)


def test_torch_policy_loss_matches_ours_and_numpy():
    rs = np.random.default_rng(0)
    shape = (3, 11)
    logp = -rs.uniform(0.05, 4, shape)
    arrays = dict(
        logp=logp, old=logp + rs.normal(0, 0.3, shape), ref=logp + rs.normal(0, 0.3, shape),
        adv=rs.normal(size=shape), mask=(rs.random(shape) < 0.6).astype(float), ent=rs.uniform(0, 3, shape),
    )
    arrays["mask"][0, 0] = 1.0
    a32 = {k: v.astype(np.float32) for k, v in arrays.items()}
    t = {k: torch.as_tensor(v) for k, v in a32.items()}
    theirs = float(torch_ppo.policy_loss(t["logp"], t["old"], t["ref"], t["adv"], t["mask"], t["ent"]))
    j = {k: jnp.asarray(v) for k, v in a32.items()}
    ours, _ = losses.policy_loss(j["logp"], j["old"], j["ref"], j["adv"], j["mask"], j["ent"], losses.default_config())
    ref = _numpy_loss(**arrays)
    assert theirs == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert float(ours) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def _leaf(state, path):
    for p in path:
        state = state[p]
    return np.asarray(state.get_value() if isinstance(state, nnx.Variable) else state)


def test_torch_step_has_our_gradients(pair):
    """The PyTorch step's gradients, mapped to HF layout, equal JAX's gradients of the same loss
    through our model, on a ragged right-padded batch."""
    jm, tm = pair
    cfg = jm.cfg
    batch = update_step.synthetic_episodes(4, 48, cfg.vocab_size, seed=5)
    # Old / reference logprobs near the model's own (ratios near 1, as in training).
    with torch.no_grad():
        t = torch_ppo.to_torch(batch, "cpu")
        lp = torch_ppo.token_logprobs_and_entropy(tm, t["tokens"], t["valid"])[0].numpy()
    rs = np.random.default_rng(6)
    for k in ("old_logp", "ref_logp"):
        batch[k] = np.pad(lp + 0.05 * rs.standard_normal(lp.shape), ((0, 0), (1, 0))).astype(np.float32)
        batch[k] *= batch["loss_mask"]
    params = nnx.state(jm, nnx.Param)
    loss_cfg = losses.default_config()
    graphdef = nnx.graphdef(jm)

    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        hidden, _ = model(jnp.asarray(batch["tokens"]), valid=jnp.asarray(batch["valid"]), return_hidden=True)
        logp, ent = losses.token_logprobs_and_entropy(
            hidden[:, :-1], model.lm_head_kernel(), jnp.asarray(batch["tokens"][:, 1:]), chunk_size=16)
        s = {k: jnp.asarray(batch[k][:, 1:]) for k in ("old_logp", "ref_logp", "advantages", "loss_mask")}
        return losses.policy_loss(logp, s["old_logp"], s["ref_logp"], s["advantages"], s["loss_mask"], ent,
                                  loss_cfg)[0]

    jloss, jgrads = jax.jit(jax.value_and_grad(loss_fn))(params)
    step = torch_ppo.TorchPolicyStep(tm, lr=1e-6)
    tm.zero_grad(set_to_none=True)
    tloss = step.loss(torch_ppo.to_torch(batch, "cpu"))
    tloss.backward()
    assert float(tloss.detach()) == pytest.approx(float(jloss), rel=1e-5, abs=1e-7)
    tgrads = dict(tm.named_parameters())
    scale = max(np.abs(p.grad.numpy()).max() for p in tgrads.values() if p.grad is not None)
    checked = 0
    for hf_key, path, rule in params_lib.expected_weights(cfg):
        ours = rule.to_hf(_leaf(jgrads, path), cfg)
        theirs = tgrads[hf_key].grad.numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-5 * scale, rtol=0, err_msg=hf_key)
        checked += 1
    assert checked == len(tgrads) and scale > 0


def test_torch_model_has_our_weights(pair):
    jm, tm = pair
    ids = np.random.default_rng(1).integers(1, 1000, (2, 9))
    ours, _ = jm(jnp.asarray(ids))
    with torch.no_grad():
        theirs = tm(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_thread_calibration_picks_a_measured_setting(pair):
    _, tm = pair
    before = torch.get_num_threads()
    try:
        got = configs.calibrate_torch_threads(tm, reps=1)
        assert got["threads"] in (1, before) and torch.get_num_threads() == got["threads"]
        assert got["probe_s"][str(got["threads"])] == min(got["probe_s"].values())
    finally:
        torch.set_num_threads(before)


def test_searchr1_cut_and_parse_follow_search_r1():
    assert searchr1.cut_response("a<search>q</search> more </search>") == "a<search>q</search>"
    # Search-R1 looks for </search> first, even behind an earlier </answer>.
    assert searchr1.cut_response("<answer>x</answer><search>q</search>z") == "<answer>x</answer><search>q</search>"
    assert searchr1.cut_response("<answer> x </answer> tail") == "<answer> x </answer>"
    assert searchr1.cut_response("nothing") == "nothing"
    assert searchr1.parse("t <search> who </search>") == ("search", "who")
    assert searchr1.parse("<answer>Paris</answer>") == ("answer", "Paris")
    assert searchr1.parse("<search>a</answer>") == (None, "")


# --- the scripted policy -----------------------------------------------------------------------------
def test_scripted_model_follows_the_script_in_jax_and_torch(tok):
    obs = scripted.observation_example(tok, 64)
    script = scripted.make_script(tok, 16, obs)
    assert len(script.turn_ids) == 16 and script.turn_text.endswith("</search>")
    model = scripted.script_weights(configs.random_model(TINY.replace(tie_word_embeddings=False)), script.successors)
    graphdef, state = nnx.split(model)
    smp = sampling.Sampler(graphdef, model.cfg, eos_ids=[tok.eos_id], pad_id=tok.pad_id,
                           stop_strings=rollout.STOP_STRINGS, token_bytes=tok.token_bytes)
    # Ragged prompts, one of them ending in an observation: each must start the scripted turn.
    prompts = [list(script.prompts[0]), list(script.prompts[1]) + list(obs)]
    outs = smp.generate(state, prompts, max_new_tokens=40, sampling=sampling.SamplingParams(greedy=True))
    for o in outs:
        assert o["token_ids"] == list(script.turn_ids) and o["stop_string"] == "</search>"
    tm = configs.torch_model(model, "float32")
    with torch.no_grad():
        gen = tm.generate(torch.as_tensor([prompts[1]]), max_new_tokens=20, do_sample=False)
    assert gen[0, len(prompts[1]) : len(prompts[1]) + 16].tolist() == list(script.turn_ids)


def test_script_errors_are_clear(tok):
    obs = scripted.observation_example(tok, 64)
    with pytest.raises(configs.BenchmarkError, match="turn_tokens"):
        scripted.make_script(tok, 3, obs)
    with pytest.raises(configs.BenchmarkError, match="two successors"):
        scripted.successor_map([[1, 2], [1, 3]])
    with pytest.raises(configs.BenchmarkError, match="untied"):
        scripted.script_weights(configs.random_model(TINY), {1: 2})


# --- command line --------------------------------------------------------------------------------------
def test_bad_arguments_are_named():
    from tspo_jax import benchmark

    for argv, msg in ((["--config=huge"], "huge"), (["--batches=0"], "positive"), (["--out=x.txt"], ".json")):
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)


def test_smoke_run_writes_json_and_markdown(tmp_path, capsys):
    from tspo_jax import benchmark

    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    res = benchmark.main(["--config=tiny", "--smoke", f"--out={out}", f"--cache_dir={tmp_path / 'cache'}",
                          f"--profile={tmp_path / 'prof'}"])
    saved = json.loads(out.read_text())
    assert saved["configs"].keys() == res["configs"].keys() == {"tiny"}
    assert torch.get_num_threads() == threads  # the calibration's setting does not leak
    c = saved["configs"]["tiny"]
    assert saved["machine"]["cpu_cores"] >= 1 and saved["limits"]["bandwidth"] > 0
    assert {(p["batch"], p["mode"]) for p in c["decode"]} == {(2, "greedy"), (2, "sampled")}
    for p in c["decode"]:
        for who in ("ours", "transformers"):
            rates = p[who]["tokens_per_s"]
            assert all(math.isfinite(v) and v > 0 for v in rates.values())
            assert 0 < p[who]["pct_of_limit"]["decode"]
        if p["mode"] == "greedy":
            assert p["greedy_rows_equal"] == 1.0  # same weights, fp32: the same tokens
    e = c["episodes"]
    assert e["turns"] == 2 and e["episode_tokens"][0] > e["observation_tokens"][0]
    assert e["searchr1_generated_tokens"] == 2 * 2 * 24  # rows x turns x the per-turn limit
    for m in ("interrupt_resume", "reprefill", "searchr1_torch"):
        assert e[m]["episodes_per_s"] > 0 and e[m]["pct_of_limit"] > 0
    # The slot engine's contenders and the KV-reusing PyTorch loop ran the same episodes (checked
    # inside); the long-tailed shape sampled turns of different lengths, replayed by PyTorch.
    for m in ("slots_quarter", "lockstep", "torch_kv_reuse"):
        assert e[m]["episodes_per_s"] > 0 and e[m]["kv_bytes"] > 0
    lt = e["long_tailed"]
    assert lt["rows"] == 4 and lt["turn_tokens"]["max"] <= 24 < lt["policy_tokens"]
    assert lt["turn_tokens"]["max"] > lt["turn_tokens"]["median"]  # the turns differ in length
    for m in ("interrupt_resume", "slots_quarter", "lockstep", "reprefill", "searchr1_torch", "torch_kv_reuse"):
        assert lt[m]["episodes_per_s"] > 0
    assert 0 < lt["lockstep"]["occupancy"] <= lt["interrupt_resume"]["occupancy"] <= 1
    assert lt["slots_quarter"]["kv_bytes"] < lt["lockstep"]["kv_bytes"]  # KV grows with S, not rows
    u = c["update"]
    assert u["loss_rel_diff"] < 1e-4 and u["grad_norm_rel_diff"] < 1e-3
    assert u["ours"]["compiles"] in (2, None)  # the micro-batch gradient and the step, once each
    assert any("decode" in m for m in c["decode"][0]["ours_profile"]["modules"])
    assert any("accumulate" in m for m in u["ours_profile"]["modules"])
    md = (tmp_path / "bench.md").read_text()
    for heading in ("## tiny", "### Decode", "### Search episodes", "### Policy-update step", "Measured limits",
                    "Profile of ours", "Long-tailed shape", "torch_kv_reuse"):
        assert heading in md
