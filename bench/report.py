"""Results -> JSON, a markdown table, a short table for the end of a log, PNG plots, and the
DESIGN.md performance targets checked against the numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

MIB = 2**20
CPU_TARGET_SIZE = (4096, 256, 32000)  # T, H, V of DESIGN.md's CPU targets


def _f(x, digits=1, dash="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return dash
    if isinstance(x, float) and abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _ms(stats: dict | float | None, digits=None) -> str:
    if isinstance(stats, int | float):
        stats = {"n": 1, "median": float(stats)}
    if not stats or not stats.get("n"):
        return "-"
    m = stats["median"]
    d = digits if digits is not None else (1 if m >= 10 else 2 if m >= 1 else 3)
    return _f(m, d)


def _spread(stats: dict | None) -> str:
    if not stats or stats.get("n", 0) < 2:
        return ""
    d = 1 if stats["median"] >= 10 else 2 if stats["median"] >= 1 else 3
    return f" [{_f(stats['q25'], d)}-{_f(stats['q75'], d)}]"


def _rate(x) -> str:
    """TFLOP/s with ~3 significant digits (CPU rates are far below 1)."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 \
        else f"{x:.3f}"


def _mib(b) -> str:
    return "-" if b is None else _f(b / MIB, 1)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def config_title(cfg: dict) -> str:
    mm = cfg.get("matmul") or {}
    rate = f", {mm.get('dtype')} matmul {_rate(mm.get('tflops'))} TFLOP/s" if mm else ""
    return (f"{cfg['shape']} (H {cfg['hidden']}, V {cfg['vocab']}), T = {cfg['tokens']} "
            f"({cfg['rows']} x {cfg['row_len']}){rate}")


def status_of(cell: dict) -> str:
    s = cell.get("status", "?")
    return s if s == "ok" else f"{s}: {cell.get('reason', '')}".rstrip(": ")


def header_lines(res: dict) -> list[str]:
    env = res["env"]
    v = env["versions"]
    git = env["git"]
    dirty = " (+ uncommitted changes)" if git.get("dirty") else ""
    lines = [f"machine: {env['machine']}"]
    if "card" in env:
        lines.append(f"driver {env.get('driver')}, CUDA {env.get('cuda_runtime')}, "
                     f"{env.get('gpu_memory_gib')} GiB, TF32 matmul {env.get('tf32_matmul')}")
    lines += [
        f"date: {env['date']}  commit: {git['commit']}{dirty}",
        f"torch {v.get('torch')}, triton {v.get('triton')}, liger-kernel "
        f"{v.get('liger-kernel')}, cut-cross-entropy {v.get('cut-cross-entropy')}, "
        f"rankgrpo {env['rankgrpo_kernels']['version']} (triton_available="
        f"{env['rankgrpo_kernels']['triton_available']}, native_available="
        f"{env['rankgrpo_kernels']['native_available']})",
        f"dtype {res['settings']['dtype']}, {res['settings']['num_ranks']} ranks per "
        f"completion; torch threads {env['torch_threads']}; loadavg at start "
        f"{env['loadavg_at_start']}" + (f", at end {res['loadavg_at_end']}"
                                        if res.get("loadavg_at_end") else ""),
    ]
    return lines


