"""The benchmark's markdown: machine, versions, limits, then one table per measurement."""

from __future__ import annotations


def _f(x, digits=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _threads(c: dict) -> str:
    parts = []
    for key, label in (("torch_threads", "decode"), ("torch_threads_update", "update")):
        t = c.get(key)
        if t and t.get("threads"):
            probe = ", ".join(f"{n} thread(s) {v:.2f}s" for n, v in t["probe_s"].items())
            parts.append(f"{label} {t['threads']} ({probe})")
    ep = (c.get("episodes") or {}).get("torch_threads")
    if ep and ep.get("threads"):
        parts.append(f"episodes {ep['threads']}")
    return (" PyTorch intra-op threads, the faster on a probe: " + "; ".join(parts) + ".") if parts else ""


def machine_section(res: dict) -> list[str]:
    m = res["machine"]
    v = m["versions"]
    lim = res["limits"]
    load0 = m.get("load_avg_at_start") or [None]
    load1 = res.get("load_avg_at_end") or [None]
    lines = [
        f"- Machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), "
        f"{m['memory_gb']} GB; JAX {m['jax_backend']} x{m['jax_devices']} ({m['jax_device_kind']}); "
        f"PyTorch on {m['torch_device']} with {m['torch_threads']} threads",
        f"- Load average (1 min) at start / end: {_f(load0[0], 2)} / {_f(load1[0], 2)}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Measured limits at the start ({lim['dtype']}, best of 5 repetitions): memory bandwidth "
        f"{lim['bandwidth'] / 1e9:.1f} GB/s (JAX {lim['jax_bandwidth'] / 1e9:.1f}, PyTorch "
        f"{lim.get('torch_bandwidth', 0) / 1e9:.1f}); matmul {lim['matmul_flops'] / 1e9:.1f} GFLOP/s "
        f"(JAX {lim['jax_matmul_flops'] / 1e9:.1f}, PyTorch {lim.get('torch_matmul_flops', 0) / 1e9:.1f})",
    ]
    end = res.get("limits_end")
    if end:
        lines.append(f"- Limits measured again at the end: {end['bandwidth'] / 1e9:.1f} GB/s, "
                     f"{end['matmul_flops'] / 1e9:.1f} GFLOP/s")
    used = res.get("limits_used")
    if used:
        lines.append(f"- The percentages use the best of these: {used['bandwidth'] / 1e9:.1f} GB/s and "
                     f"{used['matmul_flops'] / 1e9:.1f} GFLOP/s")
    return lines + [""]


def decode_section(points: list[dict]) -> list[str]:
    header = ["batch", "prompt", "new", "mode",
              "ours prefill tok/s", "ours decode tok/s", "HF decode tok/s", "HF compile decode tok/s",
              "decode x HF", "end-to-end x HF", "ours % limit prefill / decode",
              "HF % limit decode", "greedy rows equal", "compile s ours / HF-compile", "spread ours / HF"]
    rows = []
    for p in points:
        o, h = p["ours"], p["transformers"]
        c = p.get("transformers_compile") or {}
        r = p.get("ratio_vs_transformers", {})
        rows.append([
            p["batch"], p["prompt_len"], p["new_tokens"], p["mode"],
            _f(o["tokens_per_s"]["prefill"]), _f(o["tokens_per_s"]["decode"]), _f(h["tokens_per_s"]["decode"]),
            ("failed" if "error" in c else _f(c["tokens_per_s"]["decode"])) if c else "-",
            _f(r.get("decode"), 2), _f(r.get("end_to_end"), 2),
            f"{_f(o['pct_of_limit']['prefill'])} / {_f(o['pct_of_limit']['decode'])}",
            _f(h["pct_of_limit"]["decode"]),
            _f(p.get("greedy_rows_equal"), 2) if p["mode"] == "greedy" else "-",
            f"{_f(o['compile_s'])} / {_f(c.get('compile_s')) if c and 'error' not in c else '-'}",
            f"{_f(o['spread']['total'], 2)} / {_f(h['spread']['total'], 2)}",
        ])
    return _table(header, rows)


def episodes_section(e: dict) -> list[str]:
    lines = [
        f"{e['rows']} episodes of {e['turns']} turns ({e['searches_per_episode']} searches, top-{e['topk']} docs, "
        f"observations of {e['observation_tokens'][:1]} tokens, {e['policy_tokens_per_turn']} policy tokens per "
        f"turn), {e['episode_tokens'][0]} tokens each; per-turn limit {e['max_response_length']} "
        f"(Search-R1 generated {e['searchr1_generated_tokens']:,} tokens to keep "
        f"{e['rows'] * e['turns'] * e['policy_tokens_per_turn']:,}). Model: {e['model']}.",
        "",
    ]
    header = ["method", "episodes/s", "policy tok/s", "median s", "% of limit", "% of its own limit",
              "slots x faster", "occupancy", "KV MB", "compile s", "retrieval s", "spread"]
    rows = []
    for name in ("interrupt_resume", "slots_quarter", "lockstep", "reprefill", "searchr1_torch", "torch_kv_reuse"):
        s = e.get(name)
        if not s:
            continue
        ratio = e.get(f"ratio_vs_{name}")
        rows.append([_label(name, e), _f(s["episodes_per_s"], 2), _f(s["policy_tokens_per_s"]),
                     _f(s["median_s"]["total"], 2), _f(s.get("pct_of_limit")), _f(s.get("pct_of_own_limit")),
                     _f(ratio, 2) if ratio else "-", _f(s.get("occupancy"), 2), _mb(s.get("kv_bytes")),
                     _f(s["compile_s"]), _f(s["median_s"].get("retrieval"), 3), _f(s["spread"]["total"], 2)])
    lines += _table(header, rows)
    lt = e.get("long_tailed")
    if lt:
        tt = lt["turn_tokens"]
        lines += [f"Long-tailed shape: {lt['rows']} sampled episodes, {lt['turns']} turns, turn length mean "
                  f"{tt['mean']:.0f}, median {tt['median']:.0f}, p90 {tt['p90']:.0f}, max {tt['max']} "
                  f"({tt['at_limit']} at the {lt['max_response_length']}-token limit); {lt['policy_tokens']:,} policy "
                  f"tokens; actions {lt['actions']}. The PyTorch contenders replay the slot engine's tokens.", ""]
        rows = []
        for name in ("interrupt_resume", "slots_quarter", "lockstep", "reprefill", "searchr1_torch", "torch_kv_reuse"):
            s = lt[name]
            ratio = lt.get(f"ratio_vs_{name}")
            rows.append([_label(name, lt), _f(s["episodes_per_s"], 2), _f(s["policy_tokens_per_s"]),
                         _f(s["median_s"]["total"], 2), "-", "-", _f(ratio, 2) if ratio else "-",
                         _f(s.get("occupancy"), 2), _mb(s.get("kv_bytes")), _f(s["compile_s"]),
                         _f(s["median_s"].get("retrieval"), 3), _f(s["spread"]["total"], 2)])
        lines += _table(header, rows)
    return lines


def _label(name: str, e: dict) -> str:
    slots = {"interrupt_resume": "S = rows", "slots_quarter": f"S = {e.get('slots_quarter_slots') or 'rows/4'}"}
    return f"slots ({slots[name]})" if name in slots else name


def _mb(x) -> str:
    return "-" if x is None else _f(x / 1e6)


def update_section(u: dict) -> list[str]:
    lines = [f"{u['rows']} episodes padded to {u['width']} ({u['tokens']:,} real tokens, {u['policy_tokens']:,} "
             f"trained on); first-step loss relative difference {u['loss_rel_diff']:.1e}, gradient norm "
             f"{u['grad_norm_rel_diff']:.1e}.", ""]
    header = ["implementation", "tokens/s", "median s", "% of matmul rate", "% of limit", "x PyTorch", "compile s",
              "spread"]
    rows = []
    for name in ("ours", "torch"):
        s = u[name]
        rows.append([name, _f(s["tokens_per_s"]), _f(s["median_s"]["total"], 3), _f(s["pct_of_matmul_rate"]),
                     _f(s["pct_of_limit"]), _f(u["ratio_vs_torch"], 2) if name == "ours" else "-",
                     _f(s["compile_s"]), _f(s["spread"]["total"], 2)])
    return lines + _table(header, rows)


def profile_section(label: str, prof: dict, modules: int = 2, ops: int = 6) -> list[str]:
    if not prof or "modules" not in prof:
        return []
    lines = [f"Profile of ours, {label} (one run, {prof['wall_s']:.2f}s wall; busy ms per compiled module, top ops "
             "as [op, ms, calls, % of module]):", ""]
    for mod, info in list(prof["modules"].items())[:modules]:
        top = "; ".join(f"{op} {ms:.1f} ms x{n} ({pct}%)" for op, ms, n, pct in info["top_ops"][:ops])
        lines.append(f"- `{mod}` {info['busy_ms']:.0f} ms: {top}")
    return lines + [""]


def render(res: dict) -> str:
    out = ["# tspo_jax benchmark", "", f"Command: `{res['command']}`", f"Started: {res['started']}", ""]
    out += machine_section(res)
    for name, c in res["configs"].items():
        out += [f"## {name}", ""]
        if "skipped" in c:
            out += [f"Skipped: {c['skipped']}", ""]
            continue
        m = c["model"]
        out += [f"{c['about']}. {m['layers']} layers x {m['hidden']}, {m['params'] / 1e6:.1f}M parameters, "
                f"{m['dtype']}, weights read per step {m['weight_bytes'] / 1e6:.0f} MB. {c['reps']} repetitions."
                + _threads(c), ""]
        if c.get("decode"):
            out += ["### Decode", ""] + decode_section(c["decode"])
            for p in c["decode"]:
                out += profile_section(f"batch {p['batch']} prompt {p['prompt_len']} {p['mode']}", p.get("ours_profile"))
        if c.get("episodes"):
            out += ["### Search episodes", ""] + episodes_section(c["episodes"])
            out += profile_section("interrupt/resume episodes", c["episodes"].get("interrupt_resume_profile"))
        if c.get("update"):
            out += ["### Policy-update step", ""] + update_section(c["update"])
            out += profile_section("update step", c["update"].get("ours_profile"))
        for err in c.get("errors", []):
            out += [f"- error: {err}"]
    if res.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(out)
