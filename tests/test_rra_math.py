"""Remap-Reflect-Adjust math (Eq. 10-13): hand-computed cases, fit_adjust against autograd and
a planted solution, and the robust `title (year)####rating` parser."""

import math

import pytest
import torch

from rankgrpo.rra import (
    adjust_objective,
    exact_match_indicator,
    fit_adjust,
    parse_ratings,
    rank_weights,
    reflect_scores,
    remap_scores,
)
from rankgrpo.rra.remap import cosine


def test_rank_weights_are_inverse_sqrt_rank():
    p = rank_weights(4, dtype=torch.float64)
    assert p.tolist() == pytest.approx([1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5])
    assert rank_weights(0).shape == (0,)


def test_exact_match_indicator_is_exact():
    index = {("Heat", 1995): 0, ("Alien", 1979): 1, ("Aliens", 1986): 2}
    ind = exact_match_indicator([("Alien", 1979), ("heat", 1995), ("Heat", 1996),
                                 ("Aliens", 1986)], index, 3)
    # case-sensitive title and exact year: only rows 0 and 3 match
    assert ind.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_remap_hand_computed():
    # 2-d embeddings chosen so every cosine is simple
    catalog = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    context = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ind = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    r = 1 / math.sqrt(2)
    # S = [[1, 0, r], [0, 1, r]], p = [1, r], s_context = [0, 1, r]
    expect_lam1 = [1 * (1 + 1) + r * 0 + 0, 1 * 0 + r * 1 + 1, 1 * r + r * r + r]
    got = remap_scores(teacher, ind, context, catalog, lam=1.0)
    assert got.tolist() == pytest.approx(expect_lam1)
    got0 = remap_scores(teacher, ind, context, catalog, lam=0.0)
    assert got0.tolist() == pytest.approx([2.0, r, r + 0.5])
    got3 = remap_scores(teacher, ind, context, catalog, lam=3.0)
    assert (got3 - got0).tolist() == pytest.approx([0.0, 3.0, 3 * r])
    # no teacher items: the context term alone
    empty = remap_scores(torch.zeros(0, 2, dtype=torch.float64),
                         torch.zeros(0, 3, dtype=torch.float64), context, catalog, lam=2.0)
    assert empty.tolist() == pytest.approx([0.0, 2.0, 2 * r])


def test_remap_matches_float64_formula(rng):
    k, c, d = 7, 11, 5
    t, cat = torch.randn(k, d, generator=rng), torch.randn(c, d, generator=rng)
    ctx = torch.randn(d, generator=rng)
    ind = (torch.rand(k, c, generator=rng) < 0.1).float()
    ref = sum((1 / math.sqrt(i + 1)) * (torch.nn.functional.cosine_similarity(
        t[i].double()[None], cat.double(), dim=1) + ind[i].double()) for i in range(k))
    ref = ref + 0.7 * cosine(ctx.double()[None], cat.double())[0]
    got = remap_scores(t, ind, ctx, cat, lam=0.7)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_reflect_adds_gamma_times_rating():
    remap = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = reflect_scores(remap, [3, 0], [2, -1], gamma=0.5)
    assert got.tolist() == [0.5, 2.0, 3.0, 5.0]
    assert remap.tolist() == [1.0, 2.0, 3.0, 4.0]  # not modified
    assert reflect_scores(remap, [1], [2], gamma=0.25).tolist() == [1.0, 2.5, 3.0, 4.0]
    with pytest.raises(ValueError, match="ratings must be in"):
        reflect_scores(remap, [1], [3])


CANDS = [("Heat", 1995), ("Alien", 1979), ("Aliens", 1986), ("It", 2017), ("It", 1990)]


def test_parse_ratings_well_formed():
    text = "Heat (1995)####2\nAlien (1979)####-1\nAliens (1986)####0\nIt (2017)####1\n" \
           "It (1990)####-2"
    r = parse_ratings(text, CANDS)
    assert r.ratings == [2, -1, 0, 1, -2] and r.missing == 0 and r.garbled == 0


