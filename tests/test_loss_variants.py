"""Loss variants (docs/math.md section 7.1): the closed form (variants.torch_stage) against
autograd of the expression (variants.reference_stage) in float64 on fresh random inputs, ties
at every kink, defaults bitwise equal to the plain stage, the per-token pieces against
autograd, and parity with TRL 1.16's and verl 0.9.1's own code where it can be called."""

from __future__ import annotations

import math

import pytest
import torch

from rankgrpo_kernels import LEVELS, LOSS_TYPE_TABLE, LOSS_TYPES, segment_stage, variants
from rankgrpo_kernels.segment_stage import ClipParams
from rankgrpo_kernels.variants import Variant

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-10)


def canon(rng, level, *, B=4, T=13, S=3, ratio_noise=0.15, pad=True):
    """Canonical stage inputs (what loss.prepare hands the stage): keys of the level's
    segments, per-token advantages constant per rank segment (the overflow bin S gets 0),
    arbitrary positive aggregation weights c (the closed form must hold for any c)."""
    lengths = torch.randint(1, T + 1, (B,), generator=rng) if pad else torch.full((B,), T)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    steps = (torch.rand(B, T, generator=rng) < 0.3).long()
    seg = torch.cumsum(steps, 1).clamp(max=S)
    seg = torch.where(mask, seg, -1)
    rows = torch.arange(B).unsqueeze(1)
    cols = torch.arange(T).unsqueeze(0).expand(B, T)
    ids = {"token": cols, "sequence": torch.zeros_like(cols), "rank": seg.clamp(min=0)}[level]
    width = {"token": T, "sequence": 1, "rank": S + 1}[level]
    key = torch.where(mask, rows * width + ids, 0)
    adv_rank = torch.randn(B, S + 1, generator=rng, dtype=F64)
    adv_rank[:, S] = 0.0
    adv = torch.where(mask, adv_rank.gather(1, seg.clamp(min=0)), 0)
    logp = -torch.rand(B, T, generator=rng, dtype=F64) * 3
    old = logp + ratio_noise * torch.randn(B, T, generator=rng, dtype=F64)
    ref = logp + 0.3 * torch.randn(B, T, generator=rng, dtype=F64)
    c = torch.where(mask, torch.rand(B, T, generator=rng, dtype=F64) + 0.1, 0)
    logp, old, ref = (torch.where(mask, x, 0) for x in (logp, old, ref))
    return dict(logp=logp, old=old, ref=ref, adv=adv, key=key, num_keys=B * width, c=c,
                mask=mask)


def run_both(x, p, v, rho=None, phi=None):
    """(loss, g) of the closed form and of autograd on the expression."""
    args = (x["old"], x["ref"], x["adv"], x["key"], x["num_keys"], x["c"], x["mask"], p)
    loss_c, g_c, stats_c = variants.torch_stage(x["logp"], *args, v, rho, phi)
    lp = x["logp"].clone().requires_grad_(True)
    loss_r, stats_r = variants.reference_stage(lp, *args, v, rho, phi)
    (g_r,) = torch.autograd.grad(loss_r, lp)
    torch.testing.assert_close(stats_c, stats_r.detach(), rtol=0, atol=1e-12)
    return (loss_c, g_c), (loss_r.detach(), g_r)


def assert_match(x, p, v, rho=None, phi=None):
    (lc, gc), (lr, gr) = run_both(x, p, v, rho, phi)
    torch.testing.assert_close(lc, lr, **TOL)
    torch.testing.assert_close(gc, gr, **TOL)
    return max(float((lc - lr).abs()), float((gc - gr).abs().max()))


def random_weights(rng, x):
    rho = torch.rand(x["logp"].shape, generator=rng, dtype=F64) * 2
    rho = torch.where(torch.rand(rho.shape, generator=rng) < 0.2, 0.0, rho)
    phi = torch.rand(x["logp"].shape, generator=rng, dtype=F64) * 1.5
    return rho, phi


# ------------------------------------------------------------- per-token pieces vs autograd

