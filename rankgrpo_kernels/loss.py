"""Public loss API: rank_grpo_loss (phase 2), the fused hidden-states -> loss path, and the
pieces of the contract a trainer shares with it: `loss_normalizer` (the denominator of
docs/math.md section 7) and `metrics_from_sums` (section 9)."""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from . import backends, variants
from ._validate import (
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_nonneg,
    check_same_shape,
    check_tensor,
)
from .contract import ADVANTAGES_PER, LEVELS, LOSS_TYPE_TABLE, LOSS_TYPES, check_delta
from .linear_logprobs import linear_logprobs
from .segment_stage import (
    ClipParams,
    SegmentStage,
    metrics_from_sums,
    reference_stage,
    sums_from_stats,
    torch_stage,
)
from .segments import level_segment_ids, token_advantages
from .variants import NATIVE_UNSUPPORTED

__all__ = ["LOSS_TYPES", "LinearRankGRPOLoss", "Prepared", "fused_linear_rank_grpo_loss",
           "loss_normalizer", "metrics_from_sums", "prepare", "rank_grpo_loss"]


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


def _bool_mask(name: str, mask: torch.Tensor, validate: bool) -> torch.Tensor:
    """A bool copy of a bool or 0/1 mask; validate: anything else (0.5, 2) is an error."""
    if mask.dtype == torch.bool:
        return mask
    if validate and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must be bool or hold only 0 and 1")
    return mask != 0