def markdown(res: dict) -> str:
    out = [f"# rankgrpo bench: suite `{res['suite']}`", ""]
    out += [f"- {line}" for line in header_lines(res)]
    for note in res["settings"].get("notes", ()):
        out.append(f"- {note}")
    out += ["- times: median [interquartile range] in ms over `n` timed calls after warm-up; "
            "TFLOP/s on model FLOPs (2THV no-grad pass, 8THV step); % mm = fraction of the "
            "matmul rate measured in this run on the same dimensions; peak = memory beyond "
            "the inputs and the call's outputs (step: dhidden, dW; no-grad: logp)", ""]
    for cfg in res["configs"]:
        out += [f"## {config_title(cfg)}", "",
                "| contender | level | fwd ms | bwd ms | step ms | n | step TFLOP/s | % mm |"
                " no-grad ms | no-grad TFLOP/s | % mm | peak step MiB | peak no-grad MiB |"
                " status |",
                "|" + "---|" * 14]
        for name, cell in cfg["cells"].items():
            st, lp = cell.get("step") or {}, cell.get("logp") or {}
            out.append(
                f"| {name} | {cell.get('level', '')} | {_ms(st.get('forward_ms'))} | "
                f"{_ms(st.get('backward_ms'))} | {_ms(st.get('total_ms'))}"
                f"{_spread(st.get('total_ms'))} | {st.get('reps', '-')} | "
                f"{_rate(st.get('tflops'))} | {_pct(st.get('frac_matmul'))} | "
                f"{_ms(lp.get('total_ms'))}{_spread(lp.get('total_ms'))} | "
                f"{_rate(lp.get('tflops'))} | {_pct(lp.get('frac_matmul'))} | "
                f"{_mib(st.get('peak_extra_bytes'))} | {_mib(lp.get('peak_extra_bytes'))} | "
                f"{status_of(cell)}{_logp_status(cell)} |")
        seg = cfg.get("segment")
        if seg:
            out += ["", f"Segment stage alone (rank_grpo_loss forward + backward; share of the "
                    f"{seg.get('step_contender') or '-'} step, {_ms(seg.get('step_ms'))} ms):",
                    "", "| segment backend | fwd+bwd ms | share of step | status |",
                    "|---|---|---|---|"]
            for name, row in seg["rows"].items():
                out.append(f"| {name} | {_ms(row.get('total_ms'))}{_spread(row.get('total_ms'))}"
                           f" | {_pct(row.get('share_of_step'))} | {status_of(row)} |")
        out.append("")
    if res.get("targets"):
        out += ["## Targets (DESIGN.md)", "", "| target | where | value | needed | result |",
                "|---|---|---|---|---|"]
        for t in res["targets"]:
            out.append(f"| {t['target']} | {t['where']} | {t['value']} | {t['needed']} | "
                       f"{t['result']} |")
        out.append("")
    if res.get("summary"):
        out += ["## Summary", "", "```", *res["summary"], "```", ""]
    return "\n".join(out)


def _logp_status(cell: dict) -> str:
    lp = cell.get("logp")
    if not lp or lp.get("status", "ok") == "ok" or cell.get("status") != "ok":
        return ""
    return f"; no-grad {status_of(lp)}"