@pytest.mark.parametrize("estimator", variants.KL_ESTIMATORS)
def test_kl_closed_form_matches_autograd(rng, estimator):
    logp = -torch.rand(200, generator=rng, dtype=F64) * 4
    ref = logp + 2 * torch.randn(200, generator=rng, dtype=F64)
    # kinks: equal log-probs (|x|' = 0), low_var_kl's clamps hit exactly and beyond
    ref[:3] = logp[:3]
    logp[3:6] = torch.tensor([-0.5, -0.5, -1.0], dtype=F64)
    ref[3:6] = torch.tensor([19.5, 25.0, -40.0], dtype=F64)  # r = 20 exactly, > 20, < -20
    lp = logp.clone().requires_grad_(True)
    value = variants.kl_expression(estimator, lp, ref)
    (g,) = torch.autograd.grad(value.sum(), lp)
    v_c, g_c = variants.kl_closed(estimator, logp, ref)
    torch.testing.assert_close(v_c, value.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(g_c, g, rtol=0, atol=1e-12)


def test_kl_estimator_values():
    """Definitions written out: k1 = logp - ref, k2 = (logp - ref)^2 / 2, abs, k3."""
    logp = torch.tensor([-1.0, -2.0], dtype=F64)
    ref = torch.tensor([-1.5, -1.0], dtype=F64)
    d = logp - ref  # [0.5, -1.0]
    expect = {"k1": d, "k2": 0.5 * d * d, "abs": d.abs(),
              "k3": torch.exp(-d) + d - 1, "low_var_kl": torch.exp(-d) + d - 1}
    for name, e in expect.items():
        torch.testing.assert_close(variants.kl_closed(name, logp, ref)[0], e, rtol=0, atol=0)


def test_gmpo_log_ratio_matches_autograd(rng):
    lr = 0.5 * torch.randn(300, generator=rng, dtype=F64)
    adv = torch.randn(300, generator=rng, dtype=F64)
    adv[:20] = 0.0
    lr[20:24] = torch.tensor([0.2, -0.1, 0.2, -0.1], dtype=F64)  # exactly on the bounds
    adv[20:24] = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64)
    x = lr.clone().requires_grad_(True)
    y = variants.gmpo_log_ratio_expression(x, adv, 0.1, 0.2)
    (g,) = torch.autograd.grad(y.sum(), x)
    y_c, g_c = variants.gmpo_log_ratio_closed(lr, adv, 0.1, 0.2)
    torch.testing.assert_close(y_c, y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(g_c, g, rtol=0, atol=0)


# ------------------------------------------------------------- the stage: closed form vs autograd

def configs():
    """(surrogate, ClipParams kwargs, Variant kwargs, use rho) covering every option."""
    out = []
    for est in ("k3", "k1", "k2", "abs", "low_var_kl", "k3+", "low_var_kl+"):
        for bias in (False, True):
            out.append(("clip", {"beta": 0.04}, {"kl_estimator": est,
                                                 "use_bias_correction_kl": bias}, False))
    out += [
        ("clip", {"delta": 1.3}, {}, True),
        ("clip", {}, {"clip_ratio_c": 1.25}, True),
        ("clip", {"beta": 0.1}, {"log_ratio_clamp": (-0.05, 0.05)}, True),
        ("clip", {"beta": 0.1}, {"log_ratio_clamp": (-20.0, 20.0),
                                 "use_bias_correction_kl": True}, False),
        ("cispo", {"epsilon_high": 1.05, "beta": 0.1}, {"use_bias_correction_kl": True}, True),
        ("cispo", {"epsilon_high": 5.0}, {}, False),
        ("cispo_two_sided", {"beta": 0.1}, {"kl_estimator": "low_var_kl"}, True),
        ("sapo", {}, {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}, False),
        ("sapo", {"beta": 0.1}, {"sapo_temperature_pos": 3.0, "sapo_temperature_neg": 0.5,
                                 "use_bias_correction_kl": True}, True),
        ("vespo", {"beta": 0.1}, {"use_bias_correction_kl": True}, True),
        ("vespo", {}, {}, False),
        ("geo_mean", {"epsilon_low": 0.1, "epsilon_high": 0.1}, {}, False),
        ("geo_mean", {"epsilon_low": 0.05, "epsilon_high": 0.08}, {"ratio_gradient": "token"},
         True),
        ("clip", {"beta": 0.1, "delta": 1.2}, {"ratio_gradient": "token",
                                               "use_bias_correction_kl": True,
                                               "log_ratio_clamp": (-0.05, 0.05)}, True),
        ("sapo", {}, {"ratio_gradient": "token"}, True),
        ("geo_mean", {"epsilon_low": 0.05, "epsilon_high": 0.08, "beta": 0.1},
         {"log_ratio_clamp": (-0.02, 0.03), "kl_estimator": "k1"}, True),
    ]
    return out


CONFIGS = configs()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", range(len(CONFIGS)),
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CONFIGS)])
def test_stage_closed_form_matches_reference(rng, level, case):
    surrogate, pk, vk, use_rho = CONFIGS[case]
    params = dict(epsilon_low=0.06, epsilon_high=0.08, delta=None, beta=0.0) | pk
    p = ClipParams(**params)
    v = Variant(surrogate=surrogate, **vk)
    for ratio_noise in (0.02, 0.3):  # mostly inside the clip range, then mostly outside
        x = canon(rng, level, ratio_noise=ratio_noise)
        rho, phi = random_weights(rng, x)
        assert_match(x, p, v, rho if use_rho else None, phi if surrogate == "vespo" else None)


@pytest.mark.parametrize("level", LEVELS)
def test_defaults_bitwise_equal_plain_stage(rng, level):
    x = canon(rng, level)
    for beta in (0.0, 0.04):
        for delta in (None, 1.2):
            p = ClipParams(0.06, 0.08, delta, beta)
            args = (x["old"], x["ref"], x["adv"], x["key"], x["num_keys"], x["c"], x["mask"], p)
            plain = segment_stage.torch_stage(x["logp"], *args)
            general = variants.torch_stage(x["logp"], *args, Variant())
            for a, b in zip(plain, general):
                assert torch.equal(a, b)
            lp1 = x["logp"].clone().requires_grad_(True)
            lp2 = x["logp"].clone().requires_grad_(True)
            l1, s1 = segment_stage.reference_stage(lp1, *args)
            l2, s2 = variants.reference_stage(lp2, *args, Variant())
            assert torch.equal(l1, l2) and torch.equal(s1, s2)
            assert torch.equal(torch.autograd.grad(l1, lp1)[0], torch.autograd.grad(l2, lp2)[0])


