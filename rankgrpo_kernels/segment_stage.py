"""Phase 2, the segment stage: ratios, clipping, KL, loss and g = dL/dlogp in O(T).

Inputs are canonical (see loss.prepare): every masked token carries a flat segment key
(row * S + segment), its advantage and its aggregation weight c_t (0 off the mask), so
token, sequence and rank level and all loss types are one computation.

Two implementations live here and must agree: `reference_stage`, the loss written as an
expression and differentiated by autograd (the oracle), and `torch_stage`, the closed form
of docs/math.md section 7 that a fused kernel needs. The native extension and any Triton segment
kernel implement `torch_stage`'s contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Order of the entries of the stats vector every stage implementation returns.
STAT_NAMES = ("count", "clip_low", "clip_high", "ratio_sum", "ratio_min", "ratio_max", "kl_sum")


@dataclass(frozen=True)
class ClipParams:
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    beta: float


def _segment_sum(values: torch.Tensor, key: torch.Tensor, num_keys: int) -> torch.Tensor:
    return values.new_zeros(num_keys).index_add_(0, key.reshape(-1), values.reshape(-1))


def _stats(w, adv, kl, mask, p: ClipParams) -> torch.Tensor:
    """[7] vector of STAT_NAMES over masked tokens (detached); min/max of no token: +-inf."""
    w, adv = w.detach(), adv.detach()
    m = mask
    low = m & (w < 1 - p.epsilon_low) & (adv < 0)
    high = m & (w > 1 + p.epsilon_high) & (adv > 0)
    inf = w.new_full((1,), float("inf"))
    kl_sum = (torch.where(m, kl.detach(), 0).sum() if kl is not None else w.new_zeros(()))
    # The appended +-inf makes min/max of an empty batch (B = 0 or T = 0) well defined.
    return torch.stack([
        m.sum().to(w.dtype), low.sum().to(w.dtype), high.sum().to(w.dtype),
        torch.where(m, w, 0).sum(),
        torch.cat([torch.where(m, w, inf).reshape(-1), inf]).min(),
        torch.cat([torch.where(m, w, -inf).reshape(-1), -inf]).max(),
        kl_sum,
    ])


# Raw metric sums (docs/math.md section 9), and how each combines across micro-batches and
# processes: "sum" adds, "min"/"max" take the extreme (an empty batch holds +inf / -inf).
SUM_KEYS = ("num_tokens", "clip_low", "clip_high", "ratio_sum", "ratio_min", "ratio_max",
            "kl_sum", "entropy_sum")
SUM_REDUCTIONS = {k: "sum" for k in SUM_KEYS} | {"ratio_min": "min", "ratio_max": "max"}


def sums_from_stats(stats: torch.Tensor, entropy_sum: torch.Tensor | None = None) -> dict:
    """The stage's [7] stats vector (STAT_NAMES order) -> dict of detached 0-dim sums keyed by
    SUM_KEYS ("entropy_sum" only when given)."""
    vals = stats.detach().unbind()
    out = dict(zip(SUM_KEYS[:7], vals))
    if entropy_sum is not None:
        out["entropy_sum"] = entropy_sum.detach().to(stats.dtype)
    return out


def reduce_sums(parts) -> dict:
    """Combine metric sums of several micro-batches (an iterable of `SUM_KEYS` dicts) by
    SUM_REDUCTIONS, in float64 (a float32 count is exact only up to 2**24 tokens); a key
    missing from any part is left out. No host sync. Across processes, all-reduce each key
    with its SUM_REDUCTIONS operation instead."""
    parts = list(parts)
    if not parts:
        raise ValueError("reduce_sums needs at least one dict of sums")
    out = {}
    for k in SUM_KEYS:
        if all(k in p for p in parts):
            v = torch.stack([torch.as_tensor(p[k], dtype=torch.float64).reshape(())
                             for p in parts])
            out[k] = {"sum": v.sum, "min": v.min, "max": v.max}[SUM_REDUCTIONS[k]]()
    return out


def metrics_from_sums(sums: dict) -> dict:
    """Metric sums (`SUM_KEYS`, possibly added up over micro-batches or all-reduced with
    SUM_REDUCTIONS) -> the logged means, docs/math.md section 9. Names follow TRL's
    GRPOTrainer where it has the same quantity:

    clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean (fractions of masked
    tokens), importance_ratio/mean|min|max (1 when there is no token), kl (mean k3 KL),
    entropy (mean; only with "entropy_sum"), num_tokens. Values are 0-dim tensors.
    """
    missing = [k for k in SUM_KEYS[:7] if k not in sums]
    if missing:
        raise ValueError(f"metrics_from_sums: missing keys {missing}; expected {list(SUM_KEYS)}")
    g = {k: torch.as_tensor(v).detach() for k, v in sums.items()}
    count = g["num_tokens"]
    n = count.clamp(min=1)
    some = count > 0
    one = torch.ones_like(g["ratio_sum"])
    out = {
        "clip_ratio/low_mean": g["clip_low"] / n,
        "clip_ratio/high_mean": g["clip_high"] / n,
        "clip_ratio/region_mean": (g["clip_low"] + g["clip_high"]) / n,
        "importance_ratio/mean": torch.where(some, g["ratio_sum"] / n, one),
        "importance_ratio/min": torch.where(some, g["ratio_min"], one),
        "importance_ratio/max": torch.where(some, g["ratio_max"], one),
        "kl": g["kl_sum"] / n,
        "num_tokens": count,
    }
    if "entropy_sum" in g:
        out["entropy"] = g["entropy_sum"] / n
    return out


def metrics_from_stats(stats: torch.Tensor, entropy_mean: torch.Tensor | None = None) -> dict:
    """Means from one stage's stats vector (kept for callers of the old name)."""
    out = metrics_from_sums(sums_from_stats(stats))
    if entropy_mean is not None:
        out["entropy"] = entropy_mean.detach()
    return out


