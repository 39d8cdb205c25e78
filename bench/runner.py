"""Runs a suite: for every shape and token count, the same input sets through every
contender (full step and no-grad pass), the matmul rate, and the segment stage alone.

Out of memory is a result ("OOM"), a missing package or device a "skipped" with its reason,
and a size whose time (extrapolated linearly in T from the last measured size) would exceed
the suite's per-step cap or its remaining budget is skipped with the prediction as reason.
Results are written after every size, so a run cut short still leaves its numbers.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import rankgrpo_kernels as rk

from . import contenders as C
from . import env as E
from . import flops as F
from . import memory, report
from .inputs import Inputs, make_inputs, rows_for
from .suites import SHAPES, Suite
from .timing import measure

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg
                                              or "can't allocate memory" in msg)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_call(contender: C.Contender):
    def call(inp: Inputs, timer):
        inp.clear_grads()
        t0 = timer.mark()
        loss = contender.loss(inp)
        t1 = timer.mark()
        contender.backward(loss)
        t2 = timer.mark()
        return [t0, t1, t2]
    return call


def logp_call(contender: C.Contender):
    def call(inp: Inputs, timer):
        t0 = timer.mark()
        contender.logp(inp)
        t1 = timer.mark()
        return [t0, t1]
    return call


def measure_cell(contender: C.Contender, sets: list[Inputs], suite: Suite,
                 device: torch.device, flop: dict, matmul: dict | None) -> dict:
    """Step (forward + backward) and no-grad pass of one contender on the input sets."""
    cell: dict = {"status": "ok", "level": contender.level, "note": contender.note}
    warmup = suite.warmup + (1 if contender.compiles_on(device) else 0)
    rate = (matmul or {}).get("tflops")
    try:
        st = measure(step_call(contender), sets, phases=("forward", "backward"),
                     device=device, warmup=warmup, cell_budget_s=suite.cell_budget_s,
                     max_reps=suite.max_reps, max_step_s=suite.max_step_s,
                     min_reps=suite.min_reps, out_bytes=lambda inp: inp.grad_bytes(),
                     clear=lambda inp: inp.clear_grads())
    except Exception as err:  # noqa: BLE001 - OOM and failures are results
        cell.update(failure(err))
        for s in sets:
            s.clear_grads()
        return cell
    finally:
        for s in sets:
            s.clear_grads()
        free_memory(device)
    st["tflops"] = F.tflops(flop["step"], st["total_ms"].get("median"))
    st["frac_matmul"] = st["tflops"] / rate if rate and st["tflops"] else None
    cell["step"] = st
    cell["note"] = contender.note
    if not contender.has_logp():
        cell["logp"] = {"status": "n/a", "reason": f"same pass as {contender.logp_same_as}"}
        return cell
    try:
        lp = measure(logp_call(contender), sets, phases=("logp",), device=device,
                     warmup=max(0, warmup - 1), cell_budget_s=suite.cell_budget_s / 2,
                     max_reps=suite.max_reps, max_step_s=suite.max_step_s,
                     min_reps=suite.min_reps, out_bytes=lambda inp: inp.tokens * 4)
        lp["status"] = "ok"
        lp["tflops"] = F.tflops(flop["logp"], lp["total_ms"].get("median"))
        lp["frac_matmul"] = lp["tflops"] / rate if rate and lp["tflops"] else None
        cell["logp"] = lp
    except Exception as err:  # noqa: BLE001
        cell["logp"] = failure(err)
    finally:
        free_memory(device)
    return cell


def failure(err: BaseException) -> dict:
    if is_oom(err):
        return {"status": "OOM", "reason": str(err).splitlines()[0][:200]}
    return {"status": "error",
            "reason": E.machine_free(f"{type(err).__name__}: {str(err)[:300]}"),
            "traceback": E.machine_free(traceback.format_exc(limit=6))}


def segment_table(sets: list[Inputs], suite: Suite, device: torch.device,
                  step_ms: float | None, step_name: str | None) -> dict:
    """rank_grpo_loss alone (forward + backward w.r.t. logp) per segment-stage backend."""
    rows = {}
    g = torch.Generator(device=device).manual_seed(7)
    logps = [(s.old_logp + 0.02 * torch.randn(s.old_logp.shape, generator=g, device=device))
             .requires_grad_(True) for s in sets]
    pairs = list(zip(sets, logps))

    for name, why in C.segment_stage_backends(device).items():
        if why:
            rows[name] = {"status": "skipped", "reason": why}
            continue

        def call(pair, timer, name=name):
            inp, logp = pair
            logp.grad = None
            t0 = timer.mark()
            loss, _ = rk.rank_grpo_loss(
                logp, inp.old_logp, inp.adv_rank, inp.segment_ids, inp.mask, backend=name,
                **C.loss_kwargs("rank", inp))
            loss.backward()
            t1 = timer.mark()
            return [t0, t1]

        try:
            r = measure(call, pairs, phases=("stage",), device=device, warmup=2,
                        cell_budget_s=min(0.5, suite.cell_budget_s), max_reps=suite.max_reps,
                        max_step_s=suite.max_step_s, min_reps=suite.min_reps)
            r["status"] = "ok"
            med = r["total_ms"].get("median")
            r["share_of_step"] = med / step_ms if med and step_ms else None
            for k in ("peak_raw_bytes", "peak_extra_bytes", "memory_method"):
                r.pop(k, None)
            rows[name] = r
        except Exception as err:  # noqa: BLE001
            rows[name] = failure(err)
    return {"step_contender": step_name, "step_ms": step_ms, "rows": rows,
            "rule": "a Triton segment kernel is worth it only above 2% of the step"}


def _new_config(shape, tokens: int, suite) -> dict:
    """The results entry of one (shape, T) pair."""
    rows, length = rows_for(tokens, min(suite.completion_len, tokens))
    cfg = {"shape": shape.name, "hidden": shape.hidden, "vocab": shape.vocab,
           "tokens": tokens, "rows": rows, "row_len": length,
           "flops": F.model_flops(tokens, shape.hidden, shape.vocab), "cells": {}}
    return cfg


def _fastest_logp_fn(device: torch.device):
    """Log-probs for building old_logp: the first of triton, CCE, torch that works here."""
    order = ["torch"]
    if device.type == "cuda":
        order = ["triton", "cce", "torch"] if rk.triton_available() else ["cce", "torch"]

    def fn(h, w, y):
        while True:
            name = order[0]
            try:
                if name == "cce":
                    from cut_cross_entropy import linear_cross_entropy

                    return -linear_cross_entropy(h, w, y, reduction="none")
                return rk.linear_logprobs(h, w, y, backend=name, validate=False)
            except Exception as err:  # noqa: BLE001 - fall back to the next one
                if len(order) == 1:
                    raise
                print(f"   (old_logp: {name} failed, {type(err).__name__}: "
                      f"{str(err)[:120]}; using {order[1]})")
                order.pop(0)
    return fn


class Clock:
    def __init__(self, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s

    def left(self) -> float:
        if not self.budget_s:
            return float("inf")
        return self.budget_s - (time.monotonic() - self.start)


def _predict_skip(key, tokens, history, clock, suite) -> str | None:
    """Skip reason from the contender's last measured size of this shape, or None."""
    if clock.left() <= 0:
        return "suite time budget spent"
    h = history.get(key)
    if not h:
        return None
    if h.get("oom_at"):
        return f"OOM at T={h['oom_at']} already"
    if not h.get("step_s"):
        return None
    scale = tokens / h["tokens"]
    step = h["step_s"] * scale
    cost = h["cell_s"] * scale
    if step > suite.max_step_s:
        return (f"time cap: one step predicted at ~{step:.0f} s (T={h['tokens']} took "
                f"{h['step_s']:.1f} s) > {suite.max_step_s:.0f} s")
    if cost > clock.left():
        return f"suite time budget: ~{cost:.0f} s needed, {max(clock.left(), 0):.0f} s left"
    return None


