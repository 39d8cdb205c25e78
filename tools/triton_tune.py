"""Time the Triton phase-1 kernels for a few candidate configurations on a CUDA GPU.

    python -m tools.triton_tune                 # default + candidates, ~2-3 min
    python -m tools.triton_tune --only-default --tokens 32768

For each shape and configuration: the no-grad forward (2*T*H*V FLOPs) and forward+backward
(8*T*H*V model FLOPs, whatever the configuration recomputes: dhidden="recompute" does 10), in
ms and TFLOP/s, next to torch's bf16 matmul rate on the same GPU (the [T, H] @ [H, V-chunk]
GEMM), the extra peak memory of forward+backward beyond inputs and gradients, and the
backward's own buffers as `logprobs_triton.plan_backward` sizes them ("plan MiB", what the
measured extra should be near). A winning configuration goes into triton_config.py, or is set
per run with RANKGRPO_TRITON_CONFIG (the printed string).

    python -m tools.triton_tune --plan-only --tokens 32768 --candidates "default;dhidden=recompute"

prints the planned buffers without a GPU (sizes, not measurements); `--json FILE` appends one
JSON object per measured (shape, T, configuration).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = {"qwen2.5-0.5b": (896, 151936), "llama-3.2-3b": (3072, 128256),
          "qwen2.5-7b": (3584, 152064)}
# Candidate overrides (RANKGRPO_TRITON_CONFIG syntax); "" is the table's default.
CANDIDATES = [
    "",
    "fwd=128x256x64w8s3,dz=128x256x64w8s3,dh=128x256x64w8s3",  # faster on an H200, spills
    "dw=128x128x64w8s4,slab_mib=64,slab_cols=0",               # the table before tuning
    "slab_mib=64",        # the memory-lean backward: more dhidden passes at large T
    "slab_cols=8192",
]


def _time(fn, reps):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _matmul_tflops(T, H, V):
    a = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(min(V, 32768), H, device="cuda", dtype=torch.bfloat16)
    ms = _time(lambda: a @ b.t(), 10)
    return 2 * T * H * b.shape[0] / ms / 1e9


def _measure(lt, tc, spec, h, w, y, g, reps):
    """(forward ms, forward+backward ms, extra peak MiB) under one configuration."""
    T, H = h.shape
    V = w.shape[0]

    def fwd():
        return lt.forward(h, w, y, None, 1.0, False)

    def fwd_bwd():
        logp, lse, ent = lt.forward(h, w, y, None, 1.0, True)
        return lt.backward(h, w, y, None, 1.0, lse, ent, g, None, (True, True, False))

    with tc.override(**tc.parse_spec(spec)):
        t_f = _time(fwd, reps)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t_fb = _time(fwd_bwd, reps)
        # dh and dW (bf16) are the caller's; the rest is the kernels' own memory.
        extra = (torch.cuda.max_memory_allocated() - base - (T * H + V * H) * 2) / 2**20
    return t_f, t_fb, extra


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--only-default", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plan-only", action="store_true",
                    help="print each candidate's planned backward buffers (no GPU needed)")
    ap.add_argument("--json", default=None, help="append one JSON line per measurement here")
    ap.add_argument("--sms", type=int, default=132, help="multiprocessors assumed by "
                    "--plan-only (132: H100/H200 SXM)")
    ap.add_argument("--tflops", type=float, default=790.0, help="--plan-only: bf16 matmul "
                    "rate for the floor estimate (790: an H200 here, device KINDS.md)")
    ap.add_argument("--tbps", type=float, default=4.3, help="--plan-only: memory bandwidth "
                    "in TB/s, bytes read + written (4.3: an H200 here)")
    ap.add_argument("--candidates", default=None,
                    help="';'-separated RANKGRPO_TRITON_CONFIG strings to time instead of the "
                         "built-in list ('' or 'default' is the table's default)")
    args = ap.parse_args(argv)
    from rankgrpo_kernels import triton_config as tc

    cands = CANDIDATES[:1] if args.only_default else CANDIDATES
    if args.candidates is not None:
        cands = ["" if c.strip() in ("", "default") else c.strip()
                 for c in args.candidates.split(";")]
        for c in cands:
            tc.parse_spec(c)  # a typo fails here, before any GPU work
    from rankgrpo_kernels import logprobs_triton as lt

    if args.plan_only:
        return _plan_only(lt, tc, args, cands)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (--plan-only works without one)", file=sys.stderr)
        return 2

    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}  T={args.tokens}")
    for name in args.shapes.split(","):
        H, V = SHAPES[name]
        T = args.tokens
        gen = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
        w = (torch.randn(V, H, device="cuda", generator=gen) * H**-0.5).bfloat16()
        y = torch.randint(0, V, (T,), device="cuda", generator=gen)
        g = torch.randn(T, device="cuda", generator=gen) / T
        mm = _matmul_tflops(T, H, V)
        print(f"\n## {name} H={H} V={V}: torch bf16 matmul {mm:.0f} TFLOP/s")
        print(f"{'config':58} {'fwd ms':>8} {'TF/s':>6} {'%mm':>5} {'f+b ms':>8} {'TF/s':>6} "
              f"{'%mm':>5} {'extra MiB':>9} {'plan MiB':>8}")
        for spec in cands:
            planned = _planned_mib(lt, tc, spec, T, H, V, torch.cuda.get_device_properties(
                0).multi_processor_count)
            row = {"shape": name, "hidden": H, "vocab": V, "tokens": T,
                   "config": spec or "default", "matmul_tflops": mm, "plan_mib": planned}
            try:
                t_f, t_fb, extra = _measure(lt, tc, spec, h, w, y, g, args.reps)
                tf_f = 2 * T * H * V / t_f / 1e9
                tf_fb = 8 * T * H * V / t_fb / 1e9
                print(f"{spec or '(default)':58} {t_f:8.2f} {tf_f:6.0f} {100 * tf_f / mm:5.0f} "
                      f"{t_fb:8.2f} {tf_fb:6.0f} {100 * tf_fb / mm:5.0f} {extra:9.0f} "
                      f"{planned:8.0f}", flush=True)
                row.update(fwd_ms=t_f, fwd_tflops=tf_f, fwd_frac_mm=tf_f / mm, step_ms=t_fb,
                           step_tflops=tf_fb, step_frac_mm=tf_fb / mm, extra_mib=extra,
                           status="ok")
            except Exception as e:  # noqa: BLE001 - report and go on with the next one
                print(f"{spec:58} FAILED {type(e).__name__}: {str(e).splitlines()[0][:120]}",
                      flush=True)
                row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
            _append_json(args.json, row)
        del h, w, y, g
        torch.cuda.empty_cache()
    return 0


def _planned_mib(lt, tc, spec: str, T: int, H: int, V: int, sms: int) -> float:
    """The backward's own buffers under `spec` (bf16 operands), from plan_backward."""
    with tc.override(**tc.parse_spec(spec)):
        cfg = tc.select(torch.bfloat16, H, V, interpret=False)
    plan = lt.plan_backward(cfg, T, H, V, 2, sms, (True, True, False))
    return plan.extra_bytes / 2**20


