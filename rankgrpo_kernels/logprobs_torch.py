"""Phase 1 in chunked PyTorch: log-probs from hidden states and the LM head without [N, V].

Rows are processed `chunk` at a time, so the largest temporary is one [chunk, V] tile,
allocated once and reused in place. The backward recomputes each logit tile from the
saved log-sum-exp (`lse_state` [N], see `contract.Phase1Backend`) instead of storing
probabilities. In the forward every chunk is padded
to the same row count: CPU BLAS takes another (gemv) path for a single row, and a fixed
matmul shape is what makes a row's logp independent of the batch it sits in (docs/math.md
section 8).
"""

from __future__ import annotations

import torch

# Elements of one [chunk, V] tile: 2**24 fp32 = 64 MiB on the CPU (bigger tiles made the
# chunk GEMMs markedly faster on 2 cores: 4096x256x32000 fwd+bwd in ~5 s instead of ~8.6 s);
# on a GPU, where each tile is a kernel launch, 4x that. Tests shrink it.
CHUNK_ELEMENTS = 1 << 24
CUDA_CHUNK_FACTOR = 4
# Rows of the exp temporary of the entropy (a slice of the tile at a time).
EXP_ROWS = 256


def chunk_rows(vocab: int, device: torch.device | None = None) -> int:
    """Rows per chunk for a vocabulary size: a multiple of 16 between 16 and 4096 (65536 on
    a GPU). Depends on V and the device type only, never on N (batch invariance)."""
    cuda = device is not None and device.type == "cuda"
    budget = CHUNK_ELEMENTS * (CUDA_CHUNK_FACTOR if cuda else 1)
    rows = max(16, min(65536 if cuda else 4096, budget // max(vocab, 1)))
    return rows - rows % 16


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _operands(hidden, weight, bias):
    """Accumulation dtype, W and bias in it (no copy when already so), rows per chunk."""
    acc = _acc_dtype(hidden)
    b = bias.to(acc) if bias is not None else None
    return acc, weight.to(acc), b, chunk_rows(weight.shape[0], hidden.device)


def _logits_into(out: torch.Tensor, tile: torch.Tensor, w: torch.Tensor,
                 bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """out[:rows] = (tile @ w^T + bias) / temperature, written into a reused buffer."""
    z = out[: tile.shape[0]]
    if bias is not None:
        torch.addmm(bias, tile, w.t(), out=z)
    else:
        torch.mm(tile, w.t(), out=z)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            bias: torch.Tensor | None, temperature: float, need_entropy: bool):
    """hidden [N, H], weight [V, H], targets [N] (negative = ignored).

    Returns (logp [N], lse_state [N], entropy [N] or None), float32 (float64 for float64
    inputs); lse_state is the log-sum-exp of the tempered logits, what `backward` takes.
    logp is 0 where the target is ignored; entropy is computed for every row.
    """
    acc, w, b, rows = _operands(hidden, weight, bias)
    n, dim, vocab, dev = hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.device
    logp = torch.empty(n, dtype=acc, device=dev)
    lse_state = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if need_entropy else None
    z_buf = torch.empty(rows, vocab, dtype=acc, device=dev)
    e_buf = torch.empty(min(rows, EXP_ROWS), vocab, dtype=acc, device=dev)
    tile = torch.zeros(rows, dim, dtype=acc, device=dev)
    for start in range(0, n, rows):
        k = min(rows, n - start)
        tile[:k] = hidden[start:start + k]
        if k < rows:
            tile[k:] = 0
        z = _logits_into(z_buf, tile, w, b, temperature)[:k]
        tl = targets[start:start + k]
        zt = z.gather(1, tl.clamp(min=0).unsqueeze(1)).squeeze(1)
        m = z.amax(dim=-1)
        z.sub_(m.unsqueeze(1))  # shifted logits: one exp pass serves the LSE and entropy
        s = torch.empty_like(m)
        ez = torch.empty_like(m) if entropy is not None else None
        for r in range(0, k, e_buf.shape[0]):  # a small exp buffer instead of a second tile
            zr = z[r:r + e_buf.shape[0]]
            e = torch.exp(zr, out=e_buf[:zr.shape[0]])
            s[r:r + zr.shape[0]] = e.sum(-1)
            if ez is not None:
                ez[r:r + zr.shape[0]] = torch.linalg.vecdot(e, zr)
        log_s = s.log()
        lse_state[start:start + k] = m + log_s
        logp[start:start + k] = torch.where(tl >= 0, zt - m - log_s, 0)
        if entropy is not None:
            # H = -sum p log p = log s - sum e (z - m) / s
            entropy[start:start + k] = log_s - ez / s
    return logp, lse_state, entropy


def backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             bias: torch.Tensor | None, temperature: float, lse_state: torch.Tensor,
             entropy: torch.Tensor | None, grad_logp: torch.Tensor,
             grad_entropy: torch.Tensor | None, needs: tuple[bool, bool, bool]):
    """Gradients of sum(grad_logp * logp + grad_entropy * entropy); lse_state [N] from
    `forward`.

    dL/dz = [g (onehot(y) - p) - ge p (log p + H)] / temperature, then dhidden = dz @ W,
    dW = dz^T @ hidden, dbias = sum_rows dz. Returns (dhidden, dweight, dbias) in the
    dtypes of the inputs, None where not needed.
    """
    acc, w, b, rows = _operands(hidden, weight, bias)
    n, dim, vocab, dev = hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.device
    need_h, need_w, need_b = needs
    dh = torch.empty(n, dim, dtype=acc, device=dev) if need_h else None
    dw = torch.zeros(vocab, dim, dtype=acc, device=dev) if need_w else None
    db = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
    g_all = torch.where(targets >= 0, grad_logp.to(acc), 0)
    z_buf = torch.empty(rows, vocab, dtype=acc, device=dev)
    for start in range(0, n, rows):
        k = min(rows, n - start)
        tile = hidden[start:start + k].to(acc)
        z = _logits_into(z_buf, tile, w, b, temperature)
        g = g_all[start:start + k]
        z.sub_(lse_state[start:start + k].unsqueeze(1))  # log p
        if grad_entropy is not None:
            ge = torch.where(targets[start:start + k] >= 0,
                             grad_entropy[start:start + k].to(acc), 0).unsqueeze(1)
            p = z.exp()
            # -ge p (log p + H) - g p, assembled in z's buffer
            z.add_(entropy[start:start + k].unsqueeze(1)).mul_(p).mul_(-ge)
            dz = z.sub_(p.mul_(g.unsqueeze(1)))
        else:
            dz = z.exp_().mul_(-g.unsqueeze(1))
        tl = targets[start:start + k].clamp(min=0).unsqueeze(1)
        dz.scatter_add_(1, tl, g.unsqueeze(1))  # g is 0 on ignored rows
        if temperature != 1.0:
            dz.div_(temperature)
        if dh is not None:
            torch.mm(dz, w, out=dh[start:start + k])
        if dw is not None:
            dw.addmm_(dz.t(), tile)
        if db is not None:
            db.add_(dz.sum(0))
    return (dh.to(hidden.dtype) if dh is not None else None,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)
