"""Loss variants (docs/math.md section 7.1): the closed form (variants.torch_stage) against
autograd of the expression (variants.reference_stage) in float64 on fresh random inputs, ties
at every kink, defaults bitwise equal to the plain stage, the per-token pieces against
autograd, and parity with TRL 1.16's and verl 0.9.1's own code where it can be called."""

from __future__ import annotations

import pytest
import torch

from rankgrpo_kernels import segment_stage, variants
from rankgrpo_kernels.segment_stage import ClipParams
from rankgrpo_kernels.variants import Variant

F64 = torch.float64
TOL = dict(rtol=0, atol=1e-10)
LEVELS = ("token", "sequence", "rank")


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
    hi_tok = ((w > 1) & (w < 2)).nonzero()[0]
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
