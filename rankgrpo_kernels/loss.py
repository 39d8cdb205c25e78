"""Public loss API: rank_grpo_loss (phase 2) and the fused hidden-states -> loss path."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from . import backends
from ._validate import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_nonneg,
    check_same_shape,
    check_tensor,
)
from .linear_logprobs import linear_logprobs
from .segment_stage import (
    ClipParams,
    SegmentStage,
    metrics_from_stats,
    reference_stage,
    torch_stage,
)
from .segments import LEVELS, gather_rank_advantages, level_segment_ids

LOSS_TYPES = ("bnpo", "grpo", "dr_grpo", "rank")


@dataclass
class Prepared:
    """Canonical [B, T] inputs of the segment stage (see segment_stage.py)."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    adv: torch.Tensor
    key: torch.Tensor
    num_keys: int
    c: torch.Tensor
    mask: torch.Tensor


def _as_2d(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.unsqueeze(0) if x is not None and x.dim() == 1 else x


def _num_segments(seg: torch.Tensor, mask: torch.Tensor, given: int | None,
                  adv_ranks: int | None, validate: bool) -> int:
    if given is not None:
        num = int(given)
    elif adv_ranks is not None:
        num = adv_ranks + 1  # ranks 0..N-1 plus the shared overflow bin N
    else:
        num = int(torch.where(mask, seg, -1).max().clamp(min=0)) + 1  # one host sync
    if validate:
        bad = mask & ((seg < 0) | (seg >= num))
        if bool(bad.any()):
            i = tuple(int(v) for v in bad.nonzero()[0])
            raise ValueError(f"segment_ids must be in [0, {num}) on masked tokens "
                             f"(num_segments={num}); got {int(seg[i])} at index {i}")
        if bool((seg < -1).any()):
            raise ValueError("segment_ids must be >= -1 (-1 marks padding)")
    return num


def prepare(logp, old_logp, advantages, segment_ids, mask, *, ref_logp=None,
            level="rank", loss_type="bnpo", max_completion_length=None, normalizer=None,
            num_segments=None, validate=True) -> Prepared:
    """Validate and canonicalise the loss inputs: segment keys, per-token advantages and the
    aggregation weight c_t of every token, so that loss = sum_t c_t l_t for every loss type.

    c_t = u_t / D with u_t = 1 (bnpo, dr_grpo), 1 / tokens in its row (grpo) or 1 / tokens in
    its segment (rank), and D = masked tokens (bnpo), rows (grpo), rows x
    max_completion_length (dr_grpo), non-empty (row, segment) pairs (rank), or `normalizer`.
    """
    check_choice("level", level, LEVELS)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_tensor("logp", logp, dtypes=FLOAT_DTYPES, ndims=(1, 2))
    check_tensor("mask", mask, ndims=(1, 2))
    check_same_shape("mask", mask, "logp", logp)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if x is not None:
            check_tensor(name, x, dtypes=FLOAT_DTYPES)
            check_same_shape(name, x, "logp", logp)
    if segment_ids is not None:
        check_tensor("segment_ids", segment_ids, dtypes=(torch.int64, torch.int32, torch.int16))
        check_same_shape("segment_ids", segment_ids, "logp", logp)
    check_tensor("advantages", advantages, dtypes=FLOAT_DTYPES, ndims=(1, 2))

    lp = _as_2d(logp)
    acc = torch.float64 if lp.dtype == torch.float64 else torch.float32
    lp = lp.to(acc)
    b, t = lp.shape
    if mask.dtype != torch.bool:
        if validate and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must be bool or hold only 0 and 1")
        mask = mask != 0
    m = _as_2d(mask)
    old = lp.detach() if old_logp is None else _as_2d(old_logp).to(acc).detach()
    ref = None if ref_logp is None else _as_2d(ref_logp).to(acc).detach()
    seg = None if segment_ids is None else _as_2d(segment_ids).long()

    # Advantages: per token [B, T], per rank [B, N] (N != T) or per row [B].
    adv = advantages.to(acc)
    adv_ranks = None
    if advantages.dim() == logp.dim() and tuple(advantages.shape) == tuple(logp.shape):
        adv = _as_2d(adv)
    elif advantages.dim() == 1 and logp.dim() == 2 and advantages.shape[0] == b:
        adv = adv.unsqueeze(1).expand(b, t)
    elif advantages.dim() == 2 and logp.dim() == 2 and advantages.shape[0] == b:
        if seg is None:
            raise ValueError(f"advantages of shape {tuple(advantages.shape)} are per rank and "
                             "need segment_ids to reach the tokens")
        adv_ranks = advantages.shape[1]
        adv = gather_rank_advantages(adv, seg)
    else:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}; expected per token "
                         f"{tuple(logp.shape)}, per rank [{b}, N] or per row [{b}]")

    if validate:
        for name, x in (("logp", lp), ("old_logp", old), ("ref_logp", ref), ("advantages", adv)):
            check_finite(name, x, m)
    # Padding may hold anything (NaN from a masked softmax, say); zero it so that no NaN
    # reaches a gradient through 0 * inf.
    lp, old, adv = (torch.where(m, x, 0) for x in (lp, old, adv))
    ref = None if ref is None else torch.where(m, ref, 0)
    num_seg = None
    if seg is not None:
        num_seg = _num_segments(seg, m, num_segments, adv_ranks, validate)

    rows = torch.arange(b, device=lp.device).unsqueeze(1)
    lvl = level_segment_ids(level, seg, (b, t), lp.device)
    s_ratio = {"token": t, "sequence": 1, "rank": num_seg}[level]
    key = torch.where(m, rows * s_ratio + lvl.clamp(min=0), 0)
    num_keys = b * s_ratio

    mf = m.to(acc)
    if loss_type in ("bnpo", "dr_grpo"):
        u = mf
    elif loss_type == "grpo":
        u = mf / mf.sum(1, keepdim=True).clamp(min=1)
    else:  # rank: each non-empty (row, segment) pair weighs the same
        if seg is not None:
            agg_key = torch.where(m, rows * num_seg + seg.clamp(min=0), 0)
            agg_keys = b * num_seg
        else:
            agg_key, agg_keys = key, num_keys
        n = mf.new_zeros(agg_keys).index_add_(0, agg_key.reshape(-1), mf.reshape(-1))
        u = mf / n[agg_key].clamp(min=1)
    if normalizer is not None:
        denom = torch.as_tensor(normalizer, dtype=acc, device=lp.device)
        if validate and not bool(denom > 0):
            raise ValueError(f"normalizer must be > 0, got {float(denom)}")
    elif loss_type == "bnpo":
        denom = mf.sum().clamp(min=1)
    elif loss_type == "grpo":
        denom = torch.tensor(float(b), dtype=acc, device=lp.device)
    elif loss_type == "dr_grpo":
        length = t if max_completion_length is None else max_completion_length
        if not (isinstance(length, int) and length >= 1):
            raise ValueError(f"max_completion_length must be an int >= 1, got {length!r}")
        denom = torch.tensor(float(b * length), dtype=acc, device=lp.device)
    else:
        denom = (n > 0).sum().to(acc).clamp(min=1)
    return Prepared(lp, old, ref, adv, key, num_keys, u / denom, m)


