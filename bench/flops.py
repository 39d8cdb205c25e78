"""FLOP accounting and the matmul rate every contender is compared with.

Counted model FLOPs (the same for every contender, whatever it recomputes):
    no-grad log-prob pass   2 T H V   (the logits)
    forward with grad       2 T H V
    backward                6 T H V   (recompute the logits, dhidden = dz W, dW = dz^T h)
    full step               8 T H V
An implementation that stores the logits instead of recomputing them does less arithmetic
than it is credited with; one that recomputes more does more. Elementwise work over the
vocabulary is not counted.

The matmul rate is measured in the same run on the same dimensions: `hidden @ weight.t()`,
[T, H] x [H, V] in the suite's dtype (bf16 on GPU), on random data.
"""

from __future__ import annotations

import statistics
import time

import torch

from .timing import Timer


def model_flops(tokens: int, hidden: int, vocab: int) -> dict[str, float]:
    thv = float(tokens) * hidden * vocab
    return {"logp": 2 * thv, "forward": 2 * thv, "backward": 6 * thv, "step": 8 * thv}


def tflops(flop: float, ms: float | None) -> float | None:
    return None if not ms else flop / (ms * 1e-3) / 1e12


def matmul_rate(tokens: int, hidden: int, vocab: int, *, dtype: torch.dtype,
                device: torch.device, budget_s: float = 1.0, max_reps: int = 20) -> dict:
    """Median time and TFLOP/s of [T, H] x [H, V] (weight stored [V, H], as an LM head)."""
    gen = torch.Generator(device=device).manual_seed(1234)
    a = torch.randn(tokens, hidden, generator=gen, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=gen, device=device, dtype=dtype)
    timer = Timer(device)
    start = time.perf_counter()
    out = a @ w.t()
    timer.sync()
    del out
    first = time.perf_counter() - start
    reps = max(2, min(max_reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = timer.mark()
        out = a @ w.t()
        t1 = timer.mark()
        del out
        times.append((t0, t1))
    timer.sync()
    ms = statistics.median(timer.elapsed(t0, t1) for t0, t1 in times)
    del a, w
    return {"dtype": str(dtype).replace("torch.", ""), "ms": ms, "reps": reps,
            "tflops": tflops(2.0 * tokens * hidden * vocab, ms)}