def test_parse_ratings_malformed():
    text = ("Sure! Here are my ratings:\n"       # chatter: garbled
            "1. \"Heat\" (1995) #### 2\n"        # numbering, quotes, spaces: fine
            "**Alien (1979)**###+1\n"            # markdown, 3 hashes, plus sign: fine
            "Aliens (1986)####5\n"               # out of range: garbled, Aliens missing
            "It (2017)####\n"                    # no rating: garbled
            "Heat (1995)####-2\n"                # repeat: first wins, counted garbled
            "The Thing (1982)####2\n"            # not a candidate: garbled
            "It####1\n")                         # ambiguous title (2 years): garbled
    r = parse_ratings(text, CANDS)
    assert r.ratings == [2, 1, 0, 0, 0]
    assert r.missing == 3
    assert r.garbled == 6
    # a unique title without its year is accepted
    assert parse_ratings("Aliens####-2", CANDS).ratings == [0, 0, -2, 0, 0]
    # nothing at all
    empty = parse_ratings("", CANDS)
    assert empty.ratings == [0] * 5 and empty.missing == 5 and empty.garbled == 0


def _autograd_objective(w, b, s, targets, lw, lb):
    z = s * w + b
    logp = torch.log_softmax(z, dim=1)
    pairs = [(i, t) for i, ts in enumerate(targets) for t in ts]
    nll = -torch.stack([logp[i, t] for i, t in pairs]).mean()
    return nll + lw * ((w - 1) ** 2).sum() + lb * (b ** 2).sum()


def test_adjust_gradient_matches_autograd(rng):
    n, c = 13, 9
    s = torch.randn(n, c, generator=rng, dtype=torch.float64)
    w = (1 + 0.3 * torch.randn(c, generator=rng, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(c, generator=rng, dtype=torch.float64)).requires_grad_()
    targets = [torch.randint(0, c, (int(torch.randint(0, 3, (1,), generator=rng)),),
                             generator=rng).tolist() for _ in range(n)]
    targets[0] = [2, 2]  # a repeated ground-truth item counts twice
    ref = _autograd_objective(w, b, s, targets, 0.03, 0.05)
    gw_ref, gb_ref = torch.autograd.grad(ref, [w, b])
    # chunk size 4 splits the rows unevenly: the chunked sums must still agree
    loss, gw, gb = adjust_objective(w.detach(), b.detach(), s, targets, lambda_w=0.03,
                                    lambda_b=0.05, chunk_size=4)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-10, atol=1e-12)


def test_fit_adjust_recovers_planted_solution(rng):
    n, c = 3000, 4
    s = 2 * torch.randn(n, c, generator=rng, dtype=torch.float64)
    w0 = torch.tensor([0.5, 1.5, 1.0, 2.0], dtype=torch.float64)
    b0 = torch.tensor([0.3, -0.5, 0.8, -0.6], dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(s * w0 + b0, dim=1), 2, replacement=True,
                                generator=rng).tolist()
    res = fit_adjust(s, targets, lambda_w=0.0, lambda_b=1e-8, chunk_size=700)
    w, b = res  # unpacks as (w, b)
    assert res.grad_norm < 1e-5
    # the statistical error of 6000 samples is ~0.05; softmax fixes b only up to a constant
    torch.testing.assert_close(w.double(), w0, atol=0.15, rtol=0)
    torch.testing.assert_close((b - b.mean()).double(), b0 - b0.mean(), atol=0.15, rtol=0)
    # the fit is a stationary point of the objective computed independently by autograd
    wg, bg = w.double().requires_grad_(), b.double().requires_grad_()
    g = torch.autograd.grad(_autograd_objective(wg, bg, s, targets, 0.0, 1e-8), [wg, bg])
    assert max(float(x.abs().max()) for x in g) < 1e-4


def test_fit_adjust_regularisation_and_edge_cases():
    s = torch.randn(5, 3, dtype=torch.float64)
    # no ground truth at all: the ridge terms alone, minimised at w = 1, b = 0
    res = fit_adjust(s, [[] for _ in range(5)])
    assert res.w.tolist() == [1, 1, 1] and res.b.tolist() == [0, 0, 0] and res.num_pairs == 0
    # a huge penalty keeps the solution at (1, 0)
    res = fit_adjust(s, [[0]] * 5, lambda_w=1e6, lambda_b=1e6)
    assert (res.w - 1).abs().max() < 1e-4 and res.b.abs().max() < 1e-4
    with pytest.raises(ValueError, match="outside the catalog"):
        fit_adjust(s, [[3]] * 5)
    with pytest.raises(ValueError, match="targets has 2 rows"):
        fit_adjust(s, [[0], [1]])
    with pytest.raises(ValueError, match="empty catalog"):
        fit_adjust(torch.zeros(2, 0), [[], []])