def loss_normalizer(mask: torch.Tensor, segment_ids: torch.Tensor | None, loss_type: str, *,
                    num_segments: int | None = None,
                    max_completion_length: int | None = None) -> torch.Tensor:
    """The LOCAL denominator D of a loss type, docs/math.md section 7.

    bnpo: masked tokens; grpo: rows; dr_grpo: rows x max_completion_length (default: the
    padded length T); rank: non-empty (row, segment) pairs over masked tokens, the overflow
    bin included; luspo: rows. Every other loss type counts as its aggregation in
    `contract.LOSS_TYPE_TABLE` (docs/math.md section 7.1).

    Not clamped, so the sums over micro-batches and processes are exact; callers clamp the
    total to >= 1 (`prepare` does, for a single call). No host sync.

    Args:
        mask: [B, T] (or [T]) bool or 0/1.
        segment_ids: [B, T] integer segment ids (-1 padding), needed for loss_type="rank"
            only.
        loss_type: one of LOSS_TYPES.
        num_segments: for "rank": ids >= num_segments count as the last segment (the
            overflow bin); None: ids are taken as they are.
        max_completion_length: for "dr_grpo", an int >= 1; default T.
    Returns:
        0-dim float64 tensor on mask's device.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_tensor("mask", mask, ndims=(1, 2))
    agg = LOSS_TYPE_TABLE[loss_type][0]  # one of AGGREGATIONS
    m = _as_2d(mask) != 0
    b, t = m.shape
    f64 = dict(dtype=torch.float64, device=m.device)
    if agg == "bnpo":
        return m.sum().to(torch.float64)
    if agg in ("grpo", "luspo"):
        return torch.tensor(float(b), **f64)
    if agg == "dr_grpo":
        length = t if max_completion_length is None else max_completion_length
        if max_completion_length is not None and not (
                isinstance(length, int) and not isinstance(length, bool) and length >= 1):
            raise ValueError(f"max_completion_length must be an int >= 1, got {length!r}")
        return torch.tensor(float(b * length), **f64)
    if agg != "rank":  # a new aggregation in contract.LOSS_TYPE_TABLE needs its formula here
        raise NotImplementedError(f"loss_normalizer has no denominator for the aggregation "
                                  f"{agg!r} of loss_type={loss_type!r}")
    if segment_ids is None:
        raise ValueError(f"loss_type={loss_type!r} needs segment_ids to count the (row, "
                         "segment) pairs of the denominator")
    check_same_shape("segment_ids", segment_ids, "mask", mask)
    if m.numel() == 0:
        return torch.zeros((), **f64)
    seg = _as_2d(segment_ids).long()
    if num_segments is not None:
        seg = seg.clamp(max=int(num_segments) - 1)
    # Distinct ids per row among masked tokens: sort, count the first of each run. A sort
    # needs neither the number of segments nor a host sync.
    top = torch.iinfo(torch.long).max
    s = torch.where(m, seg, top).sort(dim=-1).values
    first = s != top
    first[:, 1:] &= s[:, 1:] != s[:, :-1]
    return first.sum().to(torch.float64)


def _num_segments(seg: torch.Tensor, mask: torch.Tensor, given: int | None,
                  adv_ranks: int | None, validate: bool) -> int:
    if given is not None:
        num = int(given)
    elif adv_ranks is not None:
        num = adv_ranks + 1  # ranks 0..N-1 plus the shared overflow bin N
    elif seg.numel() == 0:
        num = 1
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


def _advantages_per(advantages: torch.Tensor, logp: torch.Tensor,
                    segment_ids: torch.Tensor | None, given: str | None) -> str:
    """What one advantage value belongs to; None infers it from the shape, refusing the one
    ambiguous case (a [B, T] tensor with segment ids: per token, or per rank with N == T?)."""
    b = 1 if logp.dim() == 1 else logp.shape[0]
    t = logp.shape[-1]
    a = tuple(advantages.shape)
    expect = {"token": f"{tuple(logp.shape)}", "rank": f"[{b}, N]", "row": f"[{b}]"}
    if given is not None:
        check_choice("advantages_per", given, ADVANTAGES_PER)
        ok = {"token": a == tuple(logp.shape),
              "rank": (advantages.dim() == 2 and a[0] == b)
              or (logp.dim() == 1 and advantages.dim() == 1),
              "row": a == (b,) or (logp.dim() == 1 and advantages.dim() == 0)}[given]
        if not ok:
            raise ValueError(f"advantages has shape {a}; advantages_per={given!r} expects "
                             f"{expect[given]}")
        return given
    if a == tuple(logp.shape):
        if segment_ids is not None:
            raise ValueError(
                f"advantages has shape {a}, the shape of logp: per token, or per rank with "
                f"N == T = {t}? Pass advantages_per='token' or advantages_per='rank'")
        return "token"
    if logp.dim() == 2 and advantages.dim() == 1 and a[0] == b:
        return "row"
    if logp.dim() == 2 and advantages.dim() == 2 and a[0] == b:
        return "rank"
    raise ValueError(f"advantages has shape {a}; expected per token {expect['token']}, per "
                     f"rank {expect['rank']} or per row {expect['row']} (or pass "
                     f"advantages_per={list(ADVANTAGES_PER)})")


def prepare(logp, old_logp, advantages, segment_ids, mask, *, ref_logp=None,
            level="rank", loss_type="bnpo", max_completion_length=None, normalizer=None,
            num_segments=None, eos_mask=None, advantages_per=None,
            validate=True) -> Prepared:
    """Validate and canonicalise the loss inputs: segment keys, per-token advantages and the
    aggregation weight c_t of every token, so that loss = sum_t c_t l_t for every loss type
    (docs/math.md section 7).

    c_t = u_t / D with u_t = 1 (bnpo, dr_grpo, luspo), 1 / tokens in its row (grpo) or
    1 / tokens in its segment (rank), and D = `normalizer` or `loss_normalizer(...)` clamped
    to >= 1 (the aggregation of each loss type: docs/math.md section 7.1). Per-rank
    advantages become per-token ones through `token_advantages` (docs/math.md section 5).
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
    if eos_mask is not None:
        check_tensor("eos_mask", eos_mask)
        check_same_shape("eos_mask", eos_mask, "logp", logp)
    check_tensor("advantages", advantages, dtypes=FLOAT_DTYPES, ndims=(0, 1, 2))
    if max_completion_length is not None and not (
            isinstance(max_completion_length, int)
            and not isinstance(max_completion_length, bool) and max_completion_length >= 1):
        raise ValueError(f"max_completion_length must be an int >= 1, got "
                         f"{max_completion_length!r}")
    per = _advantages_per(advantages, logp, segment_ids, advantages_per)

    lp = _as_2d(logp)
    acc = torch.float64 if lp.dtype == torch.float64 else torch.float32
    lp = lp.to(acc)
    b, t = lp.shape
    m = _as_2d(_bool_mask("mask", mask, validate))
    old = lp.detach() if old_logp is None else _as_2d(old_logp).to(acc).detach()
    ref = None if ref_logp is None else _as_2d(ref_logp).to(acc).detach()
    seg = None if segment_ids is None else _as_2d(segment_ids).long()
    eos = None if eos_mask is None else _as_2d(_bool_mask("eos_mask", eos_mask, validate))

    # Advantages per token [B, T] (docs/math.md section 5).
    adv_ranks = None
    if per == "token":
        adv = _as_2d(advantages).to(acc)
    elif per == "row":
        adv = advantages.to(acc).reshape(b, 1).expand(b, t)
    else:
        if seg is None:
            raise ValueError(f"advantages of shape {tuple(advantages.shape)} are per rank and "
                             "need segment_ids to reach the tokens")
        if eos is None:
            raise ValueError(
                "per-rank advantages need eos_mask ([B, T] bool, True at the EOS token of each "
                "row that ended with EOS; all False if every row was truncated): without it "
                "the EOS token is indistinguishable from a token of the last item, which "
                "must get advantage 0 (see rankgrpo_kernels.eos_mask_from_ids)")
        ranks = _as_2d(advantages)
        adv_ranks = ranks.shape[1]
        adv = token_advantages(ranks.to(acc), seg, m, eos)

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

    # The segments of the "rank" aggregation are the rank segments when there are any, else
    # the level's (docs/math.md section 7).
    agg_seg, agg_num = (seg, num_seg) if seg is not None else (lvl, s_ratio)
    mf = m.to(acc)
    agg = LOSS_TYPE_TABLE[loss_type][0]
    if agg in ("bnpo", "dr_grpo", "luspo"):
        u = mf
    elif agg == "grpo":
        u = mf / mf.sum(1, keepdim=True).clamp(min=1)
    elif agg == "rank":  # each non-empty (row, segment) pair weighs the same
        agg_key = torch.where(m, rows * agg_num + agg_seg.clamp(min=0), 0)
        n = mf.new_zeros(b * agg_num).index_add_(0, agg_key.reshape(-1), mf.reshape(-1))
        u = mf / n[agg_key].clamp(min=1)
    else:  # a new aggregation in contract.LOSS_TYPE_TABLE needs its weights u_t here
        raise NotImplementedError(f"prepare has no weights u_t for the aggregation {agg!r} of "
                                  f"loss_type={loss_type!r}")
    if normalizer is not None:
        denom = torch.as_tensor(normalizer, dtype=acc, device=lp.device)
        if validate and not bool(denom > 0):
            raise ValueError(f"normalizer must be > 0, got {float(denom)}")
    else:
        denom = loss_normalizer(m, agg_seg if agg == "rank" else None, loss_type,
                                num_segments=agg_num if agg == "rank" else None,
                                max_completion_length=max_completion_length)
        denom = denom.clamp(min=1).to(acc)
    return Prepared(lp, old, ref, adv, key, num_keys, u / denom, m)