# ------------------------------------------------------------- ties at the kinks

def tie_inputs(rng, level="token"):
    x = canon(rng, level, ratio_noise=0.1, pad=False)
    lr = x["logp"] - x["old"]
    return x, torch.exp(lr)  # token level: the stage's w is exactly exp(lr) (n = 1)


def test_ties_clip_bounds_delta_and_dual_clip(rng):
    x, w = tie_inputs(rng)
    adv = x["adv"]
    # hi_tok: the smallest ratio in (1, 2), so that other tokens lie above 1 + eps_high for
    # the delta and dual-clip ties (the first such token was the largest for ~1 seed in 30)
    upper = (w > 1) & (w < 2)
    assert int(upper.sum()) >= 2, "tie_inputs drew fewer than two ratios in (1, 2)"
    hi_tok = (torch.where(upper, w, torch.inf) == torch.where(upper, w, torch.inf).min()
              ).nonzero()[0]
    lo_tok = ((w < 1) & (w > 0.5)).nonzero()[0]
    # 1 + (w - 1) == w exactly for w in [1, 2), 1 - (1 - w) == w for w in [0.5, 1] (Sterbenz)
    eps_high = float(w[tuple(hi_tok)] - 1)
    eps_low = float(1 - w[tuple(lo_tok)])
    for sign in (1.0, -1.0, 0.0):
        x["adv"] = adv.clone()
        x["adv"][tuple(hi_tok)] = sign
        x["adv"][tuple(lo_tok)] = -sign
        assert_match(x, ClipParams(eps_low, eps_high, None, 0.0), Variant())
        # delta tie: w == delta on a token above 1 + eps_high
        big = (w > 1 + eps_high).nonzero()[0]
        assert_match(x, ClipParams(eps_low, eps_high, float(w[tuple(big)]), 0.0), Variant())
        # dual clip tie: w == clip_ratio_c with A < 0
        x["adv"][tuple(big)] = -abs(sign) if sign else 0.0
        v = Variant(clip_ratio_c=float(w[tuple(big)]))
        assert_match(x, ClipParams(eps_low, eps_high, None, 0.0), v)
        assert_match(x, ClipParams(eps_low, eps_high, None, 0.0),
                     Variant(surrogate="cispo_two_sided"))
        assert_match(x, ClipParams(eps_low, float(w[tuple(hi_tok)]), None, 0.0),
                     Variant(surrogate="cispo"))


@pytest.mark.parametrize("level", LEVELS)
def test_ties_log_ratio_clamp_and_gmpo_bounds(rng, level):
    x = canon(rng, level, ratio_noise=0.1, pad=False)
    m = x["mask"].to(F64)
    lr = torch.where(x["mask"], x["logp"] - x["old"], 0)
    n = variants._segment_sum(m, x["key"], x["num_keys"]).clamp(min=1)
    lam = variants._segment_sum(lr, x["key"], x["num_keys"]) / n
    lo, hi = float(lam.min()), float(lam.max())  # the clamp bounds hit two segments exactly
    p = ClipParams(0.06, 0.08, None, 0.1)
    assert_match(x, p, Variant(log_ratio_clamp=(lo, hi), use_bias_correction_kl=True))
    assert_match(x, p, Variant(log_ratio_clamp=(lo, hi), ratio_gradient="token"))
    # GMPO: a token log-ratio exactly on eps_high with A > 0, another on -eps_low with A < 0
    t_hi = (lr > 0).nonzero()[0]
    t_lo = (lr < 0).nonzero()[0]
    x["adv"][tuple(t_hi)], x["adv"][tuple(t_lo)] = 1.0, -1.0
    p = ClipParams(float(-lr[tuple(t_lo)]), float(lr[tuple(t_hi)]), None, 0.0)
    assert_match(x, p, Variant(surrogate="geo_mean"))


# ------------------------------------------------------------- detached weight builders

def test_sampling_is_ratio_modes(rng):
    B, T = 3, 6
    old = -torch.rand(B, T, generator=rng, dtype=F64)
    samp = old + 0.8 * torch.randn(B, T, generator=rng, dtype=F64)
    samp[0, 1] = float("nan")
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 4:] = False
    r = variants.sampling_is_ratio(old, samp, mask, "token_truncate", None, 1.5)
    d = torch.nan_to_num((old - samp) * mask, nan=0.0)
    torch.testing.assert_close(r, torch.exp(d).clamp(max=1.5), rtol=0, atol=0)
    assert r[0, 1] == 1.0
    r = variants.sampling_is_ratio(old, samp, mask, "sequence_mask", 0.5, 2.0)
    s = torch.exp(d.sum(1, keepdim=True))
    torch.testing.assert_close(r, torch.where((s < 0.5) | (s > 2.0), 0.0, s).expand(B, T),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="importance_sampling_mode"):
        variants.sampling_is_ratio(old, samp, mask, "token", None, 2.0)


