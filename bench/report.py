"""Everything the bench prints or writes: the progress lines of a run, JSON, a markdown table,
a short table for the end of a log, PNG plots (when matplotlib is installed), the CPU suite's
summary and docs/design.md's performance targets checked against the numbers.

The runner measures and calls the public functions here; nothing here measures.
A recorded results.json names no absolute path (`check_no_absolute_paths`): recorded runs are
committed, and a path of the machine they ran on would mean nothing in another checkout.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

MIB = 2**20
CPU_TARGET_SIZE = (4096, 256, 32000)  # T, H, V of docs/design.md's CPU targets


def fmt_num(x, digits=1, dash="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return dash
    if isinstance(x, float) and abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def fmt_ms(stats: dict | float | None, digits=None) -> str:
    if isinstance(stats, int | float):
        stats = {"n": 1, "median": float(stats)}
    if not stats or not stats.get("n"):
        return "-"
    m = stats["median"]
    d = digits if digits is not None else (1 if m >= 10 else 2 if m >= 1 else 3)
    return fmt_num(m, d)


def fmt_spread(stats: dict | None) -> str:
    if not stats or stats.get("n", 0) < 2:
        return ""
    d = 1 if stats["median"] >= 10 else 2 if stats["median"] >= 1 else 3
    return f" [{fmt_num(stats['q25'], d)}-{fmt_num(stats['q75'], d)}]"


def fmt_rate(x) -> str:
    """TFLOP/s with ~3 significant digits (CPU rates are far below 1)."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 \
        else f"{x:.3f}"


def fmt_mib(b) -> str:
    return "-" if b is None else fmt_num(b / MIB, 1)


