"""Decode throughput: our jitted sampler vs transformers `generate` on the same weights and prompts.

Every contender generates exactly `new_tokens` per row (no EOS stop on either side). Prefill and
decode are timed apart: ours are two calls; for transformers a logits processor notes the time
of its first call, which comes right after the prompt's forward pass, so one `generate` call is
split into prefill and decode without running the prompt twice. Decode tokens/s counts the
`new_tokens` sampled per row (ours runs one forward more than transformers for them: the last
token is written into the cache too).
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
from flax import nnx

from tspo_jax import sampling
from tspo_jax.bench import costs, timing
from tspo_jax.bench.configs import BenchmarkError

log = logging.getLogger(__name__)

MODES = ("greedy", "sampled")


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> np.ndarray:
    # Never id 0 (the pad id both sides are given) so no token is mistaken for padding.
    return np.random.default_rng(seed).integers(1, vocab, (batch, prompt_len), dtype=np.int32)


class _Clock:
    """A transformers LogitsProcessor that records when it is first called."""

    def __init__(self):
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def ours_contender(model, prompts: np.ndarray, new_tokens: int, mode: str, out: dict, seed: int = 0):
    graphdef, state = nnx.split(model)
    sampler = sampling.Sampler(graphdef, model.cfg, eos_ids=(), pad_id=0)
    sampling_params = sampling.SamplingParams(greedy=mode == "greedy", temperature=1.0)
    b, t = prompts.shape
    tokens, valid = jax.device_put(prompts), jax.device_put(np.ones((b, t), bool))
    max_len = sampling.bucket(t + new_tokens, 64)
    calls = [0]

    def run():
        calls[0] += 1
        t0 = time.perf_counter()
        gen = sampler.prefill(state, tokens, valid, max_len)
        jax.block_until_ready(gen.next_logits)
        t1 = time.perf_counter()
        gen, res = sampler.decode(state, gen, jax.random.key(seed + calls[0]), max_new=new_tokens, sampling=sampling_params)
        out["tokens"] = np.asarray(res.tokens)
        t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0}

    return run, sampler


def hf_contender(model, prompts: np.ndarray, new_tokens: int, mode: str, out: dict, compiled: bool = False):
    import torch
    import transformers

    dev = model.device
    ids = torch.as_tensor(prompts, dtype=torch.long, device=dev)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, pad_token_id=0, do_sample=mode == "sampled")
    if mode == "sampled":
        kw.update(temperature=1.0, top_k=0, top_p=1.0)  # plain softmax sampling, as ours
    if compiled:
        cc = transformers.CompileConfig(fullgraph=False, mode="default" if dev.type == "cpu" else "reduce-overhead")
        cc._compile_all_devices = True  # transformers compiles only on accelerators unless told
        kw.update(cache_implementation="static", compile_config=cc)
    gc = transformers.GenerationConfig(**kw)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run():
        clock = _Clock()
        with torch.inference_mode():
            t0 = time.perf_counter()
            res = model.generate(ids, attention_mask=mask, generation_config=gc, logits_processor=[clock])
            sync()
            t2 = time.perf_counter()
        gen = res[:, prompts.shape[1] :].cpu().numpy()
        if gen.shape[1] != new_tokens:
            raise BenchmarkError(f"transformers generated {gen.shape[1]} tokens, asked for {new_tokens}")
        out["tokens"] = gen
        return {"prefill": clock.first - t0, "decode": t2 - clock.first, "total": t2 - t0}

    return run


def _rates(s: timing.Samples, b: int, t: int, n: int, limit: dict) -> dict:
    med = {k: s.median(k) for k in ("prefill", "decode", "total")}
    return {
        **s.summary(),
        "tokens_per_s": {
            "prefill": b * t / med["prefill"],
            "decode": b * n / med["decode"],
            "end_to_end": b * n / med["total"],
        },
        "pct_of_limit": {
            "prefill": 100 * limit["prefill"] / med["prefill"],
            "decode": 100 * limit["decode"] / med["decode"],
            "end_to_end": 100 * limit["end_to_end"] / med["total"],
        },
    }


def limit_seconds(cfg, batch: int, prompt_len: int, new_tokens: int, limits: costs.Limits) -> dict:
    """Prefill gives the first token's logits; the other new_tokens - 1 need one step each."""
    pre = costs.prefill_cost(cfg, [prompt_len] * batch).seconds(limits)
    dec = costs.sequential_limit(costs.decode_steps(cfg, [prompt_len] * batch, new_tokens - 1), limits)
    return {"prefill": pre, "decode": dec, "end_to_end": pre + dec}


