"""Phase 1 in Triton: the launcher for the fused log-prob kernels (backend="triton").

Same contract as `logprobs_torch` (`contract.Phase1Backend`); kernels live in
`triton_logprobs_fwd.py` and `triton_logprobs_bwd.py`, block sizes in `triton_config.py`.

Forward (deterministic and batch-invariant, no atomics): grid of (token block, vocabulary
split) programs, each a GEMM tile loop hidden @ W^T with an online max / sum-exp / entropy
epilogue in fp32; a second tiny kernel folds the splits in a fixed order and gathers the target
logit. No [N, V] tensor; extra memory 12 bytes x N x (V / v_split) for the split triples.

Backward: deterministic (no atomics), the default and only mode. The vocabulary is cut into
slabs; per slab a kernel recomputes the logit tiles and writes dz (fp32 math, cast to the
operand dtype only as a GEMM operand) into an [N, slab] buffer, then two GEMM kernels compute
dW[slab] = dz^T @ hidden (written once: all tokens are reduced inside one program, or in a fixed
number of token splits summed in a fixed order) and dhidden += dz @ W[slab] (an fp32 running
sum, read and written only by the program that owns the tile, in slab order). Each of the
6*T*H*V backward FLOPs is done once and the result is bitwise reproducible.
Why no atomic "fast mode": the one-kernel alternative (each (token, vocab) tile adds its dh and
dW contributions with fp32 atomics, as Cut Cross-Entropy does) sends (BLOCK_N + BLOCK_V) * H * 4
bytes of atomics to L2 per 6 * BLOCK_N * BLOCK_V * H FLOPs, about 6 TB/s at 600 TFLOP/s with
128 x 128 tiles, more than L2 atomics are likely to sustain, and it needs fp32 copies of both dW
and dhidden. The slab design pays instead ~3 x N x V x 2 bytes of dz traffic and one fp32
read-add-write of dhidden per slab. Both estimates are unmeasured; `triton_tune.py` measures
the slab design per configuration (a larger slab_mib means fewer dhidden passes).
Extra memory: the dz slab (4096 columns capped at slab_mib = 256 MiB for 16-bit operands on a
GPU, 64 MiB for fp32; at least one 256-column slab), the
split-token dW partials when the slab has too few dW tiles to fill the GPU, the dbias partials,
and, when hidden is not fp32 and there is more than one slab, an fp32 [N, H] dhidden
accumulator (the result is cast to hidden's dtype in the last slab's GEMM epilogue).
With `dhidden="recompute"` (triton_config) that accumulator goes: the slab loop computes dW
and dbias only, and a second loop over token slabs recomputes the logits of all V for the
slab's rows into a [rows, V] dz slab (sharing the first slab's storage) and computes
dh[rows] = dz @ W with the whole vocabulary as the GEMM's reduction (fp32 vocabulary-split
partials, summed in a fixed order, when the rows alone do not fill the GPU): 10 T H V FLOPs
instead of 8, extra memory the dz slab plus ~fill x SMs fp32 tiles of partials.
`plan_backward` sizes every launch and buffer of either mode from the shapes alone.
For fp16 operands dz is multiplied by a power of two before its cast (exact), so that small
probabilities do not flush to fp16 zero; the GEMMs divide it out in fp32.

Dtypes: bf16, fp16 and fp32 inputs; logp, lse_state, entropy are fp32. fp64 inputs are served
by the chunked torch backend (exact float64), not by these kernels. Under TRITON_INTERPRET=1 (CPU),
bf16 operands are widened to fp32 on the host first, because the interpreter's bf16 arithmetic
is wrong; results are then cast back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from . import logprobs_torch
from .triton_config import Config, interpreting, select
from .triton_logprobs_bwd import dhidden_kernel, dlogits_kernel, dweight_kernel
from .triton_logprobs_fwd import LOG2E, lse_combine_kernel, lse_partial_kernel

__all__ = ["forward", "backward"]


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands: exact fp32 products (the default "tf32" would round them to 10 bits).
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1, set "
                           f"before triton is imported, for CPU tensors); got {x.device}")


def _operands(hidden, weight, bias):
    """Kernel operands: contiguous rows; bf16 widened to fp32 under the interpreter."""
    h, w = hidden, weight
    if interpreting() and h.dtype == torch.bfloat16:
        h, w = h.float(), w.float()
    if h.stride(-1) != 1:
        h = h.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    b = bias.contiguous() if bias is not None else None
    return h, w, b


def _config(h: torch.Tensor, vocab: int) -> Config:
    return select(h.dtype, h.shape[1], vocab)


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            bias: torch.Tensor | None, temperature: float, need_entropy: bool):
    """hidden [N, H], weight [V, H], targets [N] (negative = ignored).

    Returns (logp [N], lse_state [2, N], entropy [N] or None) in fp32; logp is 0 where the
    target is ignored; entropy is computed for every row (always, so that logp is bitwise the
    same with and without it). lse_state holds per row the raw logit maximum m and log2 of
    the scaled sum-exp, lse = m / temperature + ln 2 * log2 s: what `backward` takes
    (fp64 inputs go to the torch backend, whose lse_state is the lse itself, [N]).
    """
    if hidden.dtype == torch.float64:
        return logprobs_torch.forward(hidden, weight, targets, bias, temperature, need_entropy)
    _check_device(hidden)
    h, w, b = _operands(hidden, weight, bias)
    n, hdim = h.shape
    vocab = w.shape[0]
    dev = h.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse_state = torch.empty(2, n, dtype=torch.float32, device=dev)
    ent = torch.empty_like(logp)
    if n == 0:
        return logp, lse_state, ent if need_entropy else None
    cfg = _config(h, vocab)
    t = cfg.fwd
    splits = triton.cdiv(vocab, cfg.v_split)
    part = torch.empty(3, splits, n, dtype=torch.float32, device=dev)
    scale = LOG2E / float(temperature)
    tg = targets.contiguous()
    prec = _precision(h.dtype)
    lse_partial_kernel[(triton.cdiv(n, t.m) * splits,)](
        h, w, b if b is not None else h, part,
        n, vocab, hdim, h.stride(0), w.stride(0), scale, cfg.v_split, splits,
        HAS_BIAS=b is not None, BLOCK_N=t.m, BLOCK_V=t.n, BLOCK_K=t.k, GROUP_N=cfg.group,
        EVEN_K=hdim % t.k == 0, PRECISION=prec, num_warps=t.num_warps, num_stages=t.num_stages)
    lse_combine_kernel[(triton.cdiv(n, cfg.combine_rows),)](
        part, h, w, b if b is not None else h, tg, logp, lse_state, ent,
        n, hdim, h.stride(0), w.stride(0), scale, splits,
        HAS_BIAS=b is not None, BLOCK_R=cfg.combine_rows, BLOCK_K=cfg.combine_k, num_warps=4)
    return logp, lse_state, ent if need_entropy else None


def _dz_scale(dtype, g, ge, entropy, temperature, dev):
    """Power-of-two factor applied to dz before its cast to the operand dtype (exact)."""
    if dtype != torch.float16:
        return torch.ones(1, dtype=torch.float32, device=dev)
    # |dz| * temperature <= 2|g| + |ge| (1/e + H): lift that bound to ~2^14 (fp16 max 65504).
    bound = 2 * g.abs()
    if ge is not None:
        bound = bound + ge.abs() * (0.37 + entropy.clamp(min=0))
    bound = bound.max().reshape(1) / temperature
    return torch.exp2(torch.floor(torch.log2(2.0**14 / bound.clamp(min=1e-30)))).clamp(
        2.0**-100, 2.0**100)


def _slab_width(cfg: Config, n: int, vocab: int, itemsize: int) -> int:
    """dz slab columns: slab_cols (or as wide as the budget allows) within the slab_mib
    budget, a multiple of 256 (and of the tiles), at least one quantum."""
    quantum = math.lcm(256, cfg.dz.n, cfg.dh.k, cfg.dw.m)
    cols = int(cfg.slab_mib * 2**20) // max(1, n * itemsize)
    if cfg.slab_cols > 0:
        cols = min(cols, cfg.slab_cols)
    cols = max(quantum, cols - cols % quantum)
    return min(cols, triton.cdiv(vocab, quantum) * quantum)


def _token_slab(cfg: Config, n: int, vocab: int, itemsize: int) -> tuple[int, int]:
    """(rows, row stride) of the recompute pass's dz slab [rows, V]: as many rows as the
    slab_mib budget holds, a multiple of the dz and dh token tiles, at least one of them; the
    row stride is V rounded up to 64 elements (aligned rows)."""
    stride = triton.cdiv(vocab, 64) * 64
    quantum = math.lcm(cfg.dz.m, cfg.dh.m)
    rows = int(cfg.slab_mib * 2**20) // (stride * itemsize)
    rows = max(quantum, rows - rows % quantum)
    return min(rows, triton.cdiv(n, quantum) * quantum), stride


GRID_X_MAX = 2**31 - 1   # CUDA: grid dimension x
GRID_YZ_MAX = 65535      # CUDA: grid dimensions y and z


@dataclass(frozen=True)
class BackwardPlan:
    """Every launch size and buffer of one backward call, from the sizes alone (no tensors):
    what the launcher runs, and what tests check against the CUDA grid limits and the int32
    index arithmetic of the kernels at long context."""

    mode: str                 # triton_config.DHIDDEN_MODES
    slab: int                 # vocabulary columns per slab (dz [N, slab])
    num_slabs: int
    dw_splits: int            # token splits of the dW GEMM (fp32 partials when > 1)
    tokens_per_split: int
    token_rows: int           # recompute: rows per token slab (dz [rows, V]); else 0
    token_stride: int         # recompute: row stride of that slab
    dh_splits: int            # recompute: vocabulary splits of the dh GEMM
    dh_split_len: int
    grids: dict               # kernel -> largest grid it is launched with
    buffers: dict             # name -> bytes of the backward's own buffers (beyond dh, dW)

    @property
    def extra_bytes(self) -> int:
        """The buffers' bytes; the dz slabs of the two recompute passes share their storage."""
        return sum(self.buffers.values())


