"""Throughput against the PyTorch baselines and against what the machine allows.

  python -m tspo_jax.benchmark [--config=tiny,0.5b-random,0.5b-real] [--measure=decode,episodes,update]
                               [--out=benchmark.json] [--reps=N] [--batches=1,8,32] [--prompt_lens=128]
                               [--new_tokens=N] [--modes=greedy,sampled] [--torch_compile=auto|off|all]
                               [--smoke]

Writes FILE.json and FILE.md (a markdown table) with the machine, versions, configs and, per
measurement, medians of interleaved repetitions (warm-up excluded, compile time apart), the ratio
to the PyTorch baseline and the "% of limit" against the memory bandwidth and matmul rate measured
in the same run. See docs/BENCHMARKS.md for what each measurement does and the latest numbers.
On a GPU the same command runs in bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import os
import shlex
import sys
import time

import jax

from tspo_jax.bench import configs, costs, decode, episodes, machine, report, update_step

log = logging.getLogger("tspo_jax.benchmark")

MEASUREMENTS = ("decode", "episodes", "update")


def _ints(s: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in s.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _names(allowed):
    def parse(s: str) -> tuple[str, ...]:
        vals = tuple(x for x in s.split(",") if x)
        if vals == ("all",):
            return tuple(allowed)
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"{bad or s!r} not among {', '.join(allowed)} (or 'all')")
        return vals

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tspo_jax.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=_names(configs.CONFIGS), default=("tiny",),
                   help="comma-separated configs: " + ", ".join(configs.CONFIGS) + ", or all")
    p.add_argument("--measure", type=_names(MEASUREMENTS), default=None,
                   help="decode,episodes,update (default: what each config measures)")
    p.add_argument("--out", default="benchmark.json", help="JSON path; the markdown goes beside it (.md)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: per config)")
    p.add_argument("--batches", type=_ints, default=None, help="decode batch sizes, e.g. 1,8,32")
    p.add_argument("--prompt_lens", type=_ints, default=None, help="decode prompt lengths, e.g. 128,512")
    p.add_argument("--new_tokens", type=int, default=None, help="decode tokens per row")
    p.add_argument("--modes", type=_names(decode.MODES), default=None, help="greedy,sampled")
    p.add_argument("--torch_compile", choices=("auto", "off", "all"), default="auto",
                   help="transformers static cache + torch.compile: at the config's points, never, or everywhere")
    p.add_argument("--checkpoint", default=configs.DEFAULT_CHECKPOINT, help="the real checkpoint for 0.5b-real")
    p.add_argument("--cache_dir", default=os.path.expanduser("~/.cache/tspo_jax/bench"),
                   help="where the episode benchmark keeps its corpus and index")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, run ours once more under jax.profiler (perfetto traces in DIR) and put "
                        "the top XLA ops of each compiled module in the JSON")
    p.add_argument("--torch_threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one repetition (CI)")
    p.add_argument("--rescore", action="store_true",
                   help="measure nothing: recompute every limit and %% of limit in --out (and its markdown) "
                        "with the current cost model, from the stored timings and machine limits")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    if args.new_tokens is not None and args.new_tokens < 2:
        p.error(f"--new_tokens must be >= 2 (prefill makes the first), got {args.new_tokens}")
    if not args.out.endswith(".json"):
        p.error(f"--out must name a .json file (the markdown goes beside it), got {args.out!r}")
    return args


def resolve_config(name: str, args) -> configs.BenchConfig:
    bc = configs.CONFIGS[name]
    if bc.checkpoint:
        bc = bc.replace(checkpoint=args.checkpoint, tokenizer=args.checkpoint)
    if args.smoke:
        bc = configs.smoke(bc)
    d = bc.decode
    if args.batches or args.prompt_lens or args.modes:  # an explicit grid replaces the config's points
        d = dataclasses.replace(d, batches=args.batches or d.batches, prompt_lens=args.prompt_lens or d.prompt_lens,
                                modes=args.modes or d.modes, extra_points=())
    if args.new_tokens:
        d = dataclasses.replace(d, new_tokens=args.new_tokens)
    if args.torch_compile == "off":
        d = dataclasses.replace(d, compile_points=())
    elif args.torch_compile == "all":
        d = dataclasses.replace(d, compile_points=tuple(d.points()))
    if args.reps:  # an explicit --reps applies to every measurement
        bc = bc.replace(update=dataclasses.replace(bc.update, reps=None),
                        episodes=bc.episodes and dataclasses.replace(bc.episodes, reps=None))
    return bc.replace(decode=d, reps=args.reps or bc.reps)


def model_summary(cfg) -> dict:
    return {
        "layers": cfg.num_layers,
        "hidden": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "vocab": cfg.vocab_size,
        "tied_head": cfg.tie_word_embeddings,
        "params": cfg.num_params(),
        "dtype": cfg.dtype,
        "weight_bytes": costs.weights_read(cfg),
    }


def _sub(root: str | None, name: str) -> str | None:
    return None if root is None else os.path.join(root, name)


def _save(res: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(out + ".tmp", out)
    md = out[: -len(".json")] + ".md"
    with open(md + ".tmp", "w") as f:
        f.write(report.render(res))
    os.replace(md + ".tmp", md)


def run_config(bc: configs.BenchConfig, args, dtype: str, limits: costs.Limits, res: dict, entry: dict) -> None:
    save = lambda *_: _save(res, args.out)  # noqa: E731 - partial results survive a crash
    measures = args.measure or bc.measures
    entry["measures"] = list(measures)
    tokenizer = configs.load_bench_tokenizer(bc.tokenizer)
    entry["model"] = model_summary(configs.model_config(bc, dtype, tokenizer.vocab_size))
    # Episodes first: they build their own (scripted) model pair, freed before the next pair.
    if "episodes" in measures:
        if bc.episodes is None:
            entry["episodes_skipped"] = "needs scripted weights: measured on 0.5b-random (same shape)"
        else:
            log.info("%s: search episodes", bc.name)
            entry["episodes"] = episodes.build_and_measure(
                bc, dtype, tokenizer, reps=bc.episodes.reps or bc.reps, limits=limits, cache_dir=args.cache_dir,
                profile_dir=_sub(args.profile, bc.name), calibrate_threads=not args.torch_threads)
            save()
            gc.collect()
    if not {"decode", "update"} & set(measures):
        return
    t0 = time.perf_counter()
    jmodel = configs.jax_model(bc, dtype, tokenizer.vocab_size)
    tmodel = configs.torch_model(bc.checkpoint or jmodel, dtype)
    entry["setup_s"] = time.perf_counter() - t0
    log.info("%s: models ready in %.1fs", bc.name, entry["setup_s"])
    if not args.torch_threads:
        entry["torch_threads"] = configs.calibrate_torch_threads(tmodel)
        log.info("%s: PyTorch threads %s", bc.name, entry["torch_threads"])
    if "decode" in measures:
        entry["decode"] = []

        def keep(points):
            entry["decode"] = list(points)
            save()

        decode.run(jmodel, tmodel, bc.decode, reps=bc.reps, limits=limits, on_result=keep,
                   profile_dir=_sub(args.profile, bc.name))
    if "update" in measures:
        log.info("%s: policy-update step", bc.name)
        side_by_side = update_step.fits_side_by_side(jmodel.cfg, machine.available_memory_bytes())
        if not args.torch_threads:
            entry["torch_threads_update"] = configs.calibrate_torch_threads(tmodel, train=True)
            log.info("%s: PyTorch threads for the update %s", bc.name, entry["torch_threads_update"])
        # Last: the step takes over (donates) our model's parameter buffers.
        entry["update"] = update_step.measure(jmodel, tmodel, bc.update, reps=bc.update.reps or bc.reps, limits=limits,
                                              profile_dir=_sub(args.profile, bc.name), side_by_side=side_by_side)
        save()


def main(argv=None) -> dict:
    import torch

    threads = configs.default_threads()
    try:
        return _main(parse_args(argv), argv)
    finally:
        torch.set_num_threads(threads)  # the calibration changes a process-wide setting


def rescore(path: str) -> dict:
    """Recomputes the limits of a results file with the current cost model (timings untouched)."""
    with open(path) as f:
        res = json.load(f)
    rescore_results(res)
    res.setdefault("notes", []).append("Limits recomputed with `--rescore` by the cost model of this version.")
    _save(res, path)
    return res


def rescore_results(res: dict) -> None:
    """Every limit and % of limit from the stored timings against the best bandwidth and matmul
    rate measured in the run (start and end): the ceiling is the best the machine showed."""
    limits = machine.combine([m for m in (res.get("limits"), res.get("limits_end")) if m])
    res["limits_used"] = {"bandwidth": limits.bandwidth, "matmul_flops": limits.matmul_flops}
    for name, entry in res["configs"].items():
        if "skipped" in entry or name not in configs.CONFIGS:
            continue
        bc = configs.CONFIGS[name]
        cfg = configs.model_config(bc, entry["model"]["dtype"], entry["model"]["vocab"])
        for p in entry.get("decode", []):
            p["limit_s"] = limit = decode.limit_seconds(cfg, p["batch"], p["prompt_len"], p["new_tokens"], limits)
            for who in ("ours", "transformers", "transformers_compile"):
                r = p.get(who)
                if r and "median_s" in r:
                    med = r["median_s"]
                    r["pct_of_limit"] = {"prefill": 100 * limit["prefill"] / med["prefill"],
                                         "decode": 100 * limit["decode"] / med["decode"],
                                         "end_to_end": 100 * limit["end_to_end"] / med["total"]}
        e = entry.get("episodes")
        if e:
            turn, obs = e["policy_tokens_per_turn"], e["observation_tokens"][0]
            prompt = e["episode_tokens"][0] - e["turns"] * turn - e["searches_per_episode"] * obs
            synthetic = episodes.synthetic_episodes(e["rows"], prompt, turn, obs, e["searches_per_episode"])
            own = episodes.method_limits(cfg.replace(tie_word_embeddings=False), synthetic, e["max_response_length"], limits)
            e["limit_s"] = own["interrupt_resume"]
            for m, lim in own.items():
                med = e[m]["median_s"]["total"]
                e[m].update(pct_of_limit=100 * e["limit_s"] / med, own_limit_s=lim, pct_of_own_limit=100 * lim / med)
        u = entry.get("update")
        if u:
            cost = costs.Cost(u["flops"], costs.update_cost(cfg, []).bytes)
            u["limit_s"] = cost.seconds(limits)
            for who in ("ours", "torch"):
                med = u[who]["median_s"]["total"]
                u[who].update(pct_of_limit=100 * u["limit_s"] / med,
                              pct_of_matmul_rate=100 * u["flops"] / med / limits.matmul_flops)


def _main(args, argv) -> dict:
    if args.rescore:
        return rescore(args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    dtype = configs.bench_dtype()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    size = "small" if args.smoke else "auto"
    res = {
        "command": "python -m tspo_jax.benchmark " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine.machine_info(),
        "dtype": dtype,
        "configs": {},
        "notes": [],
    }
    log.info("measuring the machine's bandwidth and matmul rate")
    res["limits"] = machine.measure_limits(dtype, size=size)
    limits = machine.combine([res["limits"]])
    if res["machine"]["jax_backend"] != "cpu" and res["machine"]["torch_device"] == "cpu":
        res["notes"].append("JAX ran on the accelerator but PyTorch has no CUDA here: the PyTorch baselines ran on "
                            "the CPU, so the ratios are not like for like.")
    for name in args.config:
        bc = resolve_config(name, args)
        entry = res["configs"].setdefault(name, {"about": bc.about, "reps": bc.reps})
        if not configs.checkpoint_available(bc):
            entry["skipped"] = (f"no checkpoint at {bc.checkpoint}; build it with "
                                "`python -m tspo_jax.model.build_offline_checkpoint`")
            log.warning("%s skipped: %s", name, entry["skipped"])
            continue
        entry["spec"] = {"decode": vars(bc.decode), "episodes": vars(bc.episodes) if bc.episodes else None,
                         "update": vars(bc.update)}
        run_config(bc, args, dtype, limits, res, entry)
        gc.collect()
        _save(res, args.out)
    res["limits_end"] = machine.measure_limits(dtype, size=size)
    res["load_avg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    rescore_results(res)  # against the best ceilings of the whole run
    _save(res, args.out)
    log.info("wrote %s and %s", args.out, args.out[: -len(".json")] + ".md")
    return res


if __name__ == "__main__":
    main()
    jax.effects_barrier()
