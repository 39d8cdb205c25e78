"""Compile every Triton phase-1 kernel ahead of time for sm_90 / sm_80 and report resources.

No GPU is needed: Triton lowers to PTX and runs its bundled ptxas, so register-allocation
failures, spills and shared-memory overflows show up here as they would on the card.

    python -m tools.compile_report            # table for the docs/design.md shapes
    python -m tools.compile_report --arch 90 --dtype bf16 --json

Must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions);
the module re-executes itself in a clean subprocess if it finds the variable set.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

# docs/design.md shapes: (name, H, V)
SHAPES = (("qwen2.5-0.5b", 896, 151936), ("llama-3.2-3b", 3072, 128256),
          ("qwen2.5-7b", 3584, 152064))
SMEM_LIMIT = {90: 232448, 80: 166912}  # max dynamic shared memory per block (bytes)
_TT = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass
class Result:
    kernel: str
    variant: str
    arch: int
    dtype: str
    shape: str
    config: str
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def _kernel_specs(dtype: str, hidden: int, vocab: int):
    """(kernel, variant, config string, runtime-arg types, constexprs, num_warps, stages)."""
    import torch

    from rankgrpo_kernels import triton_logprobs_bwd as bwd
    from rankgrpo_kernels import triton_logprobs_fwd as fwd
    from rankgrpo_kernels.triton_config import select

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = select(tdt, hidden, vocab, interpret=False)
    op = "*" + _TT[dtype]
    prec = "ieee" if dtype == "fp32" else "tf32"
    even_k = lambda k: hidden % k == 0  # noqa: E731
    specs = []
    t = cfg.fwd
    specs.append((fwd.lse_partial_kernel, "bias", str(t) + f" split{cfg.v_split}",
                  dict(h_ptr=op, w_ptr=op, b_ptr=op, part_ptr="*fp32", N="i32", V="i32",
                       H="i32", stride_h="i32", stride_w="i32", scale="fp32", v_split="i32",
                       num_splits="i32"),
                  dict(HAS_BIAS=True, BLOCK_N=t.m, BLOCK_V=t.n, BLOCK_K=t.k, GROUP_N=cfg.group,
                       EVEN_K=even_k(t.k), PRECISION=prec), t.num_warps, t.num_stages))
    specs.append((fwd.lse_combine_kernel, "bias", f"{cfg.combine_rows}x{cfg.combine_k}w4",
                  dict(part_ptr="*fp32", h_ptr=op, w_ptr=op, b_ptr=op, tgt_ptr="*i64",
                       logp_ptr="*fp32", lse_ptr="*fp32", ent_ptr="*fp32", N="i32", H="i32",
                       stride_h="i32", stride_w="i32", scale="fp32", num_splits="i32"),
                  dict(HAS_BIAS=True, BLOCK_R=cfg.combine_rows, BLOCK_K=cfg.combine_k), 4, 3))
    t = cfg.dz
    for has_ge in (False, True):
        specs.append((bwd.dlogits_kernel, "entropy-grad" if has_ge else "plain", str(t),
                      dict(h_ptr=op, w_ptr=op, b_ptr=op, tgt_ptr="*i64", lse_ptr="*fp32",
                           ent_ptr="*fp32", g_ptr="*fp32", ge_ptr="*fp32", dscale_ptr="*fp32",
                           dz_ptr=op, dbp_ptr="*fp32", N="i32", V="i32", H="i32",
                           stride_h="i32", stride_w="i32", v_begin="i32", slab_len="i32",
                           dz_stride="i32", scale="fp32", inv_temp="fp32"),
                      dict(HAS_BIAS=True, HAS_GE=has_ge, NEED_DZ=True, NEED_DB=True,
                           BLOCK_N=t.m, BLOCK_V=t.n, BLOCK_K=t.k, EVEN_K=even_k(t.k),
                           PRECISION=prec), t.num_warps, t.num_stages))
    t = cfg.dw
    for out in dict.fromkeys((op, "*fp32")):  # fp32 operands: one variant
        specs.append((bwd.dweight_kernel, "out" if out == op else "split-partial", str(t),
                      dict(dz_ptr=op, h_ptr=op, out_ptr=out, dscale_ptr="*fp32", N="i32",
                           H="i32", slab_len="i32", dz_stride="i32", stride_h="i32",
                           stride_out="i32", stride_split="i32", tokens_per_split="i32"),
                      dict(BLOCK_V=t.m, BLOCK_H=t.n, BLOCK_K=t.k, PRECISION=prec),
                      t.num_warps, t.num_stages))
    t = cfg.dh
    # dhidden="accumulate" runs all four; dhidden="recompute" runs first=1,last=1 (one
    # vocabulary split) and first=1,last=0 (fp32 split partials), the same binaries.
    for first, last in ((True, False), (False, False), (False, True), (True, True)):
        specs.append((bwd.dhidden_kernel, f"first={int(first)},last={int(last)}", str(t),
                      dict(dz_ptr=op, w_ptr=op, acc_ptr="*fp32", out_ptr=op,
                           dscale_ptr="*fp32", N="i32", H="i32", v_begin="i32",
                           slab_len="i32", dz_stride="i32", stride_w="i32", stride_acc="i32",
                           stride_out="i32", split_len="i32", stride_split="i32"),
                      dict(FIRST=first, LAST=last, BLOCK_N=t.m, BLOCK_H=t.n, BLOCK_K=t.k,
                           PRECISION=prec), t.num_warps, t.num_stages))
    return specs


# Integer arguments the JIT turns into a constexpr when they are 1 (Triton specialises the
# value 1): compile those cases too, since `x.to(...)` on such an argument breaks only there.
_ONE = {"lse_partial_kernel": ("num_splits",), "lse_combine_kernel": ("num_splits",),
        "dlogits_kernel": ("N", "slab_len"), "dweight_kernel": ("N", "slab_len"),
        "dhidden_kernel": ("N", "slab_len")}


def _edge_specs(dtype: str, hidden: int, vocab: int):
    """One variant per kernel with every argument of _ONE specialised to 1."""
    out, done = [], set()
    for kernel, variant, cfg, types, consts, warps, stages in _kernel_specs(dtype, hidden,
                                                                            vocab):
        if kernel.__name__ in done:
            continue
        done.add(kernel.__name__)
        ones = {name: 1 for name in _ONE[kernel.__name__]}
        out.append((kernel, variant + ",=1:" + "+".join(ones), cfg,
                    {k: v for k, v in types.items() if k not in ones}, {**consts, **ones},
                    warps, stages))
    return out


def _specs(dtype: str, hidden: int, vocab: int, edge: bool):
    return _edge_specs(dtype, hidden, vocab) if edge else _kernel_specs(dtype, hidden, vocab)


def _divisible(name: str, typ: str) -> bool:
    """What the JIT would specialise at the real shapes: 16-byte aligned pointers, strides
    and sizes that are multiples of 16 (H and V of every docs/design.md model are); N is never
    specialised in the forward (batch invariance) and is left unhinted everywhere."""
    if typ.startswith("*"):
        return True
    return typ == "i32" and name in ("H", "V", "stride_h", "stride_w", "dz_stride",
                                     "stride_acc", "stride_out", "stride_split", "slab_len",
                                     "split_len")


def compile_one(kernel, types, constexprs, num_warps, num_stages, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.knobs import nvidia as nvknobs

    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = types[name]
            if _divisible(name, types[name]):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    log = io.StringIO()
    saved = nvknobs.dump_ptxas_log
    nvknobs.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        nvknobs.dump_ptxas_log = saved
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs[-1]) if regs else -1,
            int(spills[-1][0]) if spills else -1, int(spills[-1][1]) if spills else -1,
            int(k.metadata.shared))


def _compile_job(job):
    arch, dtype, shape, hidden, vocab, edge, index = job
    kernel, variant, cfg, types, consts, warps, stages = _specs(dtype, hidden, vocab,
                                                                 edge)[index]
    r = Result(kernel.__name__, variant, arch, dtype, shape, cfg)
    try:
        r.registers, r.spill_stores, r.spill_loads, r.shared = compile_one(
            kernel, types, consts, warps, stages, arch)
        if r.shared > SMEM_LIMIT[arch]:
            r.error = f"shared memory {r.shared} > {SMEM_LIMIT[arch]}"
    except Exception as e:  # noqa: BLE001 - report every failure
        r.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return r


def run(archs=(90, 80), dtypes=("bf16", "fp16", "fp32"), shapes=SHAPES, jobs=1,
        verbose=False):
    """Compile each distinct (arch, dtype, kernel, variant, config) once; list of Result."""
    todo, seen = [], {}
    for arch in archs:
        for dtype in dtypes:
            for _name, hidden, vocab in shapes:
                # Edge variants (arguments equal to 1) for compile errors, once per arch.
                for edge in ((False, True) if dtype == dtypes[0] else (False,)):
                    for i, (kernel, variant, cfg, _, consts, *_rest) in enumerate(
                            _specs(dtype, hidden, vocab, edge)):
                        key = (arch, dtype, kernel.__name__, variant, cfg,
                               tuple(sorted(consts.items())))
                        if key in seen:  # the same binary serves this shape too
                            seen[key][2] += f"/{hidden}"
                        else:
                            seen[key] = [arch, dtype, f"H={hidden}", hidden, vocab, edge, i]
                            todo.append(seen[key])
    todo = [tuple(j) for j in todo]
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_compile_job, todo))
    else:
        results = [_compile_job(j) for j in todo]
    if verbose:
        for r in results:
            print(_row(r), flush=True)
    return results


_HEAD = (f"{'arch':>4} {'dtype':5} {'kernel':20} {'variant':28} {'shapes':16} {'config':24} "
         f"{'regs':>4} {'spill st/ld':>11} {'smem':>7}  status")


def _row(r: Result) -> str:
    spill = f"{r.spill_stores}/{r.spill_loads}"
    status = "ok" if r.ok else r.error
    if r.ok and (r.spill_stores > 0 or r.spill_loads > 0):
        status = "SPILLS"
    return (f"sm{r.arch:<2} {r.dtype:5} {r.kernel:20} {r.variant:28} {r.shape:16} "
            f"{r.config:24} {r.registers:>4} {spill:>11} {r.shared:>7}  {status}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", choices=(80, 90))
    ap.add_argument("--dtype", action="append", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--json", action="store_true", help="print one JSON object per kernel")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="parallel compiler processes")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "tools.compile_report",
                                *(argv if argv is not None else sys.argv[1:])], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory(prefix="rankgrpo-triton-cache-") as cache:
        # A cache hit skips ptxas and with it the register/spill log: compile afresh.
        os.environ["TRITON_CACHE_DIR"] = cache  # for the worker processes
        from triton import knobs
        knobs.cache.dir = cache
        return _report(args)


def _report(args) -> int:
    if not args.json:
        print(_HEAD, flush=True)
    results = run(tuple(args.arch or (90, 80)), tuple(args.dtype or ("bf16", "fp16", "fp32")),
                  jobs=args.jobs, verbose=not args.json)
    if args.json:
        for r in results:
            print(json.dumps({**asdict(r), "ok": r.ok}))
    bad = [r for r in results if not r.ok]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