def measure_point(jmodel, tmodel, batch, prompt_len, new_tokens, mode, *, reps, limits, with_compile, seed=0,
                  profile_dir=None):
    if mode not in MODES:
        raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
    cfg = jmodel.cfg
    prompts = random_prompts(batch, prompt_len, cfg.vocab_size, seed)
    outs = {"ours": {}, "transformers": {}, "transformers_compile": {}}
    contenders = {}
    contenders["ours"], _ = ours_contender(jmodel, prompts, new_tokens, mode, outs["ours"], seed)
    contenders["transformers"] = hf_contender(tmodel, prompts, new_tokens, mode, outs["transformers"])
    result = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "mode": mode}
    compile_error = None
    if with_compile:
        run = hf_contender(tmodel, prompts, new_tokens, mode, outs["transformers_compile"], compiled=True)
        try:
            t0 = time.perf_counter()
            run()  # fail fast, before the timed rounds, if torch.compile cannot work here
            log.info("  torch.compile first call %.1fs", time.perf_counter() - t0)
            contenders["transformers_compile"] = run
        except Exception as e:  # noqa: BLE001 - any compiler failure is reported, not fatal
            compile_error = f"{type(e).__name__}: {e}"[:500]
            log.warning("  static cache + torch.compile failed here: %s", compile_error)
    samples = timing.interleaved(contenders, reps)
    limit = limit_seconds(cfg, batch, prompt_len, new_tokens, limits)
    result["limit_s"] = limit
    for name, s in samples.items():
        result[name] = _rates(s, batch, prompt_len, new_tokens, limit)
    if compile_error:
        result["transformers_compile"] = {"error": compile_error}
    for name in ("transformers", "transformers_compile"):
        if name in samples:
            result[f"ratio_vs_{name}"] = {
                k: result["ours"]["tokens_per_s"][k] / result[name]["tokens_per_s"][k]
                for k in ("prefill", "decode", "end_to_end")
            }
    if mode == "greedy":
        # Same weights, same fp32 arithmetic up to summation order: greedy rows should agree
        # (random weights can have near-ties, so this is reported, not required).
        a, b = outs["ours"]["tokens"], outs["transformers"]["tokens"]
        result["greedy_rows_equal"] = float(np.mean(np.all(a == b, axis=1)))
        agree = np.cumprod(a == b, axis=1).sum(axis=1)
        result["greedy_tokens_before_divergence"] = float(agree.mean())
    if profile_dir:
        from tspo_jax.bench.profile import profile

        result["ours_profile"] = profile(contenders["ours"], f"{profile_dir}/decode_b{batch}_t{prompt_len}_{mode}")
    return result


def run(jmodel, tmodel, spec, *, reps, limits, on_result=None, profile_dir=None) -> list[dict]:
    results = []
    for b, t, mode in spec.points():
        log.info("decode: batch %d, prompt %d, %d new tokens, %s", b, t, spec.new_tokens, mode)
        r = measure_point(
            jmodel, tmodel, b, t, spec.new_tokens, mode, reps=reps, limits=limits,
            with_compile=(b, t, mode) in spec.compile_points, profile_dir=profile_dir,
        )
        results.append(r)
        if on_result:
            on_result(results)
    return results