def _clip_params(epsilon_low, epsilon_high, delta, beta) -> ClipParams:
    check_nonneg("epsilon_low", epsilon_low)
    check_nonneg("epsilon_high", epsilon_high)
    check_nonneg("beta", beta)
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be > 0 (or None), got {delta}")
    return ClipParams(float(epsilon_low), float(epsilon_high),
                      None if delta is None else float(delta), float(beta))


def _stage_impl(name: str):
    if name == "torch":
        return torch_stage
    if name == "native":
        return importlib.import_module("rankgrpo_kernels.native").segment_stage
    return importlib.import_module("rankgrpo_kernels.segment_triton").segment_stage


def rank_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None,
                   advantages: torch.Tensor, segment_ids: torch.Tensor | None,
                   mask: torch.Tensor, *, ref_logp: torch.Tensor | None = None,
                   beta: float = 0.0, epsilon_low: float = 0.06, epsilon_high: float = 0.08,
                   delta: float | None = None, level: str = "rank", loss_type: str = "bnpo",
                   max_completion_length: int | None = None,
                   normalizer: float | torch.Tensor | None = None,
                   num_segments: int | None = None, entropy: torch.Tensor | None = None,
                   backend: str = "auto", validate: bool = True):
    """Rank-GRPO / GRPO / GSPO clipped surrogate loss from per-token log-probs (SPEC 6-7).

    w_k = exp(mean_{t in k} (logp_t - old_logp_t)) over the tokens of segment k (the level
    picks the segments: "token" each token, "sequence" each row, "rank" `segment_ids`);
    l_t = -min(w A_t, clip(w, 1 - epsilon_low, 1 + epsilon_high) A_t) + beta KL_t,
    loss = sum_t c_t l_t with c_t from `loss_type` (see `prepare`).

    Args:
        logp: [B, T] or [T] float log-probs of the sampled tokens (differentiable).
        old_logp: same shape, or None for on-policy (then w == 1 exactly).
        advantages: per token [B, T], per rank [B, N] (gathered through segment_ids; the
            overflow bin gets 0) or per row [B].
        segment_ids: [B, T] long, -1 on padding, N = the shared overflow bin; needed for
            level="rank" and for per-rank advantages.
        mask: [B, T] bool or 0/1, the completion tokens that count.
        ref_logp: log-probs of the frozen reference model, for the k3 KL when beta > 0.
        normalizer: overrides the loss type's denominator (e.g. the global token count across
            gradient accumulation and data-parallel ranks).
        entropy: optional [B, T] per-token entropy, reported as the "entropy" metric.
        backend: "auto", "reference" (autograd of the expression), "torch" (closed form),
            "triton" or "native" (closed form in a kernel / the C++ op library).
        validate: check shapes, values and finiteness (costs a few host syncs).
    Returns:
        (loss 0-dim tensor, metrics: dict of detached 0-dim tensors).
    """
    params = _clip_params(epsilon_low, epsilon_high, delta, beta)
    prep = prepare(logp, old_logp, advantages, segment_ids, mask, ref_logp=ref_logp,
                   level=level, loss_type=loss_type,
                   max_completion_length=max_completion_length, normalizer=normalizer,
                   num_segments=num_segments, validate=validate)
    name = backends.phase2_name(backend, prep.logp.device)
    args = (prep.logp, prep.old_logp, prep.ref_logp, prep.adv, prep.key, prep.num_keys,
            prep.c, prep.mask)
    if name == "reference":
        loss, stats = reference_stage(*args, params)
    else:
        loss, stats = SegmentStage.apply(*args, params, _stage_impl(name))
    ent = None
    if entropy is not None:
        check_same_shape("entropy", entropy, "logp", logp)
        e = _as_2d(entropy).detach().to(prep.logp.dtype)
        ent = torch.where(prep.mask, e, 0).sum() / prep.mask.sum().clamp(min=1)
    return loss, metrics_from_stats(stats, ent)