def _clip_params(epsilon_low, epsilon_high, delta, beta, has_ref: bool) -> ClipParams:
    check_nonneg("epsilon_low", epsilon_low)
    check_nonneg("epsilon_high", epsilon_high)
    check_nonneg("beta", beta)
    delta = check_delta(delta)
    if beta > 0 and not has_ref:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (the reference model's log-probs for "
                         "the KL term); pass ref_logp, or beta=0 for no KL")
    return ClipParams(float(epsilon_low), float(epsilon_high), delta, float(beta))


def _row_or_token(name: str, x: torch.Tensor | None, logp: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """A [B, T] (shape of logp) or per-row [B] float tensor as [B, T] / [B, 1] of dtype."""
    if x is None:
        return None
    check_tensor(name, x, dtypes=FLOAT_DTYPES)
    b = 1 if logp.dim() == 1 else logp.shape[0]
    if tuple(x.shape) == tuple(logp.shape):
        return _as_2d(x).to(dtype)
    if logp.dim() == 2 and tuple(x.shape) == (b,):
        return x.reshape(b, 1).to(dtype)
    raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(logp.shape)} (per "
                     f"token) or [{b}] (per row)")


def _native_refusal(variant, off_policy_mask_threshold, top_entropy_quantile,
                    importance_sampling_mode, importance_weights) -> str:
    """The message of backend='native' for a variant it does not implement."""
    given = {"surrogate": variant.surrogate != "clip",
             "kl_estimator": variant.kl_estimator != "k3",
             "use_bias_correction_kl": variant.use_bias_correction_kl,
             "clip_ratio_c": variant.clip_ratio_c is not None,
             "log_ratio_clamp": variant.log_ratio_clamp is not None,
             "ratio_gradient": variant.ratio_gradient != "segment",
             "off_policy_mask_threshold": off_policy_mask_threshold is not None,
             "top_entropy_quantile": top_entropy_quantile < 1,
             "importance_sampling_mode": importance_sampling_mode is not None,
             "importance_weights": importance_weights is not None}
    names = [k for k in NATIVE_UNSUPPORTED if given[k]] or ["loss_type"]
    return (f"backend='native' implements the plain loss only; {', '.join(names)} "
            "(docs/math.md section 7.1) needs backend='torch' or backend='triton'")