def test_high_entropy_mask_quantile():
    e = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.7, 0.2, 5.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    # masked values sorted: 0.1 0.2 0.3 0.5 0.7 0.9; the 0.5 quantile = (0.3 + 0.5) / 2 = 0.4
    got = variants.high_entropy_mask(e, mask, 0.5)
    assert got.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert variants.high_entropy_mask(e, torch.zeros_like(mask), 0.5).sum() == 0


# ------------------------------------------------------------- the public API: every backend

def api_batch(rng, *, B=4, T=13, num_ranks=3, ratio_noise=0.15):
    """Inputs for rank_grpo_loss: per-rank advantages with an EOS mask, sampler log-probs,
    entropies (float32-representable, so TRL's float32 quantile sees the same values)."""
    x = canon(rng, "rank", B=B, T=T, S=num_ranks, ratio_noise=ratio_noise)
    seg = torch.where(x["mask"], torch.cumsum((torch.rand(B, T, generator=rng) < 0.3).long(),
                                              1).clamp(max=num_ranks), -1)
    eos = torch.zeros(B, T, dtype=torch.bool)
    eos[0, T - 1] = True
    samp = x["old"] + 0.2 * torch.randn(B, T, generator=rng, dtype=F64)
    ent = (torch.rand(B, T, generator=rng, dtype=F64) * 3).float().double()
    return dict(logp=x["logp"], old=x["old"], ref=x["ref"], mask=x["mask"], seg=seg, eos=eos,
                adv_rank=torch.randn(B, num_ranks, generator=rng, dtype=F64),
                adv_row=torch.randn(B, generator=rng, dtype=F64), samp=samp, ent=ent)


def api_loss(b, backend, adv="rank", **kw):
    """Loss and gradients (logp, entropy) of rank_grpo_loss for one backend."""
    from rankgrpo_kernels import rank_grpo_loss

    lp = b["logp"].clone().requires_grad_(True)
    ent = b["ent"].clone().requires_grad_(True)
    a = b["adv_rank"] if adv == "rank" else b["adv_row"]
    loss, metrics = rank_grpo_loss(lp, b["old"], a, b["seg"], b["mask"], ref_logp=b["ref"],
                                   eos_mask=b["eos"], entropy=ent, backend=backend, **kw)
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    return loss.detach(), g_lp, (torch.zeros_like(ent) if g_ent is None else g_ent), metrics


API_OPTIONS = [
    dict(beta=0.05, use_bias_correction_kl=True),
    dict(beta=0.05, kl_estimator="low_var_kl", delta=1.2),
    dict(beta=0.05, kl_estimator="k2", clip_ratio_c=1.15, log_ratio_clamp=20.0),
    dict(off_policy_mask_threshold=0.01, sampling_logp="samp"),
    dict(top_entropy_quantile=0.5, entropy_coef=0.03),
    dict(entropy_coef=0.01, beta=0.02, kl_estimator="abs"),
    dict(sampling_logp="samp", importance_sampling_mode="token_truncate",
         importance_sampling_clip_max=1.1),
    dict(sampling_logp="samp", importance_sampling_mode="sequence_mask",
         importance_sampling_clip_max=1.3, importance_sampling_clip_min=0.7),
    dict(surrogate="geo_mean", epsilon_low=0.05, epsilon_high=0.05, beta=0.05,
         kl_estimator="k1"),
    dict(ratio_gradient="token", log_ratio_clamp=(None, 10.0), beta=0.05,
         use_bias_correction_kl=True, sampling_logp="samp",
         importance_sampling_mode="token_truncate"),
    dict(surrogate="cispo_two_sided", sampling_logp="samp",
         importance_sampling_mode="token_mask", importance_sampling_clip_max=1.2),
]


def _resolve(b, kw):
    return {k: (b[v] if isinstance(v, str) and v in ("samp",) else v) for k, v in kw.items()}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_api_torch_matches_reference(rng, level, loss_type):
    """Every option through the public API: closed form (torch) vs autograd (reference),
    loss and the gradients w.r.t. logp and entropy to 1e-10 in float64."""
    b = api_batch(rng)
    for kw in API_OPTIONS:
        kw = _resolve(b, kw)
        if loss_type == "cispo":
            kw["epsilon_high"] = 1.05
        if LOSS_TYPE_TABLE[loss_type][1] != "clip" and ("surrogate" in kw
                                                         or "clip_ratio_c" in kw):
            continue  # the loss type picks the surrogate; clip_ratio_c is clip's
        if loss_type == "vespo" and kw.get("importance_sampling_mode", "").startswith("seq"):
            with pytest.raises(ValueError, match="importance_sampling_mode"):
                api_loss(b, "torch", level=level, loss_type=loss_type, **kw)
            continue
        lt, gt, et, mt = api_loss(b, "torch", level=level, loss_type=loss_type, **kw)
        lr, gr, er, mr = api_loss(b, "reference", level=level, loss_type=loss_type, **kw)
        torch.testing.assert_close(lt, lr, **TOL)
        torch.testing.assert_close(gt, gr, **TOL)
        torch.testing.assert_close(et, er, **TOL)
        for k in mt:
            torch.testing.assert_close(mt[k], mr[k], rtol=0, atol=1e-12)


