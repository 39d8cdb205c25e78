"""Timing and peak memory of one contender at one size.

CUDA: CUDA events around each phase, recorded back to back for all repetitions and read after
one synchronisation, so host overhead between phases is not counted and the GPU is never
idle waiting for the timer. Warm-up calls (compilation, autotuning, allocator growth) are not
counted. Consecutive calls use different input sets (rotated), so the L2 cache does not hold
the previous call's operands. Peak memory: `torch.cuda.max_memory_allocated` during the first
timed call minus what was allocated just before it (the inputs), minus the call's own
outputs (the gradients dhidden and dW of a step, the log-probs of a no-grad pass).

CPU: `time.perf_counter` around each phase (CPU ops are synchronous). Peak memory: the growth
of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before
the call) over the resident set just before it; see memory.py.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from . import memory


def summarize(samples_ms: Sequence[float]) -> dict:
    """Median and spread of a list of times in milliseconds."""
    xs = sorted(float(x) for x in samples_ms)
    if not xs:
        return {"n": 0}
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        q25, q75 = q[0], q[2]
    else:
        q25, q75 = xs[0], xs[-1]
    return {"median": statistics.median(xs), "q25": q25, "q75": q75, "min": xs[0],
            "max": xs[-1], "n": len(xs), "samples": [round(x, 4) for x in xs]}


class Timer:
    """Marks on the device's timeline; `elapsed(a, b)` in ms once `sync()` has run."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# A call runs one contender once on one input set and returns its timeline marks: one more
# mark than phases (step: start, after forward, after backward; no-grad pass: start, end).
Call = Callable[[object, Timer], list]


def measure(call: Call, sets: Sequence, *, phases: Sequence[str], device: torch.device,
            warmup: int, cell_budget_s: float, max_reps: int, max_step_s: float,
            min_reps: int = 2, out_bytes: Callable[[object], int] = lambda inp: 0,
            clear: Callable[[object], None] = lambda inp: None) -> dict:
    """Warm up, pick a repetition count that fits `cell_budget_s`, time every phase and take
    the peak memory of the first timed call. Returns {phase_ms: stats, "total_ms": stats,
    "warmup_s": [...], "peak_extra_bytes", "peak_raw_bytes", "memory_method"[, "memory_note"]}.
    peak_extra_bytes is None (with memory_note saying why) when the method could not resolve
    the call (memory.beyond_outputs); it is never negative.
    """
    timer = Timer(device)
    warm = []
    for i in range(max(1, warmup)):
        start = time.perf_counter()
        call(sets[i % len(sets)], timer)
        timer.sync()
        warm.append(time.perf_counter() - start)
    per_call = warm[-1]
    reps = max(1, min(max_reps, math.floor(cell_budget_s / max(per_call, 1e-6))))
    if reps < min_reps and per_call * min_reps <= max_step_s:
        reps = min_reps
    for s in sets:
        clear(s)
    peak = memory.tracker(device)
    marks = []
    raw, extra, note = None, None, None
    for r in range(reps):
        inp = sets[(len(warm) + r) % len(sets)]
        if r == 0:
            peak.start()
        marks.append(call(inp, timer))
        if r == 0:
            raw = peak.stop()
            extra, note = memory.beyond_outputs(raw, out_bytes(inp))
    timer.sync()
    out = {"warmup_s": [round(w, 4) for w in warm], "reps": reps}
    totals = [0.0] * reps
    for k, phase in enumerate(phases):
        times = [timer.elapsed(m[k], m[k + 1]) for m in marks]
        totals = [a + b for a, b in zip(totals, times)]
        out[f"{phase}_ms"] = summarize(times)
    out["total_ms"] = summarize(totals)
    out["peak_raw_bytes"] = raw
    out["peak_extra_bytes"] = extra
    out["memory_method"] = peak.method
    if note:
        out["memory_note"] = note
    return out
