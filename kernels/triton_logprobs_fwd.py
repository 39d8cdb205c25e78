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
   lse and entropy.

Logits are handled in base 2: z2 = (h.w + b) * log2(e) / temperature, so exp is one ex2
instruction. With m the running max, s = sum 2^(z2 - m) and q = sum 2^(z2 - m) (z2 - m):
lse2 = m + log2 s and the entropy in bits is log2 s - q / s (no cancellation of large logits).
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
def logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, H, stride_h, stride_w, scale,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of (hidden[rows] @ weight[cols]^T + bias[cols]) * scale.

    rows and cols come from `clamped`; scale is log2(e) / temperature (base-2 logits).
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
    return acc * scale


@triton.jit
def _online_update(z2, col_ok, m_i, s_i, q_i, MASKED: tl.constexpr):
    """Fold a [BLOCK_N, BLOCK_V] tile of base-2 logits into the running (m, s, q) per row."""
    if MASKED:
        z2 = tl.where(col_ok[None, :], z2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z2, 1))
    alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
    d = z2 - m_new[:, None]
    e = tl.exp2(d)
    if MASKED:
        ed = e * tl.where(col_ok[None, :], d, 0.0)  # 0 * -inf is NaN on padded columns
    else:
        ed = e * d
    # q shifts with the max: sum e' (z - m_new) = alpha (q + s (m_i - m_new)); on the first
    # tile s_i = 0 and m_i = -inf.
    shift = s_i * tl.where(s_i > 0, m_i - m_new, 0.0)
    q_new = alpha * (q_i + shift) + tl.sum(ed, 1)
    s_new = s_i * alpha + tl.sum(e, 1)
    return m_new, s_new, q_new


@triton.jit(do_not_specialize=["N"])
def lse_partial_kernel(h_ptr, w_ptr, b_ptr, part_ptr,
                       N, V, H, stride_h, stride_w, scale, v_split, num_splits,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, EVEN_K: tl.constexpr,
                       PRECISION: tl.constexpr):
    """part[0|1|2, split, row] = (m, s, q) of the row's base-2 logits over one split."""
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
        z2 = logit_tile(h_ptr, w_ptr, b_ptr, rows, clamped(offs_v, V), H, stride_h, stride_w,
                        scale, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, PRECISION)
        if v0 + BLOCK_V <= V:
            m_i, s_i, q_i = _online_update(z2, col_ok, m_i, s_i, q_i, False)
        else:
            m_i, s_i, q_i = _online_update(z2, col_ok, m_i, s_i, q_i, True)

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
    """Fold the split triples (in split order) into lse and entropy; gather the target logit.

    logp = (z2[y] - lse2) ln 2 with z2[y] = (h . W[y] + b[y]) * scale, the same scale as the
    partial kernel, so a rounding of scale cancels. Rows with a negative target get logp 0.
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
        a = tl.exp2(ms - m)
        s += ss * a
        q += a * (qs + ss * (ms - m))
        p += N
    log2_s = tl.log2(s)
    lse2 = m + log2_s

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
    logp = tl.where(valid, (dot * scale - lse2) * _LN2, 0.0)

    tl.store(logp_ptr + offs, logp, mask=row_ok)
    tl.store(lse_ptr + offs, lse2 * _LN2, mask=row_ok)
    tl.store(ent_ptr + offs, (log2_s - q / s) * _LN2, mask=row_ok)