def fused_linear_rank_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor,
                                targets: torch.Tensor, old_logp: torch.Tensor | None,
                                advantages: torch.Tensor, segment_ids: torch.Tensor | None,
                                mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                                temperature: float = 1.0, ignore_index: int = -100,
                                compute_entropy: bool = True, backend: str = "auto",
                                validate: bool = True, **loss_kwargs):
    """The loss straight from hidden states and the LM head, never materialising logits.

    hidden [B, T, H] (or [T, H]) aligned with targets [B, T]; weight [V, H]; bias [V] or None.
    Other arguments as `rank_grpo_loss` (its keywords pass through). Tokens whose target is
    `ignore_index` are masked out. Returns (loss, metrics) and is differentiable w.r.t.
    hidden, weight and bias. metrics["entropy"] comes from the same fused pass.
    """
    out = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                          ignore_index=ignore_index, return_entropy=compute_entropy,
                          backend=backend, validate=validate)
    logp, entropy = out if compute_entropy else (out, None)
    if tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(targets.shape)}")
    mask = (mask != 0) & (targets != ignore_index)
    return rank_grpo_loss(logp, old_logp, advantages, segment_ids, mask,
                          entropy=entropy, backend=backend,
                          validate=validate, **loss_kwargs)


class LinearRankGRPOLoss(torch.nn.Module):
    """`fused_linear_rank_grpo_loss` as a module; constructor keywords are its options."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, hidden, weight, targets, old_logp, advantages, segment_ids, mask,
                bias=None, ref_logp=None, normalizer=None):
        return fused_linear_rank_grpo_loss(hidden, weight, targets, old_logp, advantages,
                                           segment_ids, mask, bias=bias, ref_logp=ref_logp,
                                           normalizer=normalizer, **self.options)
