"""Triton backward of phase 1, deterministic: gradients of sum(g logp + ge entropy).

dL/dz = [g (onehot(y) - p) - ge p (log p + H)] / temperature, p = softmax(z / temperature).
The vocabulary is processed in slabs of `slab` columns (sized so that the dz slab fits a memory
budget); per slab, three kernels, none with atomics:

1. `dlogits_kernel`, grid (token blocks x vocab tiles of the slab): recomputes each logit tile
   with `logit_tile` (the forward's K-loop), forms dz in fp32 from the saved (m, log2 s) state
   and entropy, writes dz * dz_scale in the operand dtype into the slab buffer [N, slab] and
   the fp32 column sums of its tile (for dbias) into a [token blocks, slab] buffer.
2. `dweight_kernel`, grid (vocab tiles x hidden tiles, token splits): dW[slab] = dz^T @ hidden,
   a GEMM whose reduction runs over all tokens inside one program (or a fixed number of token
   splits summed later in a fixed order), so dW is written once, in its own dtype.
3. `dhidden_kernel`, grid (token blocks x hidden tiles): dh += dz @ W[slab], fp32 accumulation
   in registers; across slabs the running sum lives in an fp32 buffer (read-add-write by the one
   program that owns the tile, in slab order), and the last slab writes hidden's dtype.

With `dhidden="recompute"` (triton_config) the slab loop runs kernels 1 and 2 only, and a
second loop over token slabs runs kernel 1 on all V columns of the slab's rows (the logits
recomputed once more, 2 T H V FLOPs) and kernel 3 with the whole vocabulary as its reduction:
dh is written once in hidden's dtype (or as a fixed number of fp32 vocabulary-split partials
summed in a fixed order), with no [N, H] fp32 running sum.

dz_scale is a power of two (exact): 1 for bf16/fp32, and for fp16 a factor that lifts the
largest possible |dz| to about 2^14, so small dz do not flush to fp16 zero. The GEMM kernels
multiply their fp32 result by 1 / dz_scale.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_logprobs_fwd import _LN2, clamped, logit_tile


@triton.jit
def dlogits_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, g_ptr, ge_ptr, dscale_ptr,
                   dz_ptr, dbp_ptr,
                   N, V, H, stride_h, stride_w, v_begin, slab_len, dz_stride, scale, inv_temp,
                   HAS_BIAS: tl.constexpr, HAS_GE: tl.constexpr, NEED_DZ: tl.constexpr,
                   NEED_DB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """dz[rows, slab tile] (scaled, operand dtype) and its fp32 column sums per token block
    (both buffers have rows of dz_stride elements)."""
    pid = tl.program_id(0)
    num_vt = tl.cdiv(slab_len, BLOCK_V)
    pid_m = pid // num_vt  # vocab tiles fastest: a token block's hidden rows stay in L2
    pid_v = pid % num_vt

    offs_n = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < slab_len
    offs_v = v_begin + local
    t = logit_tile(h_ptr, w_ptr, b_ptr, clamped(offs_n, N), clamped(offs_v, V), H, stride_h,
                   stride_w, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, PRECISION)

    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    valid = row_ok & (tgt >= 0)
    g = tl.load(g_ptr + offs_n, mask=valid, other=0.0).to(tl.float32)
    # The forward's state (m, log2 s): d = (t - m) * scale - log2 s is log2 p, computed the
    # forward's way. Padded rows get a huge log2 s: p = 0 there, never inf * 0.
    m = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    log2_s = tl.load(lse_ptr + N + offs_n, mask=row_ok, other=1e30)
    d = (t - m[:, None]) * scale - log2_s[:, None]
    p = tl.exp2(d)
    if HAS_GE:
        ge = tl.load(ge_ptr + offs_n, mask=valid, other=0.0).to(tl.float32)
        ent = tl.load(ent_ptr + offs_n, mask=row_ok, other=0.0)
        coef = p * (g[:, None] + ge[:, None] * (ent[:, None] + d * _LN2))
    else:
        coef = p * g[:, None]
    dz = (tl.where(offs_v[None, :] == tgt[:, None], g[:, None], 0.0) - coef) * inv_temp

    if NEED_DZ:
        dscale = tl.load(dscale_ptr)
        out = dz_ptr + offs_n.to(tl.int64)[:, None] * dz_stride + local[None, :]
        tl.store(out, (dz * dscale).to(dz_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    if NEED_DB:
        # Padded rows hold dz = 0 (g = ge = 0, p = 0), so the column sums are exact.
        tl.store(dbp_ptr + pid_m.to(tl.int64) * dz_stride + local, tl.sum(dz, 0), mask=col_ok)


@triton.jit
def dweight_kernel(dz_ptr, h_ptr, out_ptr, dscale_ptr,
                   N, H, slab_len, dz_stride, stride_h, stride_out, stride_split,
                   tokens_per_split,
                   BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
    """out[split?, slab rows, H] = (dz[tokens, slab]^T @ hidden[tokens]) / dz_scale.

    Axis 0: vocab tiles x hidden tiles (hidden fastest, so concurrent programs share dz rows);
    axis 1: token splits (out is then an fp32 partial buffer [splits, slab, H]).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_h = tl.cdiv(H, BLOCK_H)
    pid_v = pid // num_h
    pid_h = pid % num_h

    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = local < slab_len
    hcol = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hcol < H
    t_begin = split * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, N)
    offs_t = t_begin + tl.arange(0, BLOCK_K)

    a_ptrs = dz_ptr + offs_t.to(tl.int64)[None, :] * dz_stride + local[:, None]
    b_ptrs = h_ptr + offs_t.to(tl.int64)[:, None] * stride_h + hcol[None, :]
    acc = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_K):
        t_ok = offs_t < t_end - (t0 - t_begin)
        a = tl.load(a_ptrs, mask=v_ok[:, None] & t_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * dz_stride
        b_ptrs += BLOCK_K * stride_h
    acc = acc / tl.load(dscale_ptr)
    out = (out_ptr + split.to(tl.int64) * stride_split
           + local.to(tl.int64)[:, None] * stride_out + hcol[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=v_ok[:, None] & h_ok[None, :])


@triton.jit
def dhidden_kernel(dz_ptr, w_ptr, acc_ptr, out_ptr, dscale_ptr,
                   N, H, v_begin, slab_len, dz_stride, stride_w, stride_acc, stride_out,
                   split_len, stride_split,
                   FIRST: tl.constexpr, LAST: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """dh[tokens, H tile] (+)= (dz[tokens, cols] @ W[v_begin + cols, H tile]) / dz_scale.

    Axis 0: token blocks x hidden tiles; axis 1: splits of the slab's columns, `split_len`
    each (one split, split_len >= slab_len: the whole slab). FIRST: no running sum to read;
    LAST: write hidden's dtype to out, else fp32 to acc + split * stride_split (a running sum
    across slabs, or one split's partial of the recompute pass).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_h = tl.cdiv(H, BLOCK_H)
    pid_m = pid // num_h  # hidden tiles fastest: they share the dz rows of a token block
    pid_h = pid % num_h

    offs_n = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    rows = clamped(offs_n, N)
    hcol = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = hcol < H
    offs_k = tl.arange(0, BLOCK_K)
    c_begin = split * split_len
    c_end = tl.minimum(c_begin + split_len, slab_len)

    a_ptrs = dz_ptr + rows[:, None] * dz_stride + (c_begin + offs_k)[None, :]
    b_ptrs = w_ptr + (v_begin + c_begin + offs_k).to(tl.int64)[:, None] * stride_w \
        + hcol[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_K):
        k_ok = offs_k < c_end - c0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_w
    acc = acc / tl.load(dscale_ptr)

    ok = row_ok[:, None] & h_ok[None, :]
    run = (acc_ptr + split.to(tl.int64) * stride_split
           + offs_n.to(tl.int64)[:, None] * stride_acc + hcol[None, :])
    if not FIRST:
        acc += tl.load(run, mask=ok, other=0.0)
    if LAST:
        out = out_ptr + offs_n.to(tl.int64)[:, None] * stride_out + hcol[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(run, acc, mask=ok)