def short_table(res: dict) -> str:
    rows = [("shape", "T", "contender", "step ms", "TFLOP/s", "%mm", "no-grad ms", "peak MiB",
             "status")]
    for cfg in res["configs"]:
        for name, cell in cfg["cells"].items():
            st, lp = cell.get("step") or {}, cell.get("logp") or {}
            status = cell.get("status", "?")
            if cell.get("static") and cfg is not res["configs"][0]:
                continue  # skipped everywhere for the same reason: listed once
            rows.append((cfg["shape"], str(cfg["tokens"]), name, _ms(st.get("total_ms")),
                         _rate(st.get("tflops")), _pct(st.get("frac_matmul")),
                         _ms(lp.get("total_ms")), _mib(st.get("peak_extra_bytes")),
                         status if status == "ok" else status_of(cell)[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    for t in res.get("targets") or ():
        lines.append(f"target {t['target']} @ {t['where']}: {t['value']} (needed {t['needed']})"
                     f" {t['result']}")
    lines += res.get("summary") or []
    return "\n".join(lines)


def _cell(cfg, name):
    c = cfg["cells"].get(name)
    return c if c and c.get("status") == "ok" else None


def _step_ms(cell):
    return (cell or {}).get("step", {}).get("total_ms", {}).get("median")


def check_targets(res: dict) -> list[dict]:
    """DESIGN.md's performance targets, on what this run measured."""
    out = []

    def add(target, where, value, needed, ok):
        out.append({"target": target, "where": where, "value": value, "needed": needed,
                    "result": "n/a" if ok is None else ("PASS" if ok else "FAIL")})

    for cfg in res["configs"]:
        where = f"{cfg['shape']} T={cfg['tokens']}"
        if res["settings"]["device"] == "cpu":
            if (cfg["tokens"], cfg["hidden"], cfg["vocab"]) != CPU_TARGET_SIZE:
                continue  # DESIGN.md states the CPU targets at this size only
            t, r = _cell(cfg, "torch"), _cell(cfg, "reference")
            if t and r:
                tm, rm = t["step"]["peak_raw_bytes"], r["step"]["peak_raw_bytes"]
                if tm is not None and rm:
                    add("CPU peak memory torch/reference", where, f"{tm / rm:.3f}", "<= 0.10",
                        tm / rm <= 0.10)
                ratio = _step_ms(r) / _step_ms(t)
                add("CPU throughput torch/reference", where, f"{ratio:.2f}x", ">= 0.8x",
                    ratio >= 0.8)
            continue
        ours = _cell(cfg, "triton")
        if ours is None:
            add("fused step >= 60% of matmul", where, "triton not measured", ">= 60%", None)
            continue
        add("fused step >= 60% of matmul (stretch 75%)", where,
            _pct(ours["step"].get("frac_matmul")), ">= 60%",
            (ours["step"].get("frac_matmul") or 0) >= 0.60)
        lp = ours.get("logp") or {}
        if lp.get("frac_matmul") is not None:
            add("no-grad pass >= 70% of matmul", where, _pct(lp["frac_matmul"]), ">= 70%",
                lp["frac_matmul"] >= 0.70)
        if cfg["tokens"] >= 32768 and ours["step"].get("peak_extra_bytes") is not None:
            mib = ours["step"]["peak_extra_bytes"] / MIB
            add("peak memory <= 64 MiB at T=32768", where, f"{mib:.1f} MiB", "<= 64 MiB",
                mib <= 64)
        for level, mine, peer in (("token", "triton-token", "liger-token"),
                                  ("sequence", "triton-seq", "liger-seq")):
            a, b = _cell(cfg, mine), _cell(cfg, peer)
            if a and b:
                x = _step_ms(b) / _step_ms(a)
                add(f">= 2x Liger ({level} level)", where, f"{x:.2f}x", ">= 2x", x >= 2)
        c = _cell(cfg, "cce+seg")
        if c:
            x = _step_ms(c) / _step_ms(ours)
            add(">= CCE + segment stage", where, f"{x:.2f}x", ">= 1x", x >= 1)
    return out


def write(res: dict, out_dir: Path, *, plots: bool = True) -> dict[str, Path]:
    """results.json, table.md and (optionally) the two PNGs; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "table": out_dir / "table.md"}
    res["targets"] = check_targets(res) if res["settings"].get("targets", True) else []
    paths["json"].write_text(json.dumps(res, indent=1, default=str) + "\n")
    paths["table"].write_text(markdown(res))
    if plots:
        paths.update(plot(res, out_dir))
    return paths


def plot(res: dict, out_dir: Path) -> dict[str, Path]:
    """time_vs_T.png and memory_vs_T.png: one panel per shape, one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    shapes = list(dict.fromkeys(c["shape"] for c in res["configs"]))
    if not shapes:
        return {}
    paths = {}
    for key, fname, ylabel, get in (
            ("time", "time_vs_T.png", "step time (ms, median)", _step_ms),
            ("memory", "memory_vs_T.png", "peak memory beyond inputs/outputs (MiB)",
             lambda c: (c or {}).get("step", {}).get("peak_extra_bytes"))):
        fig, axes = plt.subplots(1, len(shapes), figsize=(max(7.0, 5 * len(shapes)), 4.4),
                                 squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            cfgs = [c for c in res["configs"] if c["shape"] == shape]
            names = list(dict.fromkeys(n for c in cfgs for n in c["cells"]))
            for name in names:
                pts = [(c["tokens"], get(_cell(c, name))) for c in cfgs]
                pts = [(t, v) for t, v in pts if v is not None]
                if key == "memory":
                    pts = [(t, max(v / MIB, 1e-2)) for t, v in pts]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
                ooms = [c["tokens"] for c in cfgs
                        if c["cells"].get(name, {}).get("status") == "OOM"]
                for t in ooms:
                    ax.annotate(f"{name}: OOM", (t, 1), xycoords=("data", "axes fraction"),
                                rotation=90, va="top", ha="right", fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_xticks([c["tokens"] for c in cfgs], [str(c["tokens"]) for c in cfgs])
            ax.set_title(f"{shape} (H {cfgs[0]['hidden']}, V {cfgs[0]['vocab']})", fontsize=9)
            ax.set_xlabel("tokens T")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        env = res["env"]
        fig.suptitle(f"rankgrpo bench `{res['suite']}`, {res['settings']['dtype']}\n"
                     f"{env['machine']}, {env['date'][:10]}, commit {env['git']['commit'][:10]}",
                     fontsize=9)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[key] = path
    return paths
