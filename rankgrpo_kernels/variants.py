"""Loss variants of the segment stage: surrogates, KL estimators, log-ratio clamps and the
detached per-token weights (masks, importance-sampling correction), docs/math.md section 7.1.

Everything the variants change is a pure function of tensors, given twice where a gradient is
involved: as an expression for autograd (the oracle, `reference_stage`) and in closed form
(`torch_stage`, what a fused backward needs: one scalar per token). The general per-token loss
is

    l_t = rho_t * S(w_k, A_t, logp_t) + beta * K(logp_t, ref_t) * (w_k if bias-corrected else 1)

with w_k = exp(clamp(mean_{t in k} lr~_t, lo, hi)) the segment ratio (lr~ = lr, or GMPO's
sign-clipped log-ratio), rho_t a detached weight (off-policy mask, entropy mask, truncated
importance-sampling weight) on the policy term only, and loss = sum_t c_t l_t. Its gradient:

    g_s = (w_k kappa_k phi_s / n_k) sum_{t in k} c_t (rho_t dS_t/dw + beta dK_t/dw)
          + c_s (rho_s dS_s/dlogp_s + beta dK_s/dlogp_s)       (direct terms)

kappa_k = 1 where the segment log-ratio is inside the clamp (bounds included, as PyTorch's
clamp), phi_s = d lr~_s / d lr_s. With every option at its default the stages below run the
same operations, in the same order, as the plain stage (bitwise equal; tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import LOSS_TYPE_TABLE
from .segment_stage import ClipParams, clip_surrogate
from .segment_stage import _stats as plain_stats

# surrogate name -> what S is (docs/math.md section 7.1)
SURROGATES = ("clip", "cispo", "cispo_two_sided", "sapo", "vespo", "geo_mean")
# KL estimators; a trailing "+" keeps the value and takes the k2 gradient (verl's straight-through)
KL_BASE = ("k3", "k1", "kl", "k2", "mse", "abs", "low_var_kl")
KL_ESTIMATORS = KL_BASE + tuple(k + "+" for k in KL_BASE)
RATIO_GRADIENTS = ("segment", "token")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# verl's stabilising clamps of low_var_kl (core_algos.kl_penalty_forward): log-ratio, value
LOW_VAR_KL_LOG_CLAMP = 20.0
LOW_VAR_KL_VALUE_CLAMP = 10.0
# TRL's get_gamma_weights clamps (log-space): token log-ratio, and the sequence log-weight
VESPO_TOKEN_CLAMP = 20.0
VESPO_LOG_FLOOR = math.log(1e-8)


@dataclass(frozen=True)
class Variant:
    """The options of the segment stage beyond ClipParams (all defaults: the plain loss).

    surrogate: "clip" (PPO clip, with delta), "cispo" (-sg(min(w, epsilon_high)) A logp, TRL),
        "cispo_two_sided" (-sg(clip(w, 1-eps_low, 1+eps_high)) A logp, verl), "sapo" (soft
        sigmoid gate), "vespo" (-sg(phi) A logp with TRL's gamma weight phi), "geo_mean"
        (GMPO: -w A with w the geometric mean of sign-clipped token ratios, verl).
    kl_estimator: see KL_ESTIMATORS; use_bias_correction_kl multiplies KL by w (TRL).
    clip_ratio_c: verl's dual-clip bound (A < 0 only), clip surrogate only.
    log_ratio_clamp: (lo, hi) clamp of the segment log-ratio before exp (None: no clamp).
    ratio_gradient: "segment" (the gradient of w_k = exp(mean lr) reaches every token of the
        segment) or "token" (GSPO-token, verl's gspo: w_t = sg(w_k) exp(lr_t - sg(lr_t)), each
        token's term differentiates through its own log-prob only; same value).
    """

    surrogate: str = "clip"
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    clip_ratio_c: float | None = None
    log_ratio_clamp: tuple[float, float] | None = None
    ratio_gradient: str = "segment"

    def is_default(self) -> bool:
        return self == Variant()


DEFAULT = Variant()


def _pick(cond: torch.Tensor, a: float, b: float, like: torch.Tensor) -> torch.Tensor:
    """where(cond, a, b) with the scalars in like's dtype: torch.where on two Python floats
    builds a float32 tensor, rounding e.g. a temperature of 1.05 (TRL's sapo does; verl's not)."""
    return torch.where(cond, like.new_tensor(a), like.new_tensor(b))


def _segment_sum(values: torch.Tensor, key: torch.Tensor, num_keys: int) -> torch.Tensor:
    return values.new_zeros(num_keys).index_add_(0, key.reshape(-1), values.reshape(-1))


# ---------------------------------------------------------------- KL estimators

def kl_expression(estimator: str, logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate as an autograd expression (the oracle)."""
    base = estimator.rstrip("+")
    if base == "k3":
        r = ref - logp
        value = torch.exp(r) - r - 1
    elif base in ("k1", "kl"):
        value = logp - ref
    elif base == "abs":
        value = (logp - ref).abs()
    elif base in ("k2", "mse"):
        value = 0.5 * (logp - ref).square()
    elif base == "low_var_kl":
        r = torch.clamp(ref - logp, -LOW_VAR_KL_LOG_CLAMP, LOW_VAR_KL_LOG_CLAMP)
        value = torch.clamp(torch.exp(r) - r - 1, -LOW_VAR_KL_VALUE_CLAMP, LOW_VAR_KL_VALUE_CLAMP)
    else:
        raise ValueError(f"kl_estimator={estimator!r} is not one of {list(KL_ESTIMATORS)}")
    if estimator.endswith("+") and base not in ("k2", "mse"):
        st = 0.5 * (logp - ref).square()  # straight-through: the k2 gradient, this value
        value = st - st.detach() + value.detach()
    return value


def kl_closed(estimator: str, logp: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """(KL value, dKL/dlogp) per token in closed form; autograd's conventions at kinks
    (|x|' = 0 at 0, clamp passes the gradient at its bounds)."""
    base = estimator.rstrip("+")
    if base == "k3":
        r = ref - logp
        er = torch.exp(r)
        value, grad = er - r - 1, 1 - er
    elif base in ("k1", "kl"):
        value, grad = logp - ref, torch.ones_like(logp)
    elif base == "abs":
        d = logp - ref
        value, grad = d.abs(), torch.sign(d)
    elif base in ("k2", "mse"):
        d = logp - ref
        value, grad = 0.5 * d.square(), d
    elif base == "low_var_kl":
        r = ref - logp
        lim, vlim = LOW_VAR_KL_LOG_CLAMP, LOW_VAR_KL_VALUE_CLAMP
        rc = torch.clamp(r, -lim, lim)
        er = torch.exp(rc)
        k = er - rc - 1
        value = torch.clamp(k, -vlim, vlim)
        inside = ((r >= -lim) & (r <= lim) & (k >= -vlim) & (k <= vlim)).to(logp.dtype)
        grad = (1 - er) * inside
    else:
        raise ValueError(f"kl_estimator={estimator!r} is not one of {list(KL_ESTIMATORS)}")
    if estimator.endswith("+"):
        grad = logp - ref
    return value, grad


# ---------------------------------------------------------------- GMPO's token log-ratio

def gmpo_log_ratio_expression(lr: Tensor, adv: Tensor, epsilon_low: float,
                              epsilon_high: float) -> Tensor:
    """verl geo_mean: sgn(A) * min(sgn(A) lr, sgn(A) clamp(lr, -eps_low, eps_high))."""
    sgn = torch.sign(adv)
    lrc = torch.clamp(lr, -epsilon_low, epsilon_high)
    return sgn * torch.min(sgn * lr, sgn * lrc)


def gmpo_log_ratio_closed(lr: Tensor, adv: Tensor, epsilon_low: float,
                          epsilon_high: float) -> tuple[Tensor, Tensor]:
    """(lr~, d lr~/d lr): lr capped at eps_high where A > 0, floored at -eps_low where A < 0,
    0 where A == 0. A tie (lr inside the range) gives 1/2 + 1/2 = 1, as autograd."""
    sgn = torch.sign(adv)
    lrc = torch.clamp(lr, -epsilon_low, epsilon_high)
    a, b = sgn * lr, sgn * lrc
    pa = torch.where(a < b, 1.0, torch.where(a == b, 0.5, 0.0)).to(lr.dtype)
    din = ((lr >= -epsilon_low) & (lr <= epsilon_high)).to(lr.dtype)
    return sgn * torch.minimum(a, b), sgn * sgn * (pa + (1 - pa) * din)


# ---------------------------------------------------------------- surrogates

def surrogate_expression(v: Variant, p: ClipParams, w: Tensor, adv: Tensor, logp: Tensor,
                         phi: Tensor | None) -> Tensor:
    """S(w, A, logp) per token as an autograd expression. p: ClipParams."""
    lo, hi = 1 - p.epsilon_low, 1 + p.epsilon_high
    s = v.surrogate
    if s == "clip":
        w1 = w if p.delta is None else torch.clamp(w, max=p.delta)
        wc = torch.clamp(w, lo, hi)
        out = -torch.min(w1 * adv, wc * adv)
        if v.clip_ratio_c is not None:  # verl dual-clip: cap the loss of A < 0 at -A c
            out = torch.where(adv < 0, torch.min(-adv * v.clip_ratio_c, out), out)
        return out
    if s == "cispo":
        return -torch.clamp(w, max=p.epsilon_high).detach() * adv * logp
    if s == "cispo_two_sided":
        return -torch.clamp(w, lo, hi).detach() * adv * logp
    if s == "sapo":
        tau = _pick(adv > 0, v.sapo_temperature_pos, v.sapo_temperature_neg, w)
        return -torch.sigmoid(tau * (w - 1)) * 4 / tau * adv
    if s == "vespo":
        return -phi.detach() * adv * logp
    if s == "geo_mean":
        return -w * adv
    raise ValueError(f"surrogate={s!r} is not one of {list(SURROGATES)}")


def surrogate_closed(v: Variant, p: ClipParams, w: Tensor, adv: Tensor, logp: Tensor,
                     phi: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(S, dS/dw, dS/dlogp direct, or None when 0) per token, autograd's tie conventions."""
    lo, hi = 1 - p.epsilon_low, 1 + p.epsilon_high
    s = v.surrogate
    if s == "clip":
        value, dl_dw = clip_surrogate(w, adv, p)
        if v.clip_ratio_c is not None:
            cap = -adv * v.clip_ratio_c
            pv = torch.where(value < cap, 1.0, torch.where(value == cap, 0.5, 0.0)).to(w.dtype)
            neg = adv < 0
            value = torch.where(neg, torch.minimum(cap, value), value)
            dl_dw = torch.where(neg, pv * dl_dw, dl_dw)
        return value, dl_dw, None
    if s in ("cispo", "cispo_two_sided", "vespo"):
        if s == "cispo":
            f = torch.clamp(w, max=p.epsilon_high)
        elif s == "cispo_two_sided":
            f = torch.clamp(w, lo, hi)
        else:
            f = phi
        return -f * adv * logp, torch.zeros_like(w), -f * adv
    if s == "sapo":
        tau = _pick(adv > 0, v.sapo_temperature_pos, v.sapo_temperature_neg, w)
        sig = torch.sigmoid(tau * (w - 1))
        return -sig * 4 / tau * adv, -4 * sig * (1 - sig) * adv, None
    if s == "geo_mean":
        return -w * adv, -adv, None
    raise ValueError(f"surrogate={s!r} is not one of {list(SURROGATES)}")


# ---------------------------------------------------------------- the stage, both ways

def _stats(w, adv, kl, mask, p):
    return plain_stats(w, adv, kl, mask, p)


def reference_stage(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, adv: Tensor,
                    key: Tensor, num_keys: int, c: Tensor, mask: Tensor, p: ClipParams,
                    v: Variant = DEFAULT, rho: Tensor | None = None,
                    phi: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The general loss as an expression (autograd gives g). Returns (loss, stats)."""
    m = mask.to(logp.dtype)
    lr = torch.where(mask, logp - old_logp, 0)
    if v.surrogate == "geo_mean":
        lr = torch.where(mask, gmpo_log_ratio_expression(lr, adv, p.epsilon_low,
                                                         p.epsilon_high), 0)
    n = _segment_sum(m, key, num_keys).clamp(min=1)
    lam = _segment_sum(lr, key, num_keys) / n
    if v.ratio_gradient == "token":  # the value of lam, each token's own gradient
        lam = lam.detach()[key] + (lr - lr.detach())
    if v.log_ratio_clamp is not None:
        lam = torch.clamp(lam, *v.log_ratio_clamp)
    w = torch.exp(lam)
    if v.ratio_gradient != "token":
        w = w[key]
    per_token = surrogate_expression(v, p, w, adv, logp, phi)
    if rho is not None:
        per_token = per_token * rho
    kl = None
    if ref_logp is not None and p.beta != 0:
        kl = kl_expression(v.kl_estimator, logp, ref_logp)
        if v.use_bias_correction_kl:
            kl = kl * w
        per_token = per_token + p.beta * kl
    loss = (torch.where(mask, per_token, 0) * c).sum()
    return loss, _stats(w, adv, kl, mask, p)


def torch_stage(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, adv: Tensor,
                key: Tensor, num_keys: int, c: Tensor, mask: Tensor, p: ClipParams,
                v: Variant = DEFAULT, rho: Tensor | None = None,
                phi: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Closed form of the general loss: (loss, g = dloss/dlogp [B, T], stats). No autograd."""
    logp, old_logp = logp.detach(), old_logp.detach()
    m = mask.to(logp.dtype)
    lr = torch.where(mask, logp - old_logp, 0)
    dlr = None  # d lr~ / d lr, per token (GMPO only)
    if v.surrogate == "geo_mean":
        lr, dlr = gmpo_log_ratio_closed(lr, adv, p.epsilon_low, p.epsilon_high)
        lr = torch.where(mask, lr, 0)
    n = _segment_sum(m, key, num_keys).clamp(min=1)
    lam = _segment_sum(lr, key, num_keys) / n
    kappa = None  # 1 where the segment log-ratio is inside the clamp
    if v.log_ratio_clamp is not None:
        lo, hi = v.log_ratio_clamp
        kappa = ((lam >= lo) & (lam <= hi)).to(lam.dtype)
        lam = torch.clamp(lam, lo, hi)
    wk = torch.exp(lam)
    w = wk[key]
    per_token, dl_dw, direct = surrogate_closed(v, p, w, adv, logp, phi)
    if rho is not None:
        per_token = per_token * rho
        dl_dw = dl_dw * rho
        direct = None if direct is None else direct * rho
    kl = None
    if ref_logp is not None and p.beta != 0:
        kl, dkl = kl_closed(v.kl_estimator, logp, ref_logp.detach())
        if v.use_bias_correction_kl:
            dl_dw = dl_dw + p.beta * kl  # d(beta w K)/dw
            dkl = w * dkl
            kl = kl * w
        per_token = per_token + p.beta * kl
    q = torch.where(mask, c * dl_dw, 0)
    if v.ratio_gradient == "token":  # dw_t/dlogp_t = w_k kappa_k (own token only)
        g = (wk if kappa is None else wk * kappa)[key] * q
    else:
        scale = wk / n if kappa is None else wk * kappa / n
        g = scale[key] * _segment_sum(q, key, num_keys)[key]
    if dlr is not None:
        g = g * dlr
    if direct is not None:
        g = g + c * direct
    if kl is not None:  # same operation order as the plain stage: c * beta * dK
        g = g + c * p.beta * dkl
    g = torch.where(mask, g, 0)
    loss = (torch.where(mask, per_token, 0) * c).sum()
    return loss, g, _stats(w, adv, kl, mask, p)


# ---------------------------------------------------------------- detached weights

def off_policy_mask(adv: Tensor, logp: Tensor, sampling_logp: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL get_off_policy_mask), per token [B, T]:
    keep a token unless A_t < 0 and its row's mean (sampling_logp - logp) exceeds threshold.
    Unscorable (NaN) sampling log-probs count as no divergence. Detached, dtype of logp."""
    div = torch.nan_to_num(sampling_logp.detach() - logp.detach(), nan=0.0)
    m = mask.to(logp.dtype)
    row = (div * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    return ((adv >= 0) | (row <= threshold)).to(logp.dtype)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation, also for inputs over its 2^24-element limit."""
    if values.numel() <= 2 ** 24:
        return torch.quantile(values, q)
    s = values.sort().values
    pos = q * (s.numel() - 1)
    i = min(int(math.floor(pos)), s.numel() - 1)
    j = min(i + 1, s.numel() - 1)
    return torch.lerp(s[i], s[j], pos - i)


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_quantile: float) -> Tensor:
    """TRL's top_entropy_quantile mask (get_high_entropy_mask), local to this batch: keep the
    masked tokens whose entropy is >= the (1 - top_quantile) quantile of the masked entropies.
    Detached bool [B, T]; all False when no token is masked in. The quantile is taken in
    float32 whatever the input dtype, as TRL does: its interpolation position is then
    computed in float32 too, which decides ties like (n - 1) q integral exactly as TRL."""
    e = entropy.detach()
    vals = e[mask].float()
    if vals.numel() == 0:
        return torch.zeros_like(mask)
    thr = quantile(vals, 1.0 - top_quantile)
    return (torch.where(mask, e, 0) >= thr) & mask


def sampling_is_ratio(old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, mode: str,
                      clip_min: float | None, clip_max: float | None) -> Tensor:
    """Truncated/masked importance weight of the trainer's (old) policy over the sampler's
    (vLLM) policy, TRL's vllm_importance_sampling_mode: token_* modes per token, sequence_*
    per row (the exp of the row's sum of log-ratios); *_truncate clamps to [clip_min,
    clip_max], *_mask zeroes ratios outside. NaN sampling log-probs give ratio 1. Detached."""
    if mode not in IS_MODES:
        raise ValueError(f"importance_sampling_mode={mode!r} is not one of {list(IS_MODES)}")
    m = mask.to(old_logp.dtype)
    diff = torch.nan_to_num((old_logp.detach() - sampling_logp.detach()) * m, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        lo = -math.inf if clip_min is None else clip_min
        hi = math.inf if clip_max is None else clip_max
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    return ratio.expand_as(old_logp)


def gamma_weights(adv: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor,
                  is_ratio: Tensor | None, k_pos: float = 2.0, lambda_pos: float = 3.0,
                  k_neg: float = 3.0, lambda_neg: float = 2.0) -> Tensor:
    """VESPO's gamma weight phi(w) = exp(lam + k log w - lam w) (TRL get_gamma_weights) with w
    the row's sequence ratio exp(sum_t clamp(lr_t, -20, 20)) (times the token IS ratios), its
    log clamped to [log 1e-8, 20]; (k, lam) by the sign of A_t. Detached [B, T]."""
    m = mask.to(logp.dtype)
    lr = torch.clamp(logp.detach() - old_logp.detach(), -VESPO_TOKEN_CLAMP, VESPO_TOKEN_CLAMP)
    seq = (lr * m).sum(1, keepdim=True)
    if is_ratio is not None:
        log_is = torch.clamp(torch.log(is_ratio), VESPO_LOG_FLOOR, VESPO_TOKEN_CLAMP)
        seq = seq + (log_is * m).sum(1, keepdim=True)
    log_w = torch.clamp(seq, VESPO_LOG_FLOOR, VESPO_TOKEN_CLAMP)
    nonneg = adv >= 0
    k = _pick(nonneg, k_pos, k_neg, logp)
    lam = _pick(nonneg, lambda_pos, lambda_neg, logp).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


# ---------------------------------------------------------------- keywords -> options

# loss_type -> (aggregation, default surrogate) is contract.LOSS_TYPE_TABLE (imported above).
# options only the plain stage of the native op library implements (the rest raise there)
NATIVE_UNSUPPORTED = ("surrogate", "kl_estimator", "use_bias_correction_kl", "clip_ratio_c",
                      "log_ratio_clamp", "ratio_gradient", "off_policy_mask_threshold",
                      "top_entropy_quantile", "importance_sampling_mode", "importance_weights")


def make_variant(loss_type: str, *, surrogate: str | None = None, kl_estimator: str = "k3",
                 use_bias_correction_kl: bool = False, sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, clip_ratio_c: float | None = None,
                 log_ratio_clamp: float | tuple | None = None,
                 ratio_gradient: str = "segment", delta: float | None = None) -> Variant:
    """Validate the variant keywords of rank_grpo_loss and build the stage's Variant."""
    if loss_type not in LOSS_TYPE_TABLE:
        raise ValueError(f"loss_type={loss_type!r} is not one of {list(LOSS_TYPE_TABLE)}")
    if surrogate is None:
        surrogate = LOSS_TYPE_TABLE[loss_type][1]
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate={surrogate!r} is not one of {list(SURROGATES)}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r} is not one of {list(KL_ESTIMATORS)}")
    for name, t in (("sapo_temperature_pos", sapo_temperature_pos),
                    ("sapo_temperature_neg", sapo_temperature_neg)):
        if not (isinstance(t, (int, float)) and t > 0):
            raise ValueError(f"{name} must be a number > 0, got {t!r}")
    if clip_ratio_c is not None:
        if surrogate != "clip":
            raise ValueError(f"clip_ratio_c (verl's dual clip) applies to surrogate='clip' only, "
                             f"got surrogate={surrogate!r}")
        if delta is not None:
            raise ValueError("pass either delta (TRL's two-sided clip) or clip_ratio_c (verl's "
                             "dual clip, A < 0 only), not both")
        if not clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
        clip_ratio_c = float(clip_ratio_c)
    clamp = None
    if log_ratio_clamp is not None:
        if isinstance(log_ratio_clamp, (int, float)):
            clamp = (-float(log_ratio_clamp), float(log_ratio_clamp))
        elif isinstance(log_ratio_clamp, (tuple, list)) and len(log_ratio_clamp) == 2:
            lo, hi = log_ratio_clamp
            clamp = (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
        else:
            raise ValueError("log_ratio_clamp must be a number c (clamp to [-c, c]) or a pair "
                             f"(lo, hi) with None for no bound, got {log_ratio_clamp!r}")
        if not clamp[0] <= clamp[1]:
            raise ValueError(f"log_ratio_clamp needs lo <= hi, got {log_ratio_clamp!r}")
    if ratio_gradient not in RATIO_GRADIENTS:
        raise ValueError(f"ratio_gradient={ratio_gradient!r} is not one of "
                         f"{list(RATIO_GRADIENTS)}")
    return Variant(surrogate=surrogate, kl_estimator=kl_estimator, ratio_gradient=ratio_gradient,
                   use_bias_correction_kl=bool(use_bias_correction_kl),
                   sapo_temperature_pos=float(sapo_temperature_pos),
                   sapo_temperature_neg=float(sapo_temperature_neg),
                   clip_ratio_c=clip_ratio_c, log_ratio_clamp=clamp)


def detached_weights(surrogate: str, logp: Tensor, old_logp: Tensor, adv: Tensor,
                     mask: Tensor, *, sampling_logp: Tensor | None = None,
                     entropy: Tensor | None = None,
                     off_policy_mask_threshold: float | None = None,
                     top_entropy_quantile: float = 1.0,
                     importance_sampling_mode: str | None = None,
                     importance_sampling_clip_min: float | None = None,
                     importance_sampling_clip_max: float | None = 3.0,
                     vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                     vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                     importance_weights: Tensor | None = None,
                     ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The detached per-token weights of the policy term, from canonical [B, T] inputs.

    Returns (rho or None, phi or None, entropy_mask or None): rho = off-policy mask x
    entropy mask x sampler importance weight (the last not for vespo, whose phi holds it),
    phi = VESPO's gamma weight (surrogate "vespo" only). The sampler weight is computed from
    sampling_logp (importance_sampling_mode) or given as importance_weights [B, T] / [B, 1]
    (verl's rollout_is_weights, TRL's inputs["importance_sampling_ratio"]).
    """
    rho = None

    def times(a, b):
        return b if a is None else a * b

    if off_policy_mask_threshold is not None:
        if not isinstance(off_policy_mask_threshold, (int, float)):
            raise ValueError("off_policy_mask_threshold must be a number (or None), got "
                             f"{off_policy_mask_threshold!r}")
        source = old_logp if sampling_logp is None else sampling_logp
        rho = off_policy_mask(adv, logp, source, mask, float(off_policy_mask_threshold))
    ent_mask = None
    if not (isinstance(top_entropy_quantile, (int, float)) and 0 < top_entropy_quantile <= 1):
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile!r}")
    if top_entropy_quantile < 1:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs the per-token entropy: pass "
                             "entropy= (fused_linear_rank_grpo_loss does, unless "
                             "compute_entropy=False)")
        ent_mask = high_entropy_mask(entropy, mask, float(top_entropy_quantile))
        rho = times(rho, ent_mask.to(logp.dtype))
    is_ratio = None
    if importance_weights is not None:
        if importance_sampling_mode is not None:
            raise ValueError("pass either importance_weights (precomputed) or "
                             "importance_sampling_mode (computed from sampling_logp), not both")
        is_ratio = importance_weights.detach().to(logp.dtype).expand_as(logp)
        if surrogate != "vespo":
            rho = times(rho, is_ratio)
    if importance_sampling_mode is not None:
        if sampling_logp is None:
            raise ValueError(f"importance_sampling_mode={importance_sampling_mode!r} needs "
                             "sampling_logp (the sampler's per-token log-probs)")
        lo, hi = importance_sampling_clip_min, importance_sampling_clip_max
        if lo is not None and hi is not None and not lo <= hi:
            raise ValueError(f"importance_sampling_clip_min ({lo}) must be <= "
                             f"importance_sampling_clip_max ({hi})")
        if surrogate == "vespo" and importance_sampling_mode.startswith("sequence"):
            raise ValueError("surrogate 'vespo' takes token-level sampler weights only: "
                             "importance_sampling_mode must be 'token_truncate' or 'token_mask', "
                             f"got {importance_sampling_mode!r}")
        is_ratio = sampling_is_ratio(old_logp, sampling_logp, mask, importance_sampling_mode,
                                     lo, hi)
        if surrogate != "vespo":
            rho = times(rho, is_ratio)
    phi = None
    if surrogate == "vespo":
        phi = gamma_weights(adv, logp, old_logp, mask, is_ratio, vespo_k_pos, vespo_lambda_pos,
                            vespo_k_neg, vespo_lambda_neg)
    return rho, phi, ent_mask


def entropy_bonus(entropy: Tensor, mask: Tensor, entropy_mask: Tensor | None = None) -> Tensor:
    """Mean entropy over the tokens the policy term acts on (mask, and the entropy mask when
    top_entropy_quantile < 1), differentiable: the loss subtracts entropy_coef times it."""
    eff = mask if entropy_mask is None else mask & entropy_mask
    e = torch.where(eff, entropy, 0)
    return e.sum() / eff.sum().clamp(min=1)
