"""One contender, one size, one measurement, in a process of its own (the `cpu` suite).

    python -m bench.worker --mode memory|time --contender torch --tokens 4096 --hidden 256 \
        --vocab 32000

memory: a small warm-up call (same H and V, 64 tokens) so that libraries and thread pools are
        loaded, then one full-size step and one no-grad pass, each measured by memory.py's
        CPU method from the resident set just before it. Run it with MALLOC_MMAP_THRESHOLD_
        pinned (the parent does) so that freed blocks leave the resident set.
time:   timing.measure of the step and the no-grad pass, with the default allocator.
The last stdout line is `BENCH_RESULT {json}`.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

import torch

from . import contenders as C
from . import memory, timing
from .flops import matmul_rate
from .inputs import make_inputs
from .runner import DTYPES, failure, logp_call, step_call


def _memory(contender, inp, device) -> dict:
    out = {}
    peak = memory.tracker(device)
    inp.clear_grads()
    gc.collect()
    out["rss_before_bytes"] = memory.rss_bytes()
    peak.start()
    step_call(contender)(inp, timing.Timer(device))
    raw = peak.stop()
    extra, note = memory.beyond_outputs(raw, inp.grad_bytes())
    out["step"] = {"peak_raw_bytes": raw, "peak_extra_bytes": extra,
                   "memory_method": peak.method, **({"memory_note": note} if note else {})}
    inp.clear_grads()
    gc.collect()
    peak = memory.tracker(device)
    peak.start()
    logp_call(contender)(inp, timing.Timer(device))
    raw = peak.stop()
    extra, note = memory.beyond_outputs(raw, inp.tokens * 4)
    out["logp"] = {"peak_raw_bytes": raw, "peak_extra_bytes": extra,
                   **({"memory_note": note} if note else {})}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="one isolated bench measurement")
    p.add_argument("--mode", choices=("memory", "time"), required=True)
    p.add_argument("--contender", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--completion-len", type=int, default=1024)
    p.add_argument("--num-ranks", type=int, default=20)
    p.add_argument("--max-reps", type=int, default=3)
    p.add_argument("--cell-budget-s", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    contender = C.make(a.contender)
    out: dict = {"contender": a.contender, "mode": a.mode, "note": contender.note,
                 "level": contender.level}
    why = contender.skip_reason(device)
    if why:
        out.update(status="skipped", reason=why)
        return _emit(out)
    dtype = DTYPES[a.dtype]
    try:
        inp = make_inputs(a.tokens, a.hidden, a.vocab, dtype=dtype, device=device,
                          completion_len=a.completion_len, num_ranks=a.num_ranks,
                          seed=a.seed + a.tokens)
        if a.mode == "memory":
            small = make_inputs(64, a.hidden, a.vocab, dtype=dtype, device=device,
                                completion_len=64, num_ranks=a.num_ranks, seed=1)
            step_call(contender)(small, timing.Timer(device))
            contender.logp(small)
            del small
            out.update(_memory(contender, inp, device))
            mib = 2**20
            out["summary"] = (f"step peak {out['step']['peak_raw_bytes'] / mib:.1f} MiB, "
                              f"no-grad peak {out['logp']['peak_raw_bytes'] / mib:.1f} MiB")
        else:
            out["matmul"] = matmul_rate(a.tokens, a.hidden, a.vocab, dtype=dtype, device=device,
                                        budget_s=2.0, max_reps=3)
            common = dict(device=device, cell_budget_s=a.cell_budget_s, max_reps=a.max_reps,
                          max_step_s=1e9)
            out["step"] = timing.measure(step_call(contender), [inp],
                                         phases=("forward", "backward"), warmup=1,
                                         out_bytes=lambda i: i.grad_bytes(),
                                         clear=lambda i: i.clear_grads(), **common)
            out["logp"] = timing.measure(logp_call(contender), [inp], phases=("logp",),
                                         warmup=0, **common)
            out["summary"] = (f"step {out['step']['total_ms']['median'] / 1e3:.2f} s "
                              f"(n={out['step']['reps']}), no-grad "
                              f"{out['logp']['total_ms']['median'] / 1e3:.2f} s")
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - OOM and failures are results
        out.update(failure(err))
    return _emit(out)


def _emit(out: dict) -> dict:
    sys.stdout.write("BENCH_RESULT " + json.dumps(out, default=str) + "\n")
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
