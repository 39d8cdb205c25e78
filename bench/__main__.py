"""`python -m bench --suite smoke|cpu|standard [--out DIR] [--shapes ...] [--tokens ...]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report
from .suites import SUITES, customise, parse_contenders, parse_ints, parse_shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--suite", choices=sorted(SUITES), default="smoke")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default bench/out/<suite>)")
    p.add_argument("--shapes", help="comma-separated shape names or HxV, e.g. "
                   "qwen2.5-0.5b,1024x50000")
    p.add_argument("--tokens", help="comma-separated token counts T, e.g. 8192,32768")
    p.add_argument("--contenders", help="comma-separated subset of the suite's contenders")
    p.add_argument("--completion-len", type=int, help="tokens per completion row")
    p.add_argument("--budget-s", type=float, help="whole-suite time budget in seconds (0: none)")
    p.add_argument("--max-step-s", type=float, help="skip a size whose step is predicted to "
                   "take longer than this")
    p.add_argument("--cell-budget-s", type=float, help="time spent on timed calls per cell")
    p.add_argument("--max-reps", type=int, help="most timed calls per cell")
    p.add_argument("--device", choices=("cpu", "cuda"), help="run the suite on another device "
                   "(e.g. a dry run of `standard` on CPU with tiny --shapes)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument("--cce-cpu", action="store_true", help="include Cut Cross-Entropy on CPU "
                   "(its torch_compile fallback; ~25 s compile)")
    p.add_argument("--compile-cpu", action="store_true", help="include the torch.compile'd "
                   "chunked loss on CPU (inductor's C++ compile takes tens of seconds)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-table", action="store_true", help="do not print the short table at "
                   "the end (gpu_check.sh prints it itself)")
    p.add_argument("--show", type=Path, metavar="RESULTS_JSON",
                   help="print the short table of a recorded results.json and exit")
    p.add_argument("--replot", type=Path, metavar="RESULTS_JSON",
                   help="render table.md and the PNGs of a results.json again, beside it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    a = parse_args(argv)
    if a.show:
        print(report.short_table(json.loads(a.show.read_text())))
        return None
    if a.replot:
        res = json.loads(a.replot.read_text())
        (a.replot.parent / "table.md").write_text(report.markdown(res))
        report.plot(res, a.replot.parent)
        return None
    from . import runner  # imports torch and the kernels

    suite = customise(
        SUITES[a.suite],
        shapes=parse_shapes(a.shapes) if a.shapes else None,
        tokens=parse_ints(a.tokens, "--tokens") if a.tokens else None,
        contenders=parse_contenders(a.contenders) if a.contenders else None,
        completion_len=a.completion_len, budget_s=a.budget_s, max_step_s=a.max_step_s,
        cell_budget_s=a.cell_budget_s, max_reps=a.max_reps, device=a.device, dtype=a.dtype,
        threads=a.threads)
    out = a.out or Path(__file__).resolve().parent / "out" / suite.name
    res = runner.run(suite, out, cce_cpu=a.cce_cpu, compile_cpu=a.compile_cpu,
                     plots=not a.no_plots)
    drawn = not a.no_plots and report.plots_unavailable() is None
    print(f"\nwrote {out}/results.json, table.md" + (", time_vs_T.png, memory_vs_T.png"
                                                       if drawn else " (no plots)"))
    print(f"suite {suite.name} took {res.get('elapsed_s')} s")
    if not a.no_table:
        print("\n" + report.short_table(res))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() is not None or {"--show", "--replot"} & set(sys.argv) else 1)