def _stage_impl(name: str):
    if name == "torch":
        return torch_stage
    if name == "native":
        return importlib.import_module("rankgrpo_kernels.native").segment_stage
    raise ValueError(f"no segment stage named {name!r}")  # backends.phase2_name never gives it


def rank_grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None,
                   advantages: torch.Tensor, segment_ids: torch.Tensor | None,
                   mask: torch.Tensor, *, ref_logp: torch.Tensor | None = None,
                   beta: float = 0.0, epsilon_low: float = 0.06, epsilon_high: float = 0.08,
                   delta: float | None = None, level: str = "rank", loss_type: str = "bnpo",
                   max_completion_length: int | None = None,
                   normalizer: float | torch.Tensor | None = None,
                   num_segments: int | None = None, entropy: torch.Tensor | None = None,
                   eos_mask: torch.Tensor | None = None, advantages_per: str | None = None,
                   surrogate: str | None = None, kl_estimator: str = "k3",
                   use_bias_correction_kl: bool = False, clip_ratio_c: float | None = None,
                   log_ratio_clamp: float | tuple | None = None,
                   ratio_gradient: str = "segment",
                   sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                   vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                   vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                   sampling_logp: torch.Tensor | None = None,
                   importance_sampling_mode: str | None = None,
                   importance_sampling_clip_min: float | None = None,
                   importance_sampling_clip_max: float | None = 3.0,
                   importance_weights: torch.Tensor | None = None,
                   off_policy_mask_threshold: float | None = None,
                   top_entropy_quantile: float = 1.0, entropy_coef: float = 0.0,
                   return_sums: bool = False, backend: str = "auto", validate: bool = True,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rank-GRPO / GRPO / GSPO clipped surrogate loss from per-token log-probs
    (docs/math.md sections 5-7).

    w_k = exp(mean_{t in k} (logp_t - old_logp_t)) over the tokens of segment k (the level
    picks the segments: "token" each token, "sequence" each row, "rank" `segment_ids`);
    l_t = -min(min(w, delta) A_t, clip(w, 1 - epsilon_low, 1 + epsilon_high) A_t) + beta KL_t,
    loss = sum_t c_t l_t with c_t from `loss_type` (see `prepare`, `loss_normalizer`).

    Args:
        logp: [B, T] or [T] float log-probs of the sampled tokens (differentiable).
        old_logp: same shape, or None for on-policy (then w == 1 exactly).
        advantages: float, per token [B, T], per rank [B, N] (through `token_advantages`:
            item tokens get A[b, seg], overflow tokens and the EOS token 0) or per row [B]
            (every masked token, EOS included). See `advantages_per`.
        segment_ids: [B, T] integer, 0..N-1 items, N the shared overflow bin, -1 padding;
            needed for level="rank", loss_type="rank" and per-rank advantages.
        mask: [B, T] bool or 0/1, the completion tokens that count.
        ref_logp: log-probs of the frozen reference model; required when beta > 0 (k3 KL).
        beta, epsilon_low, epsilon_high: KL weight and clip range (all >= 0).
        delta: None, or a cap > 1 on the ratio of the unclipped term (`check_delta`).
        level: one of LEVELS; loss_type: one of LOSS_TYPES.
        max_completion_length: dr_grpo's length (default T).
        normalizer: overrides the loss type's denominator (e.g. the sum of `loss_normalizer`
            over gradient accumulation and data-parallel processes). Must be > 0.
        num_segments: segments per row incl. the overflow bin (N + 1); default N + 1 from
            per-rank advantages, else inferred from segment_ids (one host sync).
        entropy: optional [B, T] per-token entropy, reported as the "entropy" metric.
        eos_mask: [B, T] bool, True at the EOS token of each row that ended with EOS (see
            `eos_mask_from_ids`; all False when every row was truncated). Required with
            per-rank advantages, ignored otherwise.
        advantages_per: "token" | "rank" | "row" (ADVANTAGES_PER), or None to infer it from
            the shape; a [B, T] tensor with segment_ids is ambiguous (per rank with N == T?)
            and raises unless this is given.

        Variants (docs/math.md section 7.1; every default keeps the loss above):
        surrogate: None (the loss type's) | "clip" | "cispo" (TRL: -sg(min(w, epsilon_high))
            A logp) | "cispo_two_sided" (verl: -sg(clip(w)) A logp) | "sapo" | "vespo" |
            "geo_mean" (GMPO: w = geometric mean of sign-clipped token ratios, -w A).
        kl_estimator: "k3" | "k1"/"kl" | "k2"/"mse" | "abs" | "low_var_kl" (verl's clamped
            k3), each optionally with "+" (same value, the k2 gradient).
        use_bias_correction_kl: multiply the KL by the ratio w (TRL's default, gradient
            through w).
        clip_ratio_c: verl's dual clip (> 1): the loss of A < 0 is at most -A clip_ratio_c.
        log_ratio_clamp: c or (lo, hi): clamp the segment log-ratio before exp (verl: 20).
        ratio_gradient: "segment" (exact gradient of w_k) or "token" (GSPO-token, verl's
            gspo: each token differentiates its own log-prob, w_t = sg(w_k) exp(lr_t - sg)).
        sapo_temperature_pos, sapo_temperature_neg: sapo's gate temperatures (> 0).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: vespo's gamma weight.
        sampling_logp: [B, T] log-probs of the sampler (vLLM) for the off-policy mask and the
            importance-sampling correction (NaN allowed: unscored tokens).
        importance_sampling_mode: None (off) | "token_truncate" | "token_mask" |
            "sequence_truncate" | "sequence_mask": detached weight exp(old_logp -
            sampling_logp) on the policy term, clamped to / masked outside
            [importance_sampling_clip_min, importance_sampling_clip_max] (None: open).
        importance_weights: [B, T] or [B] precomputed detached sampler weights used the same
            way (e.g. verl's rollout_is_weights); exclusive with importance_sampling_mode.
        off_policy_mask_threshold: None, or drop the A < 0 tokens of rows whose mean
            (sampling_logp or old_logp) - logp exceeds it (detached).
        top_entropy_quantile: < 1 keeps the policy term on the tokens in the top quantile of
            entropy only (needs `entropy`; detached).
        entropy_coef: subtract entropy_coef x the mean entropy (over mask x entropy mask),
            differentiable through `entropy`.
        return_sums: return raw 0-dim sums (`SUM_KEYS`) instead of means, to be added up
            over micro-batches / processes and turned into means by `metrics_from_sums`.
        backend: one of BACKENDS: "auto", "reference" (autograd of the expression), "torch"
            (closed form), "triton" (phase 1 only; its segment stage is torch's) or "native"
            (the C++/CUDA op library; the defaults of docs/math.md section 7.1 only, a
            ValueError names any other option). "auto" takes the native stage on CUDA where
            it is built and torch's elsewhere and for any option the native one lacks.
        validate: check shapes, values and finiteness (costs host syncs). With
            validate=False and num_segments known, the loss makes no host sync.
    Returns:
        (loss 0-dim tensor (float32, float64 for float64 logp), metrics: dict of detached
        0-dim tensors: the means of `metrics_from_sums`, or with return_sums the sums).
    """
    params = _clip_params(epsilon_low, epsilon_high, delta, beta, ref_logp is not None)
    variant = variants.make_variant(
        loss_type, surrogate=surrogate, kl_estimator=kl_estimator,
        use_bias_correction_kl=use_bias_correction_kl, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, clip_ratio_c=clip_ratio_c,
        log_ratio_clamp=log_ratio_clamp, ratio_gradient=ratio_gradient, delta=params.delta)
    if entropy is not None:
        check_same_shape("entropy", entropy, "logp", logp)
    if sampling_logp is not None:
        check_tensor("sampling_logp", sampling_logp, dtypes=FLOAT_DTYPES)
        check_same_shape("sampling_logp", sampling_logp, "logp", logp)
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy: pass "
                         "entropy= (fused_linear_rank_grpo_loss does, unless "
                         "compute_entropy=False)")
    prep = prepare(logp, old_logp, advantages, segment_ids, mask, ref_logp=ref_logp,
                   level=level, loss_type=loss_type,
                   max_completion_length=max_completion_length, normalizer=normalizer,
                   num_segments=num_segments, eos_mask=eos_mask,
                   advantages_per=advantages_per, validate=validate)
    ent2d = None if entropy is None else _as_2d(entropy)
    samp = None if sampling_logp is None else _as_2d(sampling_logp).to(prep.logp.dtype)
    rho, phi, ent_mask = variants.detached_weights(
        variant.surrogate, prep.logp.detach(), prep.old_logp, prep.adv, prep.mask,
        sampling_logp=samp, entropy=ent2d, off_policy_mask_threshold=off_policy_mask_threshold,
        top_entropy_quantile=top_entropy_quantile,
        importance_sampling_mode=importance_sampling_mode,
        importance_sampling_clip_min=importance_sampling_clip_min,
        importance_sampling_clip_max=importance_sampling_clip_max, vespo_k_pos=vespo_k_pos,
        vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, importance_weights=_row_or_token(
            "importance_weights", importance_weights, logp, prep.logp.dtype))
    plain = variant.is_default() and rho is None and phi is None
    name = backends.phase2_name(backend, prep.logp.device)
    if not plain and name == "native" and backend == "auto":
        name = "torch"  # auto never picks a stage that lacks the option (every LOSS_TYPES works)
    if not plain and name == "native":
        raise ValueError(_native_refusal(variant, off_policy_mask_threshold,
                                         top_entropy_quantile, importance_sampling_mode,
                                         importance_weights))
    args = (prep.logp, prep.old_logp, prep.ref_logp, prep.adv, prep.key, prep.num_keys,
            prep.c, prep.mask)
    if name == "reference":
        loss, stats = (reference_stage(*args, params) if plain else
                       variants.reference_stage(*args, params, variant, rho, phi))
    else:
        impl = (_stage_impl(name) if plain else
                functools.partial(variants.torch_stage, v=variant, rho=rho, phi=phi))
        loss, stats = SegmentStage.apply(*args, params, impl)
    if entropy_coef != 0:
        bonus = variants.entropy_bonus(ent2d.to(prep.logp.dtype), prep.mask, ent_mask)
        loss = loss - float(entropy_coef) * bonus
    entropy_sum = None
    if entropy is not None:
        e = ent2d.detach().to(prep.logp.dtype)
        entropy_sum = torch.where(prep.mask, e, 0).sum()
    sums = sums_from_stats(stats, entropy_sum)
    return loss, (sums if return_sums else metrics_from_sums(sums))


def fused_linear_rank_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor,
                                targets: torch.Tensor, old_logp: torch.Tensor | None,
                                advantages: torch.Tensor, segment_ids: torch.Tensor | None,
                                mask: torch.Tensor, *, bias: torch.Tensor | None = None,
                                temperature: float = 1.0, ignore_index: int = -100,
                                compute_entropy: bool = True,
                                eos_mask: torch.Tensor | None = None,
                                advantages_per: str | None = None, return_sums: bool = False,
                                backend: str = "auto", validate: bool = True,
                                **loss_kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss straight from hidden states and the LM head, never materialising logits.

    hidden [B, T, H] (or [T, H]) aligned with targets [B, T] (integer); weight [V, H]; bias
    [V] or None. Other arguments as `rank_grpo_loss` (its keywords pass through). Tokens whose
    target is `ignore_index` are masked out; hidden rows of masked-out tokens may hold
    anything (NaN, inf): they are replaced by 0 before the matmul and get a zero gradient.
    Returns (loss, metrics) and is differentiable w.r.t. hidden, weight and bias;
    metrics["entropy"] (or "entropy_sum") comes from the same fused pass.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), ndims=(1, 2))
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected "
                         f"{tuple(hidden.shape[:-1])} (hidden's leading dims)")
    check_tensor("mask", mask, ndims=(1, 2))
    if tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(targets.shape)}")
    mask = _bool_mask("mask", mask, validate) & (targets != ignore_index)
    # Masked-out tokens become ignored targets: linear_logprobs zeroes their hidden rows.
    targets = torch.where(mask, targets, torch.full_like(targets, ignore_index))
    out = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                          ignore_index=ignore_index, return_entropy=compute_entropy,
                          backend=backend, validate=validate)
    logp, entropy = out if compute_entropy else (out, None)
    return rank_grpo_loss(logp, old_logp, advantages, segment_ids, mask,
                          entropy=entropy, eos_mask=eos_mask, advantages_per=advantages_per,
                          return_sums=return_sums, backend=backend, validate=validate,
                          **loss_kwargs)


class LinearRankGRPOLoss(torch.nn.Module):
    """`fused_linear_rank_grpo_loss` as a module; constructor keywords are its options."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, hidden, weight, targets, old_logp, advantages, segment_ids, mask,
                bias=None, ref_logp=None, normalizer=None, eos_mask=None, sampling_logp=None):
        return fused_linear_rank_grpo_loss(hidden, weight, targets, old_logp, advantages,
                                           segment_ids, mask, bias=bias, ref_logp=ref_logp,
                                           normalizer=normalizer, eos_mask=eos_mask,
                                           sampling_logp=sampling_logp, **self.options)