def _plan_only(lt, tc, args, cands) -> int:
    print(f"# planned backward buffers (bf16, {args.sms} SMs, T={args.tokens}); sizes from "
          "logprobs_triton.plan_backward, not measurements")
    for name in args.shapes.split(","):
        H, V = SHAPES[name]
        for spec in cands:
            with tc.override(**tc.parse_spec(spec)):
                cfg = tc.select(torch.bfloat16, H, V, interpret=False)
            plan = lt.plan_backward(cfg, args.tokens, H, V, 2, args.sms, (True, True, False))
            parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in plan.buffers.items())
            flops = 10 if plan.mode == "recompute" else 8
            est = dhidden_floor_ms(plan, args.tokens, H, V, args.tflops, args.tbps)
            print(f"{name:13} {spec or '(default)':40} {plan.extra_bytes / 2**20:8.1f} MiB "
                  f"({parts}); {flops} THV FLOPs; "
                  + (f"token slab {plan.token_rows} rows x {plan.token_stride}; "
                     if plan.token_rows else f"vocabulary slab {plan.slab} columns; ")
                  + f"dhidden work floor {est['ms']:.1f} ms "
                  f"({est['bound']}-bound: {est['tflop']:.0f} TFLOP, {est['gb']:.0f} GB)")
    return 0


def dhidden_floor_ms(plan, T: int, H: int, V: int, tflops: float, tbps: float) -> dict:
    """A lower bound on the time of the backward's dhidden-specific work (bf16 operands), as
    max(FLOPs / rate, bytes / bandwidth) per pass, summed: what the two modes trade.

    accumulate: the dh GEMM (2THV) per vocabulary slab, reading the dz slab and W[slab]
        (W re-read once per group of token blocks that L2 cannot hold; counted once) and the
        fp32 running sum read + written by every slab but the first and the last.
    recompute: per token slab of `rows`, the logit recompute and the dh GEMM (4 rows H V
        FLOPs) streaming all of W twice (once per GEMM: a slab of rows cannot reuse W across
        slabs) and dz written and read once, plus the partials. With rows below the card's
        ridge point (FLOP per byte) the pass is memory-bound.
    An estimate for choosing what to time, not a measurement."""
    if plan.mode == "accumulate":
        flop = 2.0 * T * H * V
        nbytes = 2.0 * T * V + 2.0 * V * H + max(0, plan.num_slabs - 2) * 8.0 * T * H \
            + (4.0 * T * H if plan.num_slabs > 1 else 0)
        bound = "compute" if flop / (tflops * 1e12) >= nbytes / (tbps * 1e12) else "memory"
        ms = 1e3 * max(flop / (tflops * 1e12), nbytes / (tbps * 1e12))
        return {"ms": ms, "bound": bound, "tflop": flop / 1e12, "gb": nbytes / 1e9}
    rows = plan.token_rows
    ms = flop_all = bytes_all = 0.0
    bound_c = bound_m = 0
    for t0 in range(0, T, rows):
        r = min(rows, T - t0)
        flop = 4.0 * r * H * V
        nbytes = 2 * (2.0 * V * H) + 2 * (2.0 * r * V) + 2.0 * r * H \
            + (8.0 * plan.dh_splits * r * H if plan.dh_splits > 1 else 0)
        tc, tm = flop / (tflops * 1e12), nbytes / (tbps * 1e12)
        bound_c += tc >= tm
        bound_m += tm > tc
        ms += 1e3 * max(tc, tm)
        flop_all += flop
        bytes_all += nbytes
    return {"ms": ms, "bound": "compute" if bound_c >= bound_m else "memory",
            "tflop": flop_all / 1e12, "gb": bytes_all / 1e9}


def _append_json(path: str | None, row: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
