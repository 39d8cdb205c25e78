"""Triton forward of phase 1: log-sum-exp, target log-prob and entropy without [N, V] logits.

Two kernels, both deterministic and batch-invariant (no atomics; nothing a row computes
depends on N or on the other rows of its tile):

1. `lse_partial_kernel`, grid (token blocks x vocabulary splits) on axis 0. The vocabulary is
   cut into splits of `V_SPLIT` columns (a function of V, H and dtype only, never of N). A
   program owns BLOCK_N tokens and one split: it walks the split in BLOCK_V tiles, computes
   each logit tile hidden @ W^T with `tl.dot` (fp32 accumulation, K-loop over H), and folds
   it into an online (max, sum-exp, sum-exp * z) triple per row in fp32. Padded vocabulary
   columns are -inf. It writes one triple per (split, row).
2. `lse_combine_kernel`, grid over row blocks: folds the split triples in split order (fixed),
   gathers the target logit as a row dot product hidden[n] . W[y_n] in fp32, and writes logp,
   the (m, log2 s) state and entropy.

With t = h.w + b the raw logit and m its running row max (raw units), every exponent is the
base-2 difference d = (t - m) * log2(e) / temperature, so exp is one ex2 instruction and the
scaling is applied after the subtraction: t - m is exact near the maximum however large |t| is
(scaling first would round t * log2(e) at the magnitude of t, visible at logits around -800).
s = sum 2^d and q = sum 2^d d: log2 s, the log-prob d_y - log2 s and the entropy in bits
log2 s - q / s need no cancellation of large numbers. The saved state is (m, log2 s) per row,
from which the backward recomputes every d exactly the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host-side constants
LN2 = 0.6931471805599453
_LN2 = tl.constexpr(LN2)  # what kernels may read as globals
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def clamped(offs, limit):
    """int64 indices of offs with the out-of-range ones repeating the last valid index (the
    caller masks what they produce), so that padded lanes never load out of bounds."""
    return tl.minimum(offs, limit - 1).to(tl.int64)


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, H, stride_h, stride_w,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of raw logits hidden[rows] @ weight[cols]^T + bias[cols].

    rows and cols come from `clamped`.
    """
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k < H - k * BLOCK_K
            a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return acc


@triton.jit
def _online_update(t, col_ok, m_i, s_i, q_i, scale, MASKED: tl.constexpr):
    """Fold a [BLOCK_N, BLOCK_V] tile of raw logits into the running (m, s, q) per row
    (m raw, s and q of the base-2 differences d = (t - m) * scale)."""
    if MASKED:
        t = tl.where(col_ok[None, :], t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(t, 1))
    step = (m_i - m_new) * scale  # -inf on the first tile (m_i = -inf): alpha = 0
    alpha = tl.exp2(step)
    d = (t - m_new[:, None]) * scale
    e = tl.exp2(d)
    if MASKED:
        ed = e * tl.where(col_ok[None, :], d, 0.0)  # 0 * -inf is NaN on padded columns
    else:
        ed = e * d
    # q shifts with the max: sum e' (z - m_new) = alpha (q + s (m_i - m_new)); on the first
    # tile s_i = 0 and m_i = -inf.
    shift = s_i * tl.where(s_i > 0, step, 0.0)
    q_new = alpha * (q_i + shift) + tl.sum(ed, 1)
    s_new = s_i * alpha + tl.sum(e, 1)
    return m_new, s_new, q_new


@triton.jit(do_not_specialize=["N"])
def lse_partial_kernel(h_ptr, w_ptr, b_ptr, part_ptr,
                       N, V, H, stride_h, stride_w, scale, v_split, num_splits,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, EVEN_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    """part[0|1|2, split, row] = (m, s, q) of the row's logits over one split."""
    pid = tl.program_id(0)
    # Grouped order: GROUP_N token blocks share the W tiles they stream through L2.
    num_m = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * num_splits
    first_m = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_m - first_m, GROUP_N)
    pid_m = first_m + (pid % per_group) % group_size
    split = (pid % per_group) // group_size

    offs_n = pid_m * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = clamped(offs_n, N)
    v_begin = split * v_split
    v_end = tl.minimum(v_begin + v_split, V)

    m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_N,), tl.float32)
    q_i = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        t = logit_tile(h_ptr, w_ptr, b_ptr, rows, clamped(offs_v, V), H, stride_h, stride_w,
                       HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
        if v0 + BLOCK_V <= V:
            m_i, s_i, q_i = _online_update(t, col_ok, m_i, s_i, q_i, scale, False)
        else:
            m_i, s_i, q_i = _online_update(t, col_ok, m_i, s_i, q_i, scale, True)

    row_ok = offs_n < N
    out = part_ptr + split.to(tl.int64) * N + offs_n
    plane = tl.cast(num_splits, tl.int64) * N  # (num_splits may be a constexpr 1)
    tl.store(out, m_i, mask=row_ok)
    tl.store(out + plane, s_i, mask=row_ok)
    tl.store(out + 2 * plane, q_i, mask=row_ok)


@triton.jit(do_not_specialize=["N"])
def lse_combine_kernel(part_ptr, h_ptr, w_ptr, b_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr,
                       N, H, stride_h, stride_w, scale, num_splits,
                       HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Fold the split triples (in split order) into the row's (m, log2 s) state, stored as
    state[0, row] = m and state[1, row] = log2 s, and the entropy; gather the target logit.

    logp = ((t[y] - m) * scale - log2 s) ln 2 with t[y] = h . W[y] + b[y] raw, the same
    difference-then-scale as the partial kernel. Rows with a negative target get logp 0.
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs < N
    plane = tl.cast(num_splits, tl.int64) * N  # (num_splits may be a constexpr 1)

    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    p = part_ptr + offs
    for _ in range(0, num_splits):
        m = tl.maximum(m, tl.load(p, mask=row_ok, other=0.0))
        p += N
    s = tl.zeros((BLOCK_R,), tl.float32)
    q = tl.zeros((BLOCK_R,), tl.float32)
    p = part_ptr + offs
    for _ in range(0, num_splits):
        ms = tl.load(p, mask=row_ok, other=0.0)
        ss = tl.load(p + plane, mask=row_ok, other=1.0)
        qs = tl.load(p + 2 * plane, mask=row_ok, other=0.0)
        step = (ms - m) * scale
        a = tl.exp2(step)
        s += ss * a
        q += a * (qs + ss * step)
        p += N
    log2_s = tl.log2(s)

    tgt = tl.load(tgt_ptr + offs, mask=row_ok, other=-1)
    valid = row_ok & (tgt >= 0)
    rows = tl.where(valid, offs, 0).to(tl.int64)
    trow = tl.where(valid, tgt, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    dot = tl.zeros((BLOCK_R,), tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        kk = k * BLOCK_K + offs_k
        ld = valid[:, None] & (kk < H)[None, :]
        a = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :], mask=ld, other=0.0)
        b = tl.load(w_ptr + trow[:, None] * stride_w + kk[None, :], mask=ld, other=0.0)
        dot += tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    if HAS_BIAS:
        dot += tl.load(b_ptr + trow, mask=valid, other=0.0).to(tl.float32)
    logp = tl.where(valid, ((dot - m) * scale - log2_s) * _LN2, 0.0)

    tl.store(logp_ptr + offs, logp, mask=row_ok)
    tl.store(lse_ptr + offs, m, mask=row_ok)
    tl.store(lse_ptr + N + offs, log2_s, mask=row_ok)
    tl.store(ent_ptr + offs, (log2_s - q / s) * _LN2, mask=row_ok)