def test_api_defaults_unchanged_and_native_refuses_variants(rng):
    from rankgrpo_kernels import backends

    b = api_batch(rng)
    plain = api_loss(b, "torch", beta=0.04, delta=1.3)
    explicit = api_loss(b, "torch", beta=0.04, delta=1.3, kl_estimator="k3",
                        use_bias_correction_kl=False, top_entropy_quantile=1.0,
                        entropy_coef=0.0, surrogate="clip")
    for a, c in zip(plain[:3], explicit[:3]):
        assert torch.equal(a, c)
    assert not plain[2].abs().any()  # no entropy gradient without the bonus
    if backends.native_available():
        for kw, name in ((dict(kl_estimator="k1", beta=0.1), "kl_estimator"),
                         (dict(loss_type="sapo"), "surrogate"),
                         (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
                         (dict(use_bias_correction_kl=True, beta=0.1), "use_bias_correction_kl")):
            with pytest.raises(ValueError, match=f"{name}.*backend='torch'"):
                api_loss(b, "native", **kw)
        # aggregation-only loss types and the entropy bonus leave the stage plain: native runs
        for kw in (dict(loss_type="luspo", entropy_coef=0.1), dict(loss_type="dapo")):
            got, want = api_loss(b, "native", **kw), api_loss(b, "torch", **kw)
            for a, c in zip(got[:3], want[:3]):
                torch.testing.assert_close(a, c, rtol=0, atol=1e-12)


def test_api_errors_name_the_option(rng):
    b = api_batch(rng)
    cases = [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(surrogate="ppo"), "surrogate"),
        (dict(kl_estimator="k4", beta=0.1), "kl_estimator"),
        (dict(importance_sampling_mode="token_truncate"), "sampling_logp"),
        (dict(sampling_logp=b["samp"], importance_sampling_mode="tok"),
         "importance_sampling_mode"),
        (dict(top_entropy_quantile=0.0), "top_entropy_quantile"),
        (dict(clip_ratio_c=0.9), "clip_ratio_c"),
        (dict(clip_ratio_c=3.0, delta=2.0), "clip_ratio_c"),
        (dict(log_ratio_clamp=(1.0, -1.0)), "log_ratio_clamp"),
        (dict(sapo_temperature_neg=0.0, loss_type="sapo"), "sapo_temperature_neg"),
        (dict(ratio_gradient="row"), "ratio_gradient"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            api_loss(b, "torch", **kw)
    from rankgrpo_kernels import rank_grpo_loss

    for kw, name in ((dict(entropy_coef=0.1), "entropy"),
                     (dict(top_entropy_quantile=0.5), "entropy")):
        with pytest.raises(ValueError, match=name):
            rank_grpo_loss(b["logp"], b["old"], b["adv_row"], None, b["mask"], level="sequence",
                           **kw)


def test_fused_entropy_bonus_and_mask_every_backend(rng):
    """The entropy bonus and top-entropy mask on the fused pass's entropy: the torch and
    triton phase-1 backends propagate the entropy gradient to hidden/weight like autograd."""
    from _factory import make_batch, run_fused

    from rankgrpo_kernels import backends

    batch = make_batch(rng)
    kw = dict(level="rank", loss_type="grpo", beta=0.02, use_bias_correction_kl=True,
              top_entropy_quantile=0.6, entropy_coef=0.05, eos_mask=None)
    kw["eos_mask"] = torch.zeros_like(batch["mask"])
    ref = run_fused(batch, "reference", **kw)
    names = ["torch"] + (["triton"] if backends.triton_available() else [])
    for name in names:
        out = run_fused(batch, name, **kw)
        for k in ("loss", "dhidden", "dweight"):
            torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-9)


# ------------------------------------------------------------- parity with TRL 1.16's own code

class _OneProcess:
    """accelerate's Accelerator for one process: every collective is the identity."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def trl_compute_loss(b, *, level, loss_type, beta=0.0, epsilon=0.2, epsilon_high=None,
                     delta=None, use_bias_correction_kl=False, top_entropy_quantile=1.0,
                     entropy_coef=0.0, off_policy_mask_threshold=None, is_mode=None,
                     is_clip_min=None, is_clip_max=3.0, sapo=(1.0, 1.25),
                     vespo=(2.0, 3.0, 3.0, 2.0)):
    """TRL's own GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py line 3020), run on a
    stand-in trainer whose model forward returns our log-probs and entropies: (loss,
    dloss/dlogp, dloss/dentropy). The vLLM importance weight is what TRL's
    _generate_and_score_completions computes (lines 2660-2706), restated here because that
    method needs a generation engine."""
    import types
    from collections import defaultdict
    from types import SimpleNamespace

    trl = pytest.importorskip("trl")
    cls = trl.GRPOTrainer
    lp = b["logp"].clone().requires_grad_(True)
    ent = b["ent"].clone().requires_grad_(True)
    mask = b["mask"].to(F64)
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long),
              "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": b["adv_row"], "old_per_token_logps": b["old"],
              "ref_per_token_logps": b["ref"], "num_items_in_batch": mask.sum()}
    if is_mode is not None:
        inputs["sampling_per_token_logps"] = b["samp"]
        diff = torch.nan_to_num((b["old"] - b["samp"]) * mask, nan=0.0)
        if is_mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        if is_mode.endswith("truncate"):
            ratio = torch.clamp(ratio, min=is_clip_min, max=is_clip_max)
        else:
            lo = -math.inf if is_clip_min is None else is_clip_min
            hi = math.inf if is_clip_max is None else is_clip_max
            ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
        inputs["importance_sampling_ratio"] = ratio
    elif off_policy_mask_threshold is not None:
        inputs["sampling_per_token_logps"] = b["samp"]
    args = SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=delta,
                           sapo_temperature_pos=sapo[0], sapo_temperature_neg=sapo[1],
                           vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1],
                           vespo_k_neg=vespo[2], vespo_lambda_neg=vespo[3],
                           steps_per_generation=1)
    me = SimpleNamespace(
        args=args, beta=beta, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        loss_type=loss_type, importance_sampling_level=level, max_completion_length=T,
        top_entropy_quantile=top_entropy_quantile, entropy_coef=entropy_coef,
        _entropy_bonus_enabled=entropy_coef != 0.0, use_adaptive_entropy=False,
        off_policy_mask_threshold=off_policy_mask_threshold, aux_loss_enabled=False,
        use_vllm=is_mode is not None, vllm_importance_sampling_correction=is_mode is not None,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=_OneProcess(), _metrics=defaultdict(lambda: defaultdict(list)),
        get_off_policy_mask=cls.get_off_policy_mask, get_gamma_weights=cls.get_gamma_weights)
    me.get_high_entropy_mask = types.MethodType(cls.get_high_entropy_mask, me)
    me._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
    loss = cls._compute_loss(me, None, inputs)
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
    return loss.detach(), g_lp, (torch.zeros_like(ent) if g_ent is None else g_ent)


TRL_OPTIONS = [
    dict(),
    dict(beta=0.05),  # TRL's default KL: k3 times the importance ratio
    dict(beta=0.05, use_bias_correction_kl=False, delta=1.3),
    dict(off_policy_mask_threshold=0.005),
    dict(top_entropy_quantile=0.4, entropy_coef=0.05, beta=0.02),
    dict(is_mode="token_truncate", is_clip_max=1.15, beta=0.02),
    dict(is_mode="token_mask", is_clip_max=1.2, is_clip_min=0.85),
    dict(is_mode="sequence_truncate", is_clip_max=1.5, off_policy_mask_threshold=0.0),
    dict(is_mode="sequence_mask", is_clip_max=1.6, is_clip_min=0.6),
]
# TRL 1.16 has every loss type and level of ours but Rank-GRPO's own "rank"
TRL_LOSS_TYPES = tuple(lt for lt in LOSS_TYPES if lt != "rank")
TRL_LEVELS = tuple(level for level in LEVELS if level != "rank")


def ours_like_trl(b, level, loss_type, o):
    """rank_grpo_loss with the keywords an integration passes for TRL's options."""
    kw = dict(level=level, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2,
              beta=o.get("beta", 0.0), delta=o.get("delta"),
              use_bias_correction_kl=o.get("use_bias_correction_kl", o.get("beta", 0) > 0),
              top_entropy_quantile=o.get("top_entropy_quantile", 1.0),
              entropy_coef=o.get("entropy_coef", 0.0),
              off_policy_mask_threshold=o.get("off_policy_mask_threshold"),
              max_completion_length=b["logp"].shape[1])
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.1
    # float32-exact temperatures: TRL builds them with torch.where on Python floats, a float32
    # tensor, so a temperature like its default 1.05 is rounded there (not here, nor in verl)
    kw.update(sapo_temperature_pos=1.0, sapo_temperature_neg=1.25)
    if "is_mode" in o or "off_policy_mask_threshold" in o:
        kw["sampling_logp"] = b["samp"]
    if "is_mode" in o:
        kw.update(importance_sampling_mode=o["is_mode"],
                  importance_sampling_clip_min=o.get("is_clip_min"),
                  importance_sampling_clip_max=o.get("is_clip_max"))
    return api_loss(b, "torch", adv="row", **kw)[:3]


@pytest.mark.parametrize("level", TRL_LEVELS)
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_parity_with_trl_compute_loss(rng, level, loss_type):
    b = api_batch(rng, ratio_noise=0.1)
    b["logp"] = b["logp"].detach()
    worst = 0.0
    for o in TRL_OPTIONS:
        if loss_type == "vespo" and o.get("is_mode", "").startswith("sequence"):
            continue  # TRL refuses it too (GRPOTrainer.__init__)
        trl_kw = dict(o)
        if "beta" in o and "use_bias_correction_kl" not in o:
            trl_kw["use_bias_correction_kl"] = True
        if loss_type == "cispo":
            trl_kw["epsilon_high"] = 1.1
        want = trl_compute_loss(b, level=level, loss_type=loss_type, **trl_kw)
        got = ours_like_trl(b, level, loss_type, o)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-9)
            worst = max(worst, float((g - w).abs().max()))
    print(f"TRL parity {level}/{loss_type}: max abs error {worst:.2e}")