def fmt_pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def config_title(cfg: dict) -> str:
    mm = cfg.get("matmul") or {}
    rate = f", {mm.get('dtype')} matmul {fmt_rate(mm.get('tflops'))} TFLOP/s" if mm else ""
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
    for note in (*res["settings"].get("notes", ()), *res.get("notes", ())):
        out.append(f"- {note}")
    out += ["- times: median [interquartile range] in ms over `n` timed calls after warm-up; "
            "TFLOP/s on model FLOPs (2THV no-grad pass, 8THV step); % mm = fraction of the "
            "matmul rate measured in this run on the same dimensions; peak = memory beyond "
            "the inputs and the call's outputs (step: dhidden, dW; no-grad: logp); `-` where "
            "the method did not resolve the call's own outputs (see the cell's memory_note)",
            ""]
    for cfg in res["configs"]:
        out += [f"## {config_title(cfg)}", "",
                "| contender | level | fwd ms | bwd ms | step ms | n | step TFLOP/s | % mm |"
                " no-grad ms | no-grad TFLOP/s | % mm | peak step MiB | peak no-grad MiB |"
                " status |",
                "|" + "---|" * 14]
        for name, cell in cfg["cells"].items():
            st, lp = cell.get("step") or {}, cell.get("logp") or {}
            out.append(
                f"| {name} | {cell.get('level', '')} | {fmt_ms(st.get('forward_ms'))} | "
                f"{fmt_ms(st.get('backward_ms'))} | {fmt_ms(st.get('total_ms'))}"
                f"{fmt_spread(st.get('total_ms'))} | {st.get('reps', '-')} | "
                f"{fmt_rate(st.get('tflops'))} | {fmt_pct(st.get('frac_matmul'))} | "
                f"{fmt_ms(lp.get('total_ms'))}{fmt_spread(lp.get('total_ms'))} | "
                f"{fmt_rate(lp.get('tflops'))} | {fmt_pct(lp.get('frac_matmul'))} | "
                f"{fmt_mib(st.get('peak_extra_bytes'))} | {fmt_mib(lp.get('peak_extra_bytes'))} | "
                f"{status_of(cell)}{_logp_status(cell)} |")
        seg = cfg.get("segment")
        if seg:
            out += ["", f"Segment stage alone (rank_grpo_loss forward + backward; share of the "
                    f"{seg.get('step_contender') or '-'} step, {fmt_ms(seg.get('step_ms'))} ms):",
                    "", "| segment backend | fwd+bwd ms | share of step | status |",
                    "|---|---|---|---|"]
            for name, row in seg["rows"].items():
                total = row.get("total_ms")
                out.append(f"| {name} | {fmt_ms(total)}{fmt_spread(total)}"
                           f" | {fmt_pct(row.get('share_of_step'))} | {status_of(row)} |")
        out.append("")
    if res.get("targets"):
        out += ["## Targets (docs/design.md)", "", "| target | where | value | needed | result |",
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
            rows.append((cfg["shape"], str(cfg["tokens"]), name, fmt_ms(st.get("total_ms")),
                         fmt_rate(st.get("tflops")), fmt_pct(st.get("frac_matmul")),
                         fmt_ms(lp.get("total_ms")), fmt_mib(st.get("peak_extra_bytes")),
                         status if status == "ok" else status_of(cell)[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    for t in res.get("targets") or ():
        lines.append(f"target {t['target']} @ {t['where']}: {t['value']} (needed {t['needed']})"
                     f" {t['result']}")
    lines += res.get("summary") or []
    return "\n".join(lines)


def ok_cell(cfg, name):
    c = cfg["cells"].get(name)
    return c if c and c.get("status") == "ok" else None


def step_ms(cell):
    return (cell or {}).get("step", {}).get("total_ms", {}).get("median")


def check_targets(res: dict) -> list[dict]:
    """docs/design.md's performance targets, on what this run measured."""
    out = []

    def add(target, where, value, needed, ok):
        out.append({"target": target, "where": where, "value": value, "needed": needed,
                    "result": "n/a" if ok is None else ("PASS" if ok else "FAIL")})

    for cfg in res["configs"]:
        where = f"{cfg['shape']} T={cfg['tokens']}"
        if res["settings"]["device"] == "cpu":
            if (cfg["tokens"], cfg["hidden"], cfg["vocab"]) != CPU_TARGET_SIZE:
                continue  # docs/design.md states the CPU targets at this size only
            t, r = ok_cell(cfg, "torch"), ok_cell(cfg, "reference")
            if t and r:
                tm, rm = t["step"]["peak_raw_bytes"], r["step"]["peak_raw_bytes"]
                if tm is not None and rm:
                    add("CPU peak memory torch/reference", where, f"{tm / rm:.3f}", "<= 0.10",
                        tm / rm <= 0.10)
                ratio = step_ms(r) / step_ms(t)
                add("CPU throughput torch/reference", where, f"{ratio:.2f}x", ">= 0.8x",
                    ratio >= 0.8)
            continue
        ours = ok_cell(cfg, "triton")
        if ours is None:
            add("fused step >= 60% of matmul", where, "triton not measured", ">= 60%", None)
            continue
        add("fused step >= 60% of matmul (stretch 75%)", where,
            fmt_pct(ours["step"].get("frac_matmul")), ">= 60%",
            (ours["step"].get("frac_matmul") or 0) >= 0.60)
        lp = ours.get("logp") or {}
        if lp.get("frac_matmul") is not None:
            add("no-grad pass >= 70% of matmul", where, fmt_pct(lp["frac_matmul"]), ">= 70%",
                lp["frac_matmul"] >= 0.70)
        if cfg["tokens"] >= 32768 and ours["step"].get("peak_extra_bytes") is not None:
            mib = ours["step"]["peak_extra_bytes"] / MIB
            add("peak memory <= 64 MiB at T=32768", where, f"{mib:.1f} MiB", "<= 64 MiB",
                mib <= 64)
        for level, mine, peer in (("token", "triton-token", "liger-token"),
                                  ("sequence", "triton-seq", "liger-seq")):
            a, b = ok_cell(cfg, mine), ok_cell(cfg, peer)
            if a and b:
                x = step_ms(b) / step_ms(a)
                add(f">= 2x Liger ({level} level)", where, f"{x:.2f}x", ">= 2x", x >= 2)
        c = ok_cell(cfg, "cce+seg")
        if c:
            x = step_ms(c) / step_ms(ours)
            add(">= CCE + segment stage", where, f"{x:.2f}x", ">= 1x", x >= 1)
    return out


def write(res: dict, out_dir: Path, *, plots: bool = True) -> dict[str, Path]:
    """results.json, table.md and (optionally) the two PNGs; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "table": out_dir / "table.md"}
    res["targets"] = check_targets(res) if res["settings"].get("targets", True) else []
    text = json.dumps(res, indent=1, default=str) + "\n"
    check_no_absolute_paths(json.loads(text))
    paths["json"].write_text(text)
    paths["table"].write_text(markdown(res))
    if plots:
        paths.update(plot(res, out_dir))
    return paths


def plots_unavailable() -> str | None:
    """Why the PNGs cannot be drawn here (matplotlib missing), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        return (f"plots skipped: matplotlib is not installed ({err}); the tables are complete. "
                "`pip install matplotlib`, then `python -m bench --replot results.json`")
    return None


def check_no_absolute_paths(obj, where: str = "results") -> None:
    """Raise ValueError naming the key of any absolute filesystem path in a results object.

    A recorded run is committed and read on other machines: paths inside the checkout are
    written relative to its root (env.repo_relative), and a path outside it has no place in
    it. Strings that are not paths (notes, reasons, commands) pass: only a string that is an
    absolute path as a whole (no whitespace, starting with the root or a drive) is refused.
    """
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_no_absolute_paths(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_no_absolute_paths(v, f"{where}[{i}]")
    elif isinstance(obj, str) and _is_absolute_path(obj):
        raise ValueError(f"{where} = {obj!r} is an absolute path: a recorded run must name "
                         "paths relative to the checkout (bench.env.repo_relative)")


def _is_absolute_path(text: str) -> bool:
    if not text or any(c.isspace() for c in text) or "://" in text:
        return False
    if text.startswith("/") and len(text) > 1:
        return True
    return os.name == "nt" and len(text) > 2 and text[1] == ":" and text[2] in "\\/"


def plot(res: dict, out_dir: Path) -> dict[str, Path]:
    """time_vs_T.png and memory_vs_T.png: one panel per shape, one line per contender.

    Without matplotlib: no PNG, a note in res["notes"] (and so in table.md), and {}.
    """
    why = plots_unavailable()
    if why:
        notes = res.setdefault("notes", [])
        if why not in notes:
            notes.append(why)
        (out_dir / "table.md").write_text(markdown(res))
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    shapes = list(dict.fromkeys(c["shape"] for c in res["configs"]))
    if not shapes:
        return {}
    paths = {}
    for key, fname, ylabel, get in (
            ("time", "time_vs_T.png", "step time (ms, median)", step_ms),
            ("memory", "memory_vs_T.png", "peak memory beyond inputs/outputs (MiB)",
             lambda c: (c or {}).get("step", {}).get("peak_extra_bytes"))):
        fig, axes = plt.subplots(1, len(shapes), figsize=(max(7.0, 5 * len(shapes)), 4.4),
                                 squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            cfgs = [c for c in res["configs"] if c["shape"] == shape]
            names = list(dict.fromkeys(n for c in cfgs for n in c["cells"]))
            for name in names:
                pts = [(c["tokens"], get(ok_cell(c, name))) for c in cfgs]
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


# ------------------------------------------------------------ progress lines of a running suite

def config_heading(cfg: dict, detail: str) -> str:
    """The line that opens one (shape, T) pair in the log."""
    return (f"\n== {cfg['shape']} H={cfg['hidden']} V={cfg['vocab']} T={cfg['tokens']} "
            f"({cfg['rows']} x {cfg['row_len']}), {detail}")


def matmul_line(mm: dict, pooled: bool = False) -> str:
    how = " (median over the timing processes)" if pooled else ""
    return f"   {mm['dtype']} matmul{how}: {fmt_rate(mm['tflops'])} TFLOP/s"


def cell_line(name: str, cell: dict, spent_s: float | None = None) -> str:
    """One contender's result at one size, as the log shows it."""
    spent = f"  [{spent_s:.1f} s]" if spent_s is not None else ""
    if cell.get("status") != "ok":
        return f"   {name:13s} {cell.get('status')}: {str(cell.get('reason', ''))[:150]}{spent}"
    st, lp = cell["step"], cell.get("logp") or {}
    return (f"   {name:13s} step {fmt_ms(st['total_ms'])} ms "
            f"({fmt_rate(st.get('tflops'))} TFLOP/s, {fmt_pct(st.get('frac_matmul'))} of mm, "
            f"n={st['reps']}), no-grad {fmt_ms(lp.get('total_ms'))} ms, "
            f"peak {fmt_mib(st.get('peak_extra_bytes'))} MiB{spent}")


def segment_lines(seg: dict) -> list[str]:
    """The segment-stage-alone rows of one size, as the log shows them."""
    best = seg.get("step_contender")
    lines = []
    for name, row in seg["rows"].items():
        if row.get("status") != "ok":
            continue
        share = f" = {fmt_pct(row['share_of_step'])} of the {best} step" if best else ""
        lines.append(f"   segment stage {name:10s} {row['total_ms']['median']:.3f} ms{share}")
    return lines


def cpu_summary(res: dict) -> list[str]:
    """The torch-vs-reference lines the `cpu` suite exists for."""
    lines = []
    for cfg in res["configs"]:
        t, r = cfg["cells"].get("torch", {}), cfg["cells"].get("reference", {})
        if t.get("status") != "ok" or r.get("status") != "ok":
            lines.append(f"{cfg['shape']} T={cfg['tokens']}: torch {t.get('status')}, "
                         f"reference {r.get('status')}")
            continue
        tm, rm = t["step"]["peak_extra_bytes"], r["step"]["peak_extra_bytes"]
        traw, rraw = t["step"]["peak_raw_bytes"], r["step"]["peak_raw_bytes"]
        ts, rs = t["step"]["total_ms"]["median"], r["step"]["total_ms"]["median"]
        env = res["env"]
        design = (cfg["tokens"], cfg["hidden"], cfg["vocab"]) == CPU_TARGET_SIZE

        def verdict(ok, design=design):
            return ("PASS" if ok else "FAIL") if design else "(target is for T=4096 H=256 V=32000)"
        extra = ("            (not resolved)" if tm is None or rm is None else
                 f"torch {tm / MIB:8.1f} MiB   reference {rm / MIB:8.1f} MiB   "
                 f"ratio {tm / rm:.3f}")
        lines += [
            f"CPU memory benchmark: forward+backward, T={cfg['tokens']} H={cfg['hidden']} "
            f"V={cfg['vocab']} {res['settings']['dtype']}, each contender in its own process",
            f"  {env['machine']}, torch threads {env['torch_threads']}, load average "
            f"{env['loadavg_at_start'][0]} at start, {res.get('loadavg_at_end', ['?'])[0]} "
            f"at end (other jobs share this machine)",
            f"  peak memory growth (VmHWM - VmRSS before the step):  torch {traw / MIB:8.1f} MiB"
            f"   reference {rraw / MIB:8.1f} MiB   ratio {traw / rraw:.3f}",
            f"  beyond the gradients dhidden+dW ("
            f"{'?' if tm is None else f'{(traw - tm) / MIB:.1f}'} MiB):           {extra}",
            f"  memory ratio torch/reference = {traw / rraw:.3f} (target <= 0.10): "
            f"{verdict(traw / rraw <= 0.10)}",
            f"  step time (median of {t['step']['reps']} / {r['step']['reps']} calls): torch "
            f"{ts / 1e3:.2f} s, reference {rs / 1e3:.2f} s",
            f"  throughput torch/reference = {rs / ts:.2f}x (target >= 0.8x): "
            f"{verdict(rs / ts >= 0.8)}",
        ]
    return lines
