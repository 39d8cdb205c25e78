"""Phase 1 in chunked PyTorch: log-probs from hidden states and the LM head without [N, V].

Rows are processed `chunk` at a time, so the largest temporary is [chunk, V]. The backward
recomputes each logit tile from the saved log-sum-exp instead of storing probabilities.
Every chunk is padded to the same row count: CPU BLAS picks a different (gemv) path for a
single row, and a fixed matmul shape is what makes a row's logp independent of the batch
it sits in (SPEC section 8, batch invariance).
"""

from __future__ import annotations

import torch

# Elements of one [chunk, V] tile. 2**22 fp32 = 16 MiB; tests shrink it to exercise chunking.
CHUNK_ELEMENTS = 1 << 22


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary size: a multiple of 16 between 16 and 4096."""
    rows = max(16, min(4096, CHUNK_ELEMENTS // max(vocab, 1)))
    return rows - rows % 16


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tiles(hidden: torch.Tensor, rows: int):
    """Yield (start, stop, padded [rows, H] tile in the accumulation dtype)."""
    acc = _acc_dtype(hidden)
    n = hidden.shape[0]
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        tile = hidden[start:stop].to(acc)
        if stop - start < rows:
            tile = torch.cat([tile, tile.new_zeros(rows - (stop - start), tile.shape[1])])
        yield start, stop, tile


def _logits(tile: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
            temperature: float) -> torch.Tensor:
    z = tile @ w.t()
    if bias is not None:
        z += bias
    if temperature != 1.0:
        z /= temperature
    return z


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            bias: torch.Tensor | None, temperature: float, need_entropy: bool):
    """hidden [N, H], weight [V, H], targets [N] (negative = ignored).

    Returns (logp [N], lse [N], entropy [N] or None), float32 (float64 for float64 inputs).
    logp is 0 where the target is ignored; entropy is computed for every row.
    """
    acc = _acc_dtype(hidden)
    n, vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    rows = chunk_rows(vocab)
    logp = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if need_entropy else None
    for start, stop, tile in _tiles(hidden, rows):
        k = stop - start
        z = _logits(tile, w, b, temperature)[:k]
        tl = targets[start:stop]
        m = torch.logsumexp(z, dim=-1)
        zt = z.gather(1, tl.clamp(min=0).unsqueeze(1)).squeeze(1)
        lse[start:stop] = m
        logp[start:stop] = torch.where(tl >= 0, zt - m, torch.zeros_like(m))
        if entropy is not None:
            # H = lse - sum_j p_j z_j; p in place of z's copy keeps one [chunk, V] temporary.
            p = torch.exp(z - m.unsqueeze(1))
            entropy[start:stop] = m - (p * z).sum(-1)
    return logp, lse, entropy


def backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             bias: torch.Tensor | None, temperature: float, lse: torch.Tensor,
             entropy: torch.Tensor | None, grad_logp: torch.Tensor,
             grad_entropy: torch.Tensor | None, needs: tuple[bool, bool, bool]):
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy).

    dL/dz = [g (onehot(y) - p) - ge p (log p + H)] / temperature, then dhidden = dz @ W,
    dW = dz^T @ hidden, dbias = sum_rows dz. Returns (dhidden, dweight, dbias) in the
    dtypes of the inputs, None where not needed.
    """
    acc = _acc_dtype(hidden)
    n, vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    rows = chunk_rows(vocab)
    need_h, need_w, need_b = needs
    dh = torch.empty(n, hidden.shape[1], dtype=acc, device=hidden.device) if need_h else None
    dw = torch.zeros(vocab, hidden.shape[1], dtype=acc, device=hidden.device) if need_w else None
    db = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_b else None
    g_all = grad_logp.to(acc)
    for start, stop, tile in _tiles(hidden, rows):
        k = stop - start
        z = _logits(tile, w, b, temperature)
        g = torch.zeros(rows, dtype=acc, device=hidden.device)
        g[:k] = g_all[start:stop]
        m = torch.zeros(rows, dtype=acc, device=hidden.device)
        m[:k] = lse[start:stop]
        tl = torch.full((rows,), -1, dtype=targets.dtype, device=targets.device)
        tl[:k] = targets[start:stop]
        g = torch.where(tl >= 0, g, torch.zeros_like(g))
        z -= m.unsqueeze(1)  # z now holds log p
        p = torch.exp(z)
        dz = p * (-g).unsqueeze(1)
        if grad_entropy is not None:
            ge = torch.zeros(rows, dtype=acc, device=hidden.device)
            ge[:k] = grad_entropy.to(acc)[start:stop]
            ent = torch.zeros(rows, dtype=acc, device=hidden.device)
            ent[:k] = entropy[start:stop]
            dz -= ge.unsqueeze(1) * p * (z + ent.unsqueeze(1))
        rows_idx = torch.arange(rows, device=hidden.device)
        dz[rows_idx, tl.clamp(min=0)] += g  # g is 0 on ignored rows, so index 0 is harmless
        if temperature != 1.0:
            dz /= temperature
        if dh is not None:
            dh[start:stop] = (dz @ w)[:k]
        if dw is not None:
            dw += dz.t() @ tile
        if db is not None:
            db += dz.sum(0)
    return (dh.to(hidden.dtype) if dh is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)