# ------------------------------------------------------------- parity with verl 0.9.1's own code

@pytest.fixture(scope="module")
def verl():
    core = pytest.importorskip("verl.trainer.ppo.core_algos")
    config = pytest.importorskip("verl.workers.config")
    return core, config.ActorConfig


def verl_batch(rng, B=5, T=64):
    """Rows of >= 50 tokens: verl's seq-mean divides by (tokens + 1e-8), a relative 1e-8 /
    tokens away from the exact mean (<= 2e-10 of a row's mean here), inside the 1e-9 bound."""
    lengths = torch.randint(50, T + 1, (B,), generator=rng)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    logp = torch.where(mask, -torch.rand(B, T, generator=rng, dtype=F64) * 3, 0)
    old = torch.where(mask, logp + 0.1 * torch.randn(B, T, generator=rng, dtype=F64), 0)
    ref = torch.where(mask, logp + 0.4 * torch.randn(B, T, generator=rng, dtype=F64), 0)
    adv = torch.randn(B, generator=rng, dtype=F64)
    return logp, old, ref, adv, mask


VERL_AGG = {"token-mean": "bnpo", "seq-mean-token-mean": "grpo",
            "seq-mean-token-sum": "luspo", "seq-mean-token-sum-norm": "dr_grpo"}
