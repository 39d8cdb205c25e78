"""A small kernel demonstration: `python -m rankgrpo_kernels.demo`.

Runs the fused Rank-GRPO loss (forward + backward) with the chunked torch backend and with
the materialised reference on the same random batch, each in its own process, and prints
the loss, the gradient norm, the time and the peak memory beyond the inputs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _run(backend: str, tokens: int, hidden: int, vocab: int, seed: int, queue) -> None:
    from rankgrpo_kernels import fused_linear_rank_grpo_loss, segment_ids_from_newlines

    torch.manual_seed(seed)
    b, t = tokens // 512, 512
    h = torch.randn(b, t, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden ** 0.5).requires_grad_()
    y = torch.randint(0, vocab, (b, t))
    mask = torch.ones(b, t, dtype=torch.bool)
    newline = (torch.arange(vocab) % 25 == 0).long()
    seg = segment_ids_from_newlines(y, mask, newline, 20)
    adv = torch.randn(b, 20)
    eos = torch.zeros_like(mask)  # every row runs to T: truncated, no EOS token
    old = None
    # Warm up on a small slice so that code pages and thread pools loaded on first use are
    # not counted as the loss's memory.
    fused_linear_rank_grpo_loss(h[:1, :64].detach().requires_grad_(), w, y[:1, :64], old,
                                adv[:1], seg[:1, :64], mask[:1, :64], eos_mask=eos[:1, :64],
                                backend=backend, validate=False)[0].backward()
    w.grad = None
    base = _rss_bytes()
    start = time.perf_counter()
    loss, metrics = fused_linear_rank_grpo_loss(h, w, y, old, adv, seg, mask, eos_mask=eos,
                                                backend=backend, validate=False)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    grad_norm = torch.cat([h.grad.flatten(), w.grad.flatten()]).norm().item()
    queue.put(dict(backend=backend, loss=loss.item(), grad_norm=grad_norm, seconds=seconds,
                   peak_extra_mib=max(peak - base, 0) / 2**20,
                   entropy=metrics["entropy"].item()))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for backend in ("torch", "reference"):
        q = ctx.Queue()
        proc = ctx.Process(target=_run, args=(backend, args.tokens, args.hidden, args.vocab,
                                              args.seed, q))
        proc.start()
        rows.append(q.get())
        proc.join()
    print(f"fused Rank-GRPO loss, T={args.tokens} H={args.hidden} V={args.vocab}, fp32, CPU")
    print(f"{'backend':<10} {'loss':>12} {'grad norm':>12} {'seconds':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['backend']:<10} {r['loss']:>12.6f} {r['grad_norm']:>12.6f} "
              f"{r['seconds']:>8.2f} {r['peak_extra_mib']:>9.1f}")
    ratio = rows[0]["peak_extra_mib"] / max(rows[1]["peak_extra_mib"], 1e-9)
    print(f"peak memory torch / reference: {ratio:.3f}; "
          f"speed torch / reference: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