def run(suite: Suite, out_dir: Path, *, log=print, cce_cpu: bool = False,
        compile_cpu: bool = False, plots: bool = True) -> dict:
    """Measure every (shape, T) pair of the suite and write results.json / table.md (after
    every pair) and the plots (at the end). One loop for every suite: what differs is how a
    pair is measured, in this process (`InProcess`) or one process per measurement
    (`Isolated`, the `cpu` suite, whose memory figures need it)."""
    device = torch.device(suite.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"suite {suite.name!r} needs a CUDA GPU and none is visible")
    threads = torch.get_num_threads()
    if suite.threads:
        torch.set_num_threads(suite.threads)
    try:
        clock = Clock(suite.budget_s)
        res = {"suite": suite.name, "env": E.environment(device),
               "settings": _settings(suite), "configs": []}
        log("\n".join(report.header_lines(res)))
        how = (Isolated(suite, log) if suite.isolate
               else InProcess(suite, device, log, cce_cpu=cce_cpu, compile_cpu=compile_cpu))
        for shape_name in suite.shapes:
            shape = SHAPES[shape_name]
            for tokens in sorted(suite.tokens):
                cfg = _new_config(shape, tokens, suite)
                res["configs"].append(cfg)
                if clock.left() <= 0:
                    for n in suite.contenders:
                        cfg["cells"][n] = {"status": "skipped",
                                           "reason": "suite time budget spent"}
                    continue
                log(report.config_heading(cfg, how.detail(clock)))
                how.measure_config(cfg, shape, tokens, clock)
                res["elapsed_s"] = round(time.monotonic() - clock.start, 1)
                report.write(res, out_dir, plots=False)
        res["elapsed_s"] = round(time.monotonic() - clock.start, 1)
        res["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if suite.isolate:
            res["summary"] = report.cpu_summary(res)
        report.write(res, out_dir, plots=plots)
        if plots and (why := report.plots_unavailable()):
            log(why)
        return res
    finally:
        torch.set_num_threads(threads)


class InProcess:
    """Every contender in this process: the input sets are built once per (shape, T), then
    each contender's step and no-grad pass, then the segment stage alone."""

    def __init__(self, suite: Suite, device: torch.device, log, *, cce_cpu: bool,
                 compile_cpu: bool):
        self.suite, self.device, self.log = suite, device, log
        self.dtype = DTYPES[suite.dtype]
        if device.type == "cpu":
            # Large blocks get their own mapping, so the VmHWM method sees them (memory.py).
            memory.pin_mmap_threshold()
        self.made = {n: C.make(n, cce_cpu=cce_cpu, compile_cpu=compile_cpu)
                     for n in suite.contenders}
        self.skips = {n: c.skip_reason(device) for n, c in self.made.items()}
        for n, why in self.skips.items():
            if why:
                log(f"skipped {n}: {why}")
        self.history: dict = {}
        self.logp_fn = _fastest_logp_fn(device)

    def detail(self, clock: Clock) -> str:
        return f"{clock.left():.0f} s of budget left"

    def measure_config(self, cfg: dict, shape, tokens: int, clock: Clock) -> None:
        suite, device = self.suite, self.device
        try:
            sets = [make_inputs(tokens, shape.hidden, shape.vocab, dtype=self.dtype,
                                device=device, completion_len=suite.completion_len,
                                num_ranks=suite.num_ranks, seed=1000 * i + tokens,
                                logp_fn=self.logp_fn)
                    for i in range(suite.input_sets)]
            cfg["matmul"] = F.matmul_rate(tokens, shape.hidden, shape.vocab, dtype=self.dtype,
                                          device=device,
                                          budget_s=min(1.0, suite.budget_s or 1.0))
        except Exception as err:  # noqa: BLE001
            cfg["error"] = failure(err)
            self.log(f"   inputs/matmul failed: {cfg['error']['reason']}")
            free_memory(device)
            return
        self.log(report.matmul_line(cfg["matmul"]))
        for name, contender in self.made.items():
            cfg["cells"][name] = self._one(name, contender, sets, cfg, clock, tokens)
        best = next((n for n in ("triton", "torch") if _ok(cfg["cells"].get(n))), None)
        if suite.segment_table:
            step = report.step_ms(cfg["cells"][best]) if best else None
            cfg["segment"] = segment_table(sets, suite, device, step, best)
            for line in report.segment_lines(cfg["segment"]):
                self.log(line)
        del sets
        free_memory(device)

    def _one(self, name, contender, sets, cfg, clock, tokens) -> dict:
        why = self.skips[name]
        if why:
            return {"status": "skipped", "reason": why, "level": contender.level,
                    "static": True}
        key = (cfg["shape"], name)
        pred = _predict_skip(key, tokens, self.history, clock, self.suite)
        if pred:
            self.log(f"   {name:13s} skipped: {pred}")
            status = "OOM" if pred.startswith("OOM") else "skipped"
            return {"status": status, "reason": pred, "level": contender.level}
        start = time.monotonic()
        cell = measure_cell(contender, sets, self.suite, self.device, cfg["flops"],
                            cfg.get("matmul"))
        spent = time.monotonic() - start
        cell["wall_s"] = round(spent, 2)
        if cell["status"] == "ok":
            self.history[key] = {"tokens": tokens,
                                 "step_s": cell["step"]["total_ms"]["median"] / 1e3,
                                 "cell_s": spent}
        elif cell["status"] == "OOM":
            self.history[key] = {"oom_at": tokens}
        self.log(report.cell_line(name, cell, spent))
        return cell


class Isolated:
    """Each contender's memory in a fresh process (pinned mmap threshold), then its timing in
    `suite.rounds` fresh processes, interleaved across contenders so that a change in the
    machine's load falls on all of them (bench/worker.py)."""

    def __init__(self, suite: Suite, log):
        self.suite, self.log = suite, log

    def detail(self, clock: Clock) -> str:
        return "one process per contender and measurement"

    def measure_config(self, cfg: dict, shape, tokens: int, clock: Clock) -> None:
        suite, log = self.suite, self.log
        args = ["--hidden", str(shape.hidden), "--vocab", str(shape.vocab),
                "--tokens", str(tokens), "--dtype", suite.dtype,
                "--completion-len", str(suite.completion_len),
                "--num-ranks", str(suite.num_ranks), "--max-reps", str(suite.max_reps),
                "--cell-budget-s", str(suite.cell_budget_s), "--threads", str(suite.threads)]
        mem = {n: _worker(["--mode", "memory", "--contender", n, *args], log)
               for n in suite.contenders}
        timing: dict[str, list[dict]] = {n: [] for n in suite.contenders}
        for r in range(suite.rounds):
            for n in suite.contenders:
                log(f"   timing {n} (round {r + 1}/{suite.rounds})")
                timing[n].append(_worker(["--mode", "time", "--contender", n, *args], log))
        cfg["matmul"] = _pooled_matmul([r for rs in timing.values() for r in rs])
        if cfg["matmul"]:
            log(report.matmul_line(cfg["matmul"], pooled=True))
        for n in suite.contenders:
            cfg["cells"][n] = _merge(n, mem[n], timing[n], cfg["flops"], cfg["matmul"])


def _ok(cell):
    return bool(cell) and cell.get("status") == "ok"


def _settings(suite: Suite) -> dict:
    from dataclasses import asdict

    s = asdict(suite)
    s["validate"] = False
    s["loss_type"] = "bnpo"
    s["epsilons"] = C.EPSILONS
    return s


def _worker(argv: list[str], log) -> dict:
    env = dict(os.environ)
    if "--mode" in argv and argv[argv.index("--mode") + 1] == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # every block >= 128 KiB is its own mapping
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(E.REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.worker", *argv], env=env, cwd=E.REPO,
                          capture_output=True, text=True)
    for line in proc.stderr.splitlines()[-5:]:
        if proc.returncode:
            log(f"   worker: {line}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            out = json.loads(line[len("BENCH_RESULT "):])
            log(f"   worker {' '.join(argv[:4])}: {out.get('status')} "
                f"{out.get('summary', '')}")
            return out
    return {"status": "error", "reason": f"worker exited {proc.returncode}: "
            f"{(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}"}


def _pooled_matmul(results: list[dict]) -> dict:
    """The matmul rate each timing process measured before its contender, pooled."""
    rates = [r["matmul"] for r in results if r.get("matmul")]
    if not rates:
        return {}
    ms = statistics.median(r["ms"] for r in rates)
    return {"dtype": rates[0]["dtype"], "ms": ms, "tflops": statistics.median(
        r["tflops"] for r in rates), "per_process_tflops": [r["tflops"] for r in rates]}


def _merge(name: str, mem: dict, rounds: list[dict], flop: dict, matmul: dict) -> dict:
    """One cell from a contender's memory process and its timing processes. The level comes
    from the workers' reports (the contender's own `level`), never assumed."""
    level = mem.get("level") or next((r["level"] for r in rounds if r.get("level")), None)
    bad = [r for r in [mem, *rounds] if r.get("status") != "ok"]
    if bad:
        return {"status": bad[0].get("status"), "reason": bad[0].get("reason"),
                "level": level}
    from .timing import summarize

    def pooled(key, phase):
        xs = [x for r in rounds for x in r[key][f"{phase}_ms"]["samples"]]
        return summarize(xs)

    step = {"forward_ms": pooled("step", "forward"), "backward_ms": pooled("step", "backward"),
            "total_ms": pooled("step", "total"), "reps": sum(r["step"]["reps"] for r in rounds),
            "warmup_s": [w for r in rounds for w in r["step"]["warmup_s"]],
            "rounds": len(rounds),
            "peak_extra_bytes": mem["step"]["peak_extra_bytes"],
            "peak_raw_bytes": mem["step"]["peak_raw_bytes"],
            "memory_method": mem["step"]["memory_method"] + ", fresh process, mmap threshold "
                                                          "128 KiB"}
    lp = {"status": "ok", "total_ms": pooled("logp", "total"),
          "reps": sum(r["logp"]["reps"] for r in rounds),
          "peak_extra_bytes": mem["logp"]["peak_extra_bytes"],
          "peak_raw_bytes": mem["logp"]["peak_raw_bytes"]}
    for out, src in ((step, mem["step"]), (lp, mem["logp"])):
        if src.get("memory_note"):
            out["memory_note"] = src["memory_note"]
        out["tflops"] = F.tflops(flop["step" if out is step else "logp"],
                                 out["total_ms"]["median"])
        out["frac_matmul"] = (out["tflops"] / matmul["tflops"] if matmul.get("tflops")
                              else None)
    return {"status": "ok", "level": level, "note": mem.get("note", ""), "step": step,
            "logp": lp, "rss_before_bytes": mem.get("rss_before_bytes")}