def plan_backward(cfg: Config, n: int, hdim: int, vocab: int, itemsize: int, num_sms: int,
                  needs: tuple[bool, bool, bool]) -> BackwardPlan:
    """The launches and buffers of `backward` for N tokens, hidden size H, vocabulary V and
    operands of `itemsize` bytes, on a device of `num_sms` multiprocessors."""
    need_h, need_w, need_b = needs
    recompute = cfg.dhidden == "recompute" and need_h
    t1, t2, t3 = cfg.dz, cfg.dw, cfg.dh
    slab = _slab_width(cfg, n, vocab, itemsize)
    num_slabs = triton.cdiv(vocab, slab)
    want = cfg.fill * num_sms
    # dW GEMM: split the token reduction when there are too few output tiles to fill the GPU.
    dw_tiles = triton.cdiv(slab, t2.m) * triton.cdiv(hdim, t2.n)
    splits = 1 if dw_tiles >= want else min(triton.cdiv(want, dw_tiles), triton.cdiv(n, 4 * t2.k))
    tokens_per_split = triton.cdiv(triton.cdiv(n, splits), t2.k) * t2.k
    splits = triton.cdiv(n, tokens_per_split)
    grids = {}
    buffers = {}
    slab_pass = need_w or need_b or not recompute
    vocab_dz = n * slab * itemsize if (need_w or (need_h and not recompute)) else 0
    if slab_pass:
        grids["dlogits_kernel"] = (triton.cdiv(n, t1.m) * triton.cdiv(slab, t1.n),)
    if need_b:
        buffers["dbias partials"] = triton.cdiv(n, t1.m) * slab * 4
    if need_w:
        grids["dweight_kernel"] = (triton.cdiv(slab, t2.m) * triton.cdiv(hdim, t2.n), splits)
        if splits > 1:
            buffers["dW split partials"] = splits * slab * hdim * 4
    rows = stride = 0
    dh_splits, split_len = 1, slab
    if need_h and not recompute:
        grids["dhidden_kernel"] = (triton.cdiv(n, t3.m) * triton.cdiv(hdim, t3.n), 1)
        if itemsize != 4 and num_slabs > 1:
            buffers["dhidden fp32 running sum"] = n * hdim * 4
    token_dz = 0
    if recompute:
        rows, stride = _token_slab(cfg, n, vocab, itemsize)
        token_dz = rows * stride * itemsize
        tiles = triton.cdiv(rows, t3.m) * triton.cdiv(hdim, t3.n)
        dh_splits = cfg.dh_splits or (1 if tiles >= want else
                                      min(triton.cdiv(want, tiles), triton.cdiv(vocab, 4 * t3.k)))
        split_len = triton.cdiv(triton.cdiv(vocab, dh_splits), t3.k) * t3.k
        dh_splits = triton.cdiv(vocab, split_len)
        grids["dlogits_kernel (token slab)"] = (triton.cdiv(rows, t1.m)
                                                * triton.cdiv(vocab, t1.n),)
        grids["dhidden_kernel"] = (tiles, dh_splits)
        if dh_splits > 1:
            buffers["dhidden split partials"] = dh_splits * rows * hdim * 4
    if vocab_dz or token_dz:
        buffers["dz slab"] = max(vocab_dz, token_dz)
    return BackwardPlan("recompute" if recompute else "accumulate", slab, num_slabs, splits,
                        tokens_per_split, rows, stride, dh_splits, split_len, grids, buffers)


