"""The plan as markdown: the target, the resident state, one row per compiled function, the step."""

from __future__ import annotations

GiB = 2**30


def _g(x) -> str:
    return f"{x / GiB:.2f}"


def _t(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(res: dict) -> str:
    t, r, st = res["target"], res["resident_bytes"], res["step_s"]
    kind = ("compiled for it" if t["compiled"] else
            "ESTIMATE: no compiler for it here; XLA:CPU's memory analysis of the same program stands in")
    c = res["config"]
    lines = [
        f"## Plan: {res.get('command', '')}",
        "",
        f"- Target: {t['name']}, {t['chips']} x {t['chip']} ({kind}); usable {_g(t['usable_bytes'])} GiB per chip "
        f"(published {_g(t['hbm_bytes'])} GiB), peak {t['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"{t['hbm_bandwidth'] / 1e9:,.0f} GB/s ({t['source']})",
        f"- Config: mesh {tuple(c['mesh'])}, {c['prompts_per_step']} prompts x {c['group_size']}, mini-batch "
        f"{c['mini_batch']}, micro-batch {c['micro_batch']}, logprob slices {c['logprob_micro_batch'] or c['micro_batch']}"
        f", logprob chunk {c['logprob_chunk']}, remat {c['remat']}, decode slots {c['slots'] or 'all rows'}; "
        f"shapes {res['shapes']}",
        f"- Resident per chip: params {_g(r['params'])} + Adam moments {_g(r['opt_state'])} + reference "
        f"{_g(r['ref_params'])} + KV cache {_g(r['kv_cache'])} + the decode's gathered params "
        f"{_g(r.get('decode_params', 0))} = {_g(r['total'])} GiB",
        "",
        _row(["function", "calls/step", "loop iters", "args GiB", "out GiB", "temp GiB", "alias GiB",
              "+resident GiB", "peak GiB/chip", "% usable", "fits", "TFLOP/call/chip", "GB/call/chip",
              "collective MB/body", "compile s", "roofline s/call", "with XLA's bytes s/call",
              "collectives s/call", "shape"]),
        _row(["---"] * 19),
    ]
    for f in res["functions"]:
        coll = sum(f["collectives"].values()) / 1e6
        lines.append(_row([
            f["name"], f"{f['calls_per_step']:.3g}", f["loop_iters"], _g(f["argument_bytes"]),
            _g(f["output_bytes"]), _g(f["temp_bytes"]) if f["compiled"] else f"needs {_g(f['needed_bytes'])}",
            _g(f["alias_bytes"]), _g(f["resident_extra_bytes"]), _g(f["peak_bytes"]),
            f"{100 * f['peak_bytes'] / t['usable_bytes']:.0f}%", "yes" if f["fits"] else "**NO**",
            f"{f['flops'] / 1e12:.2f}", f"{f['bytes'] / 1e9:.1f}", f"{coll:.1f}", f"{f['compile_s']:.0f}",
            f"{f['roofline_s']:.3g}", f"{f.get('roofline_xla_s', 0.0):.3g}",
            "-" if f.get("collective_s") is None else f"{f['collective_s']:.3g}", f["note"]]))
    p = res["projected_s"]
    lines += [
        "",
        f"Projected step (roofline, a lower bound from XLA's cost model, not a measurement): "
        f"{_t(st['total'])} = rollout {_t(st['rollout'])} + reference {_t(st['reference'])} + update "
        f"{_t(st['update'])}; evaluation adds {_t(st['eval_amortised'])} per step amortised. "
        f"200 steps: {_t(p['200_steps'])}; total_steps ({c['total_steps']}): {_t(p['total_steps'])}. "
        f"With XLA's byte counts instead of the bytes each call must move: "
        f"{_t(res['step_xla_bytes_s']['total'])} per step." + _collectives_line(res, res.get("step_collectives_s")),
    ]
    at = res.get("at_lengths")
    if at:
        st, p, ln = at["step_s"], at["projected_s"], at["lengths"]
        lines += [
            "",
            f"At mean episode lengths {ln} ({at['episode_tokens']:.0f} tokens; the worst case is "
            f"{res['shapes']['update_width']}): {_t(st['total'])} = rollout {_t(st['rollout'])} + reference "
            f"{_t(st['reference'])} + update {_t(st['update'])}; evaluation adds {_t(st['eval_amortised'])}. "
            f"200 steps: {_t(p['200_steps'])}; total_steps ({c['total_steps']}): {_t(p['total_steps'])}. "
            f"With XLA's byte counts: {_t(at['step_xla_bytes_s']['total'])} per step."
            + _collectives_line(res, at.get("step_collectives_s")),
        ]
    heavy = [f for f in res["functions"] if f.get("largest_collectives")]
    if heavy:
        lines += ["", "Largest collectives per call body (op, result shape per chip, ops, MB):"]
        for f in heavy:
            ops = "; ".join(f"{c['op']} {c['shape']} x{c['count']}: {c['bytes'] / 1e6:,.0f}"
                            for c in f["largest_collectives"][:4])
            lines.append(f"- {f['name']}: {ops}")
    lines += [
        "",
        "Verdict: " + ("nothing compiled: resident state only" if res["fits"] is None else
                       f"{'fits' if res['fits'] else 'DOES NOT FIT'} with {res['min_headroom']:.0%} headroom."),
        "",
    ]
    return "\n".join(lines)


def _collectives_line(res: dict, st: dict | None) -> str:
    bw = res["target"].get("ici_bandwidth")
    if not st or not bw:
        return ""
    return (f" With each call's collectives at the chip's all-reduce bandwidth ({bw / 1e9:.0f} GB/s), "
            f"overlapped with compute at best: {_t(st['total'])} = rollout {_t(st['rollout'])} + reference "
            f"{_t(st['reference'])} + update {_t(st['update'])}.")


def summary(results: list[dict]) -> str:
    """One row per plan (config x topology): the fit, the largest function, the projected times."""
    lines = [_row(["plan", "chips", "fits", "largest function", "peak GiB/chip", "% usable", "resident GiB/chip",
                   "worst-case step: rollout + reference + update", "200 steps", "1,005 steps",
                   "step at --lengths", "200 steps at --lengths", "step at --lengths with collectives"]),
             _row(["---"] * 13)]
    for res in results:
        t, st = res["target"], res["step_s"]
        worst = max(res["functions"], key=lambda f: f["peak_bytes"], default=None)
        if worst is None:
            lines.append(_row([res.get("command", ""), t["chips"], "not compiled", "-", "-", "-",
                               _g(res["resident_bytes"]["total"]), "-", "-", "-", "-", "-", "-"]))
            continue
        per_step = st["total"] + st["eval_amortised"]
        lines.append(_row([
            res.get("command", "").replace("python -m tspo_jax.plan ", ""), f"{t['chips']} x {t['chip']}"
            + ("" if t["compiled"] else " (estimate)"), "yes" if res["fits"] else "**NO**", worst["name"],
            _g(worst["peak_bytes"]), f"{100 * worst['peak_bytes'] / t['usable_bytes']:.0f}%",
            _g(res["resident_bytes"]["total"]),
            f"{_t(st['total'])} = {_t(st['rollout'])} + {_t(st['reference'])} + {_t(st['update'])}",
            _t(200 * per_step), _t(1005 * per_step), *_at_lengths(res)]))
    return "\n".join(lines) + "\n"


def _at_lengths(res: dict) -> list[str]:
    at = res.get("at_lengths")
    if not at:
        return ["-", "-", "-"]
    st, coll = at["step_s"], at.get("step_collectives_s")
    return [f"{_t(st['total'])} = {_t(st['rollout'])} + {_t(st['reference'])} + {_t(st['update'])}",
            _t(at["projected_s"]["200_steps"]),
            "-" if not coll else f"{_t(coll['total'])} = {_t(coll['rollout'])} + {_t(coll['reference'])} + "
                                 f"{_t(coll['update'])}"]