def reference_stage(logp, old_logp, ref_logp, adv, key, num_keys, c, mask, p: ClipParams):
    """The loss as an expression (autograd gives g). Returns (loss, stats)."""
    m = mask.to(logp.dtype)
    lr = torch.where(mask, logp - old_logp, 0)
    n = _segment_sum(m, key, num_keys).clamp(min=1)
    w = torch.exp(_segment_sum(lr, key, num_keys) / n)[key]
    w1 = w if p.delta is None else torch.clamp(w, max=p.delta)
    wc = torch.clamp(w, 1 - p.epsilon_low, 1 + p.epsilon_high)
    per_token = -torch.min(w1 * adv, wc * adv)
    kl = None
    if ref_logp is not None and p.beta != 0:
        r = ref_logp - logp
        kl = torch.exp(r) - r - 1
        per_token = per_token + p.beta * kl
    loss = (torch.where(mask, per_token, 0) * c).sum()
    return loss, _stats(w, adv, kl, mask, p)


def clip_surrogate(w: torch.Tensor, adv: torch.Tensor,
                   p: ClipParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the clipped surrogate -min(min(w, delta) A, clip(w, 1 - eps_low,
    1 + eps_high) A) and its derivative in w, taken as autograd takes it: min() splits a tie
    in half, clamp() passes the gradient at its bounds (docs/math.md section 7)."""
    hi, lo = 1 + p.epsilon_high, 1 - p.epsilon_low
    w1 = w if p.delta is None else torch.clamp(w, max=p.delta)
    a = w1 * adv
    b = torch.clamp(w, lo, hi) * adv
    pa = torch.where(a < b, 1.0, torch.where(a == b, 0.5, 0.0)).to(w.dtype)
    dw1 = 1.0 if p.delta is None else (w <= p.delta).to(w.dtype)
    dwc = ((w >= lo) & (w <= hi)).to(w.dtype)
    return -torch.minimum(a, b), -(pa * adv * dw1 + (1 - pa) * adv * dwc)


def torch_stage(logp, old_logp, ref_logp, adv, key, num_keys, c, mask, p: ClipParams):
    """Closed form: returns (loss, g = dloss/dlogp [B, T], stats). No autograd.

    g_s = (w_k / n_k) sum_{t in k} c_t dl_t/dw + c_s beta (1 - exp(ref_s - logp_s)), with
    dl/dw taken exactly as autograd takes it, ties included: min() splits a tie in half,
    clamp() passes the gradient at its bounds (PyTorch's conventions).
    """
    logp, old_logp = logp.detach(), old_logp.detach()
    m = mask.to(logp.dtype)
    lr = torch.where(mask, logp - old_logp, 0)
    n = _segment_sum(m, key, num_keys).clamp(min=1)
    wk = torch.exp(_segment_sum(lr, key, num_keys) / n)
    w = wk[key]
    per_token, dl_dw = clip_surrogate(w, adv, p)
    q = torch.where(mask, c * dl_dw, 0)
    g = (wk / n)[key] * _segment_sum(q, key, num_keys)[key]
    kl = None
    if ref_logp is not None and p.beta != 0:
        r = ref_logp.detach() - logp
        er = torch.exp(r)
        kl = er - r - 1
        per_token = per_token + p.beta * kl
        g = g + c * p.beta * (1 - er)
    g = torch.where(mask, g, 0)
    loss = (torch.where(mask, per_token, 0) * c).sum()
    return loss, g, _stats(w, adv, kl, mask, p)


class SegmentStage(torch.autograd.Function):
    """Runs a closed-form stage (torch, triton or native) and hands g to autograd."""

    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, adv, key, num_keys, c, mask, params, impl):
        loss, g, stats = impl(logp, old_logp, ref_logp, adv, key, num_keys, c, mask, params)
        ctx.save_for_backward(g)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        (g,) = ctx.saved_tensors
        return (grad_loss * g,) + (None,) * 9
