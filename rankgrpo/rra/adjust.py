"""Adjust (Eq. 12-13): a per-item affine correction of the reflected scores.

    s_final = w * s_reflect + b,   w, b in R^C,

fitted on training conversations by minimising (docs/rra/README.md)

    J(w, b) = 1/P * sum_{(i, t)} [ -log softmax_C(w * s_i + b)[t] ] + lambda_w ||w - 1||^2
              + lambda_b ||b||^2

over the P (conversation i, ground-truth item t) pairs. It is full batch and convex in
(w, b), solved with L-BFGS. The loss and its gradient are accumulated over chunks of
conversations, so only a [chunk, C] block of scores and probabilities exists at a time: the
score matrix may be a memory-mapped tensor that never sits in memory whole.

Gradient (z_i = w * s_i + b, m_i = number of targets of row i, q_i their count vector):
    dJ/dz_i = (m_i * softmax(z_i) - q_i) / P
    dJ/dw   = sum_i dJ/dz_i * s_i + 2 lambda_w (w - 1)
    dJ/db   = sum_i dJ/dz_i       + 2 lambda_b b
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class AdjustResult:
    """Fitted `w`, `b` ([C] each) and how the fit ended. Unpacks as `w, b = result`."""

    w: torch.Tensor
    b: torch.Tensor
    objective: float
    grad_norm: float
    iterations: int
    num_pairs: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.w, self.b))

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """`w * scores + b` for scores [..., C]."""
        return scores * self.w.to(scores.dtype) + self.b.to(scores.dtype)


def _rows_with_targets(targets: Sequence[Sequence[int]], n: int, c: int
                       ) -> tuple[list[int], list[list[int]], int]:
    if len(targets) != n:
        raise ValueError(f"targets has {len(targets)} rows but scores has {n}")
    rows, tgts, pairs = [], [], 0
    for i, t in enumerate(targets):
        t = [int(x) for x in t]
        for x in t:
            if not 0 <= x < c:
                raise ValueError(f"targets[{i}] holds {x}, outside the catalog [0, {c})")
        if t:
            rows.append(i)
            tgts.append(t)
            pairs += len(t)
    return rows, tgts, pairs


def adjust_objective(w: torch.Tensor, b: torch.Tensor, scores: torch.Tensor,
                     targets: Sequence[Sequence[int]], *, lambda_w: float = 0.01,
                     lambda_b: float = 0.01, chunk_size: int = 1024
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(J, dJ/dw, dJ/db)` of Eq. 13 at (w, b), computed chunk by chunk (see module doc).

    Args:
        w, b: [C] parameters; their dtype is the compute dtype.
        scores: [n, C] reflected scores (any float dtype; may be memory-mapped).
        targets: per row, the catalog columns of its ground-truth items (may be empty).
    """
    n, c = scores.shape
    rows, tgts, pairs = _rows_with_targets(targets, n, c)
    return _objective(w, b, scores, rows, tgts, pairs, lambda_w, lambda_b, chunk_size)


def _objective(w, b, scores, rows, tgts, pairs, lambda_w, lambda_b, chunk_size):
    dt = w.dtype
    loss = torch.zeros((), dtype=dt)
    gw = torch.zeros_like(w)
    gb = torch.zeros_like(b)
    if pairs:
        for start in range(0, len(rows), chunk_size):
            idx = rows[start:start + chunk_size]
            s = scores[torch.as_tensor(idx)].to(dt)  # [m, C]
            z = s * w + b
            lse = torch.logsumexp(z, dim=1)  # [m]
            q = torch.zeros_like(z)
            for j, t in enumerate(tgts[start:start + chunk_size]):
                q[j].index_add_(0, torch.as_tensor(t), torch.ones(len(t), dtype=dt))
            m = q.sum(dim=1)
            loss += (m * lse).sum() - (q * z).sum()
            gz = m[:, None] * torch.softmax(z, dim=1) - q  # [m, C]
            gw += (gz * s).sum(dim=0)
            gb += gz.sum(dim=0)
        loss, gw, gb = loss / pairs, gw / pairs, gb / pairs
    loss = loss + lambda_w * ((w - 1) ** 2).sum() + lambda_b * (b ** 2).sum()
    gw = gw + 2 * lambda_w * (w - 1)
    gb = gb + 2 * lambda_b * b
    return loss, gw, gb


def fit_adjust(scores: torch.Tensor, targets: Sequence[Sequence[int]], *,
               lambda_w: float = 0.01, lambda_b: float = 0.01, chunk_size: int = 1024,
               max_iter: int = 200, tolerance_grad: float = 1e-7,
               dtype: torch.dtype = torch.float64) -> AdjustResult:
    """Fit Eq. 12-13's `w, b` (each [C]) with full-batch L-BFGS; unpacks as `(w, b)`.

    Args:
        scores: [n, C] `s_reflect` of the training conversations (float; may be a
            memory-mapped tensor: only `chunk_size` rows are read into memory at a time).
        targets: n lists of catalog columns, the ground-truth items of each conversation;
            rows without any contribute nothing.
        lambda_w, lambda_b: the ridge weights pulling w to 1 and b to 0.
    Returns:
        `AdjustResult` with w, b (float32), the final objective and gradient norm (also
        logged), the number of L-BFGS iterations and of (conversation, item) pairs.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n, C], got shape {tuple(scores.shape)}")
    n, c = scores.shape
    if c == 0:
        raise ValueError("scores has no catalog columns (empty catalog)")
    if lambda_w < 0 or lambda_b < 0:
        raise ValueError(f"lambda_w and lambda_b must be >= 0, got {lambda_w}, {lambda_b}")
    rows, tgts, pairs = _rows_with_targets(targets, n, c)
    w = torch.ones(c, dtype=dtype, requires_grad=True)
    b = torch.zeros(c, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=tolerance_grad, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        with torch.no_grad():
            loss, gw, gb = _objective(w, b, scores, rows, tgts, pairs, lambda_w, lambda_b,
                                      chunk_size)
        w.grad, b.grad = gw, gb
        return loss

    if pairs:
        opt.step(closure)
    with torch.no_grad():
        loss, gw, gb = _objective(w, b, scores, rows, tgts, pairs, lambda_w, lambda_b,
                                  chunk_size)
    gnorm = math.sqrt(float((gw ** 2).sum() + (gb ** 2).sum()))
    iters = int(opt.state[opt._params[0]].get("n_iter", 0)) if pairs else 0
    log.info("fit_adjust: n=%d C=%d pairs=%d objective=%.6g grad_norm=%.3g iterations=%d",
             n, c, pairs, float(loss), gnorm, iters)
    return AdjustResult(w.detach().float(), b.detach().float(), float(loss), gnorm, iters,
                        pairs)