VERL_LOSSES = [  # (verl loss_mode, its agg modes, our keywords beyond the clip range)
    ("vanilla", tuple(VERL_AGG), dict(level="token", clip_ratio_c=1.4, log_ratio_clamp=20.0)),
    ("gspo", tuple(VERL_AGG), dict(level="sequence", log_ratio_clamp=(None, 10.0),
                                   ratio_gradient="token")),
    ("sapo", ("seq-mean-token-mean",),
     dict(level="token", surrogate="sapo", log_ratio_clamp=20.0, sapo_temperature_pos=1.3,
          sapo_temperature_neg=0.9)),
    ("cispo", ("token-mean", "seq-mean-token-sum"),
     dict(level="token", surrogate="cispo_two_sided", log_ratio_clamp=20.0)),
    ("geo_mean", ("seq-mean-token-mean",), dict(level="sequence", surrogate="geo_mean")),
]


@pytest.mark.parametrize("kl_type", ("none", "kl", "abs", "mse", "low_var_kl", "k3+"))
@pytest.mark.parametrize("mode", [m[0] for m in VERL_LOSSES])
def test_parity_with_verl_policy_losses_and_kl(rng, verl, mode, kl_type):
    """verl's registered policy loss plus kl_loss_coef * agg_loss(kl_penalty(...)) (what its
    actor adds, same aggregation), against one rank_grpo_loss call: loss and dloss/dlogp."""
    core, ActorConfig = verl
    from rankgrpo_kernels import rank_grpo_loss

    _, aggs, ours_kw = next(m for m in VERL_LOSSES if m[0] == mode)
    logp, old, ref, adv, mask = verl_batch(rng)
    T = logp.shape[1]
    coef = 0.0 if kl_type == "none" else 0.07
    our_kl = {"kl": "k1", "abs": "abs", "mse": "k2", "low_var_kl": "low_var_kl",
              "k3+": "low_var_kl+", "none": "k3"}[kl_type]
    worst = 0.0
    for agg in aggs:
        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                          clip_ratio_low=0.12, clip_ratio_high=0.16, clip_ratio_c=1.4,
                          tau_pos=1.3, tau_neg=0.9, loss_agg_mode=agg)
        lp = logp.clone().requires_grad_(True)
        advt = adv.unsqueeze(1).expand_as(logp)
        want, _ = core.get_policy_loss_fn(mode)(old, lp, advt, mask.to(F64), agg, cfg)
        if coef:
            kld = core.kl_penalty(lp, ref, kl_type)
            want = want + coef * core.agg_loss(kld, mask.to(F64), agg)
        (g_want,) = torch.autograd.grad(want, lp)
        lp2 = logp.clone().requires_grad_(True)
        got, _ = rank_grpo_loss(lp2, old, adv, None, mask, ref_logp=ref, beta=coef,
                                kl_estimator=our_kl, epsilon_low=0.12, epsilon_high=0.16,
                                loss_type=VERL_AGG[agg], max_completion_length=T,
                                backend="torch", **ours_kw)
        (g_got,) = torch.autograd.grad(got, lp2)
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-9)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-9)
        worst = max(worst, float((got - want).detach().abs()),
                    float((g_got - g_want).abs().max()))
    print(f"verl parity {mode}/{kl_type}: max abs error {worst:.2e}")


@pytest.mark.parametrize("name", ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
                                  "kl+", "abs+", "low_var_kl+"))
def test_kl_estimators_match_verl_kl_penalty(rng, verl, name):
    core, _ = verl
    logp = -torch.rand(500, generator=rng, dtype=F64) * 5
    ref = logp + 3 * torch.randn(500, generator=rng, dtype=F64)
    ref[:2] = logp[:2] + torch.tensor([25.0, -30.0], dtype=F64)  # verl's clamps
    ours = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2",
            "low_var_kl": "low_var_kl", "k3": "low_var_kl"}[name.rstrip("+")]
    ours += "+" if name.endswith("+") else ""
    lp = logp.clone().requires_grad_(True)
    want = core.kl_penalty(lp, ref, name)
    (g_want,) = torch.autograd.grad(want.sum(), lp)
    value, grad = variants.kl_closed(ours, logp, ref)
    torch.testing.assert_close(value, want.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, g_want, rtol=0, atol=1e-12)