def _num_sms(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 4


def backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             bias: torch.Tensor | None, temperature: float, lse_state: torch.Tensor,
             entropy: torch.Tensor | None, grad_logp: torch.Tensor,
             grad_entropy: torch.Tensor | None, needs: tuple[bool, bool, bool]):
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. hidden, weight, bias;
    lse_state [2, N] from `forward` ([N] for fp64 inputs).

    dL/dz = [g (onehot(y) - p) - ge p (log p + H)] / temperature; rows with a negative target
    contribute nothing (their g and ge are taken as 0). Returns (dhidden, dweight, dbias) in
    the dtypes of the inputs, None where not needed. Deterministic (no atomics).
    """
    if hidden.dtype == torch.float64:
        return logprobs_torch.backward(hidden, weight, targets, bias, temperature, lse_state,
                                       entropy, grad_logp, grad_entropy, needs)
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    if not (need_h or need_w or need_b):
        return None, None, None
    _check_device(hidden)
    h, w, b = _operands(hidden, weight, bias)
    n, hdim = h.shape
    vocab = w.shape[0]
    dev = h.device
    if n == 0:
        return (torch.zeros_like(hidden) if need_h else None,
                torch.zeros_like(weight) if need_w else None,
                torch.zeros_like(bias) if need_b else None)
    cfg = _config(h, vocab)
    prec = _precision(h.dtype)
    g = grad_logp.to(torch.float32).contiguous()
    has_ge = grad_entropy is not None and entropy is not None
    ge = grad_entropy.to(torch.float32).contiguous() if has_ge else g
    ent = entropy.contiguous() if has_ge else lse_state
    dscale = _dz_scale(h.dtype, g, ge if has_ge else None, ent, temperature, dev)
    scale = LOG2E / float(temperature)
    inv_temp = 1.0 / float(temperature)
    tg = targets.contiguous()

    plan = plan_backward(cfg, n, hdim, vocab, h.element_size(), _num_sms(dev),
                         (need_h, need_w, need_b))
    recompute = plan.mode == "recompute"
    slab, num_slabs = plan.slab, plan.num_slabs
    t1, t2, t3 = cfg.dz, cfg.dw, cfg.dh
    num_m1 = triton.cdiv(n, t1.m)
    # One storage for the dz slab of either pass (they never overlap in time).
    dz_store = (torch.empty(plan.buffers["dz slab"] // h.element_size(), dtype=h.dtype,
                            device=dev) if "dz slab" in plan.buffers else h)
    need_dz = need_w or (need_h and not recompute)
    dz = dz_store[:n * slab].view(n, slab) if need_dz else h
    dbp = torch.empty(num_m1, slab, dtype=torch.float32, device=dev) if need_b else lse_state
    dh = torch.empty(n, hdim, dtype=h.dtype, device=dev) if need_h else None
    dh_acc = None
    if need_h and not recompute:
        dh_acc = dh if (dh.dtype == torch.float32 or num_slabs == 1) else torch.empty(
            n, hdim, dtype=torch.float32, device=dev)
    dw = torch.empty(vocab, hdim, dtype=w.dtype, device=dev) if need_w else None
    db = torch.empty(vocab, dtype=torch.float32, device=dev) if need_b else None
    splits, tokens_per_split = plan.dw_splits, plan.tokens_per_split
    dw_part = (torch.empty(splits, slab, hdim, dtype=torch.float32, device=dev)
               if need_w and splits > 1 else None)
    bias_arg = b if b is not None else h

    for i in range(num_slabs if (need_w or need_b or not recompute) else 0):
        v0 = i * slab
        width = min(slab, vocab - v0)
        dlogits_kernel[(num_m1 * triton.cdiv(width, t1.n),)](
            h, w, bias_arg, tg, lse_state, ent, g, ge, dscale, dz, dbp,
            n, vocab, hdim, h.stride(0), w.stride(0), v0, width, slab, scale, inv_temp,
            HAS_BIAS=b is not None, HAS_GE=has_ge, NEED_DZ=need_dz, NEED_DB=need_b,
            BLOCK_N=t1.m, BLOCK_V=t1.n, BLOCK_K=t1.k, EVEN_K=hdim % t1.k == 0,
            PRECISION=prec, num_warps=t1.num_warps, num_stages=t1.num_stages)
        if need_b:
            torch.sum(dbp[:, :width], dim=0, out=db[v0:v0 + width])
        if need_w:
            out = dw_part if dw_part is not None else dw[v0:]
            dweight_kernel[(triton.cdiv(width, t2.m) * triton.cdiv(hdim, t2.n), splits)](
                dz, h, out, dscale, n, hdim, width, slab, h.stride(0), out.stride(-2),
                out.stride(0) if dw_part is not None else 0, tokens_per_split,
                BLOCK_V=t2.m, BLOCK_H=t2.n, BLOCK_K=t2.k, PRECISION=prec,
                num_warps=t2.num_warps, num_stages=t2.num_stages)
            if dw_part is not None:
                dw[v0:v0 + width] = dw_part[:, :width].sum(0)
        if need_h and not recompute:
            dhidden_kernel[(triton.cdiv(n, t3.m) * triton.cdiv(hdim, t3.n), 1)](
                dz, w, dh_acc, dh, dscale, n, hdim, v0, width, slab, w.stride(0),
                dh_acc.stride(0), dh.stride(0), slab, 0,
                FIRST=i == 0, LAST=i == num_slabs - 1, BLOCK_N=t3.m, BLOCK_H=t3.n,
                BLOCK_K=t3.k, PRECISION=prec, num_warps=t3.num_warps,
                num_stages=t3.num_stages)

    if recompute:
        _dhidden_recompute(plan, cfg, h, w, bias_arg, b is not None, tg, lse_state, ent, g, ge,
                           has_ge, dscale, dz_store, dh, scale, inv_temp, prec)

    return (dh.to(hidden.dtype) if dh is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)


def _dhidden_recompute(plan: BackwardPlan, cfg: Config, h, w, bias_arg, has_bias: bool, tg,
                       lse_state, ent, g, ge, has_ge: bool, dscale, dz_store, dh, scale: float,
                       inv_temp: float, prec: str) -> None:
    """dhidden = dz @ W without an [N, H] fp32 running sum (dhidden="recompute"): per token
    slab, dz of all V columns (logits recomputed) into the [rows, V] slab, then one GEMM per
    (token block, hidden tile, vocabulary split) whose reduction runs over its whole split;
    several splits are fp32 partials summed in split order (deterministic)."""
    n, hdim = h.shape
    vocab = w.shape[0]
    t1, t3 = cfg.dz, cfg.dh
    rows, stride = plan.token_rows, plan.token_stride
    dzt = dz_store[:rows * stride].view(rows, stride)
    nsp = plan.dh_splits
    part = (torch.empty(nsp, rows, hdim, dtype=torch.float32, device=h.device)
            if nsp > 1 else dh)  # (acc_ptr unused with one split)
    for t0 in range(0, n, rows):
        m = min(rows, n - t0)
        sl = slice(t0, t0 + m)
        state = lse_state[:, sl].contiguous()  # the kernel reads its rows at state + N
        ent_s = ent[sl] if has_ge else state
        dlogits_kernel[(triton.cdiv(m, t1.m) * triton.cdiv(vocab, t1.n),)](
            h[sl], w, bias_arg, tg[sl], state, ent_s, g[sl], ge[sl], dscale, dzt, state,
            m, vocab, hdim, h.stride(0), w.stride(0), 0, vocab, stride, scale, inv_temp,
            HAS_BIAS=has_bias, HAS_GE=has_ge, NEED_DZ=True, NEED_DB=False,
            BLOCK_N=t1.m, BLOCK_V=t1.n, BLOCK_K=t1.k, EVEN_K=hdim % t1.k == 0,
            PRECISION=prec, num_warps=t1.num_warps, num_stages=t1.num_stages)
        out = dh[sl]
        dhidden_kernel[(triton.cdiv(m, t3.m) * triton.cdiv(hdim, t3.n), nsp)](
            dzt, w, part, out, dscale, m, hdim, 0, vocab, stride, w.stride(0),
            part.stride(-2), out.stride(0), plan.dh_split_len,
            part.stride(0) if nsp > 1 else 0,
            FIRST=True, LAST=nsp == 1, BLOCK_N=t3.m, BLOCK_H=t3.n, BLOCK_K=t3.k,
            PRECISION=prec, num_warps=t3.num_warps, num_stages=t3.num_stages)
        if nsp > 1:
            out.copy_(part[:, :m].sum(0))  # a fixed-shape reduction: deterministic