def test_loss_normalizer_of_the_variant_loss_types(rng):
    """dapo/cispo/vespo count tokens like bnpo, sapo and luspo count rows like grpo."""
    from rankgrpo_kernels import loss_normalizer

    b = api_batch(rng)
    m = b["mask"]
    for lt, want in (("dapo", m.sum()), ("cispo", m.sum()), ("vespo", m.sum()),
                     ("sapo", m.shape[0]), ("luspo", m.shape[0])):
        assert float(loss_normalizer(m, None, lt)) == float(want)
    # luspo: per-row token sums, mean over rows (TRL's luspo), on-policy so w == 1
    lp = b["logp"].clone().requires_grad_(True)
    from rankgrpo_kernels import rank_grpo_loss

    loss, _ = rank_grpo_loss(lp, None, b["adv_row"], None, m, level="sequence",
                             loss_type="luspo", backend="torch")
    want = -(b["adv_row"] * m.sum(1)).sum() / m.shape[0]
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", ("bnpo", "vespo"))
def test_importance_weights_equal_the_computed_sampler_weights(rng, loss_type):
    b = api_batch(rng)
    mask = b["mask"]
    for mode in ("token_truncate", "token_mask"):
        w = variants.sampling_is_ratio(b["old"], b["samp"], mask, mode, 0.8, 1.2)
        for backend in ("torch", "reference"):
            a = api_loss(b, backend, loss_type=loss_type, level="sequence", beta=0.03,
                         sampling_logp=b["samp"], importance_sampling_mode=mode,
                         importance_sampling_clip_min=0.8, importance_sampling_clip_max=1.2)
            c = api_loss(b, backend, loss_type=loss_type, level="sequence", beta=0.03,
                         importance_weights=w)
            for x, y in zip(a[:3], c[:3]):
                assert torch.equal(x, y)
    with pytest.raises(ValueError, match="importance_weights"):
        api_loss(b, "torch", importance_weights=torch.ones(3, dtype=F64))


@pytest.mark.parametrize("mode", [m[0] for m in VERL_LOSSES])
def test_parity_with_verl_rollout_is_weights(rng, verl, mode):
    """verl's rollout_is_weights as importance_weights: per token, except geo_mean, which
    takes the per-row geometric mean of the weights (verl does that inside geo_mean)."""
    core, ActorConfig = verl
    from rankgrpo_kernels import rank_grpo_loss

    _, aggs, ours_kw = next(m for m in VERL_LOSSES if m[0] == mode)
    logp, old, ref, adv, mask = verl_batch(rng)
    m = mask.to(F64)
    isw = torch.where(mask, 0.5 + torch.rand(logp.shape, generator=rng, dtype=F64), 0)
    ours_w = isw
    if mode == "geo_mean":
        ours_w = torch.exp((torch.log(isw + 1e-10) * m).sum(1) / m.sum(1))
    for agg in aggs:
        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                          clip_ratio_low=0.12, clip_ratio_high=0.16, clip_ratio_c=1.4,
                          tau_pos=1.3, tau_neg=0.9, loss_agg_mode=agg)
        lp = logp.clone().requires_grad_(True)
        want, _ = core.get_policy_loss_fn(mode)(old, lp, adv.unsqueeze(1).expand_as(logp), m,
                                                agg, cfg, rollout_is_weights=isw)
        (g_want,) = torch.autograd.grad(want, lp)
        lp2 = logp.clone().requires_grad_(True)
        got, _ = rank_grpo_loss(lp2, old, adv, None, mask, epsilon_low=0.12, epsilon_high=0.16,
                                loss_type=VERL_AGG[agg], importance_weights=ours_w,
                                backend="torch", **ours_kw)
        (g_got,) = torch.autograd.grad(got, lp2)
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-9)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-9)


def test_token_ratio_gradient_equals_segment_gradient_for_uniform_rows(rng):
    """GSPO-token's gradient is the sequence ratio's when every token of a row carries the
    same advantage and weight (per-row A, bnpo, no per-token weights), and differs otherwise."""
    b = api_batch(rng)
    kw = dict(level="sequence", loss_type="bnpo", beta=0.0, epsilon_low=0.5, epsilon_high=0.5)
    seg = api_loss(b, "torch", adv="row", **kw)
    tok = api_loss(b, "torch", adv="row", ratio_gradient="token", **kw)
    torch.testing.assert_close(tok[0], seg[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(tok[1], seg[1], rtol=0, atol=1e-14)
    w = torch.where(b["mask"], torch.rand(b["mask"].shape, generator=rng, dtype=F64) + 0.5, 0)
    seg = api_loss(b, "torch", adv="row", importance_weights=w, **kw)
    tok = api_loss(b, "torch", adv="row", importance_weights=w, ratio_gradient="token", **kw)
    torch.testing.assert_close(tok[0], seg[0], rtol=0, atol=1e-15)
    assert (tok[1] - seg[1]).abs().max() > 1e-6
