"""docs/math.md section 10: Recall@K / NDCG@K against hand-worked values, properties,
diagnostics."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankgrpo.catalog import Catalog
from rankgrpo.metrics import (
    evaluate,
    evaluation_hits,
    list_diagnostics,
    ndcg_at_k,
    recall_at_k,
)

CAT = Catalog([("Heat", 1995), ("Alien", 1979), ("Up", 2009), ("Her", 2013), ("Jaws", 1975),
               ("heat", 1995), ("Big", 1988), ("Saw", 2004)])
GT = [["Heat", "1995"], ["Up", "2007"], ["Jaws", "1975"], ["Saw", "2004"]]
SEEN = ["Her"]
# After removing the seen "Her" and the out-of-catalog "Inception" the list compacts to
# Alien, Heat, heat, Big, Up, Jaws: hits [0, 1, 0, 0, 1, 1] ("heat" is not "Heat": exact
# title in evaluation; "Up" 2009 vs 2007 is within 2 years).
TEXT = "Her (2013)\nAlien (1979)\nInception (2010)\nHeat (1995)\nheat (1995)\nBig (1988)\n" \
       "Up (2009)\nJaws (1975)"


def d(i):  # discount of 1-based rank i
    return 1 / math.log2(i + 1)


def test_hits_compact():
    assert evaluation_hits(TEXT, GT, SEEN, CAT) == ([0, 1, 0, 0, 1, 1], 4)


def test_recall_literals():
    assert recall_at_k(TEXT, GT, SEEN, CAT, 1) == 0.0
    assert recall_at_k(TEXT, GT, SEEN, CAT, 2) == 0.25
    assert recall_at_k(TEXT, GT, SEEN, CAT, 5) == 0.5
    assert recall_at_k(TEXT, GT, SEEN, CAT, 20) == 0.75
    assert recall_at_k(TEXT, [], SEEN, CAT, 20) == 0.0


def test_ndcg_literals():
    # K = 5: DCG = d(2) + d(5) = 0.63093 + 0.38685; IDCG from min(|GT|=4, 5) = 4 ideal hits,
    # 1 + 0.63093 + 0.5 + 0.43068 = 2.56161; NDCG@5 = 1.01778 / 2.56161 = 0.39732
    dcg5 = d(2) + d(5)
    assert ndcg_at_k(TEXT, GT, SEEN, CAT, 5) == pytest.approx(
        dcg5 / (d(1) + d(2) + d(3) + d(4)), abs=1e-12)
    assert ndcg_at_k(TEXT, GT, SEEN, CAT, 5) == pytest.approx(0.39732201, abs=1e-8)
    # K = 2: DCG = d(2); IDCG = d(1) + d(2)
    assert ndcg_at_k(TEXT, GT, SEEN, CAT, 2) == pytest.approx(d(2) / (d(1) + d(2)), abs=1e-12)


def test_ndcg_ideal_surviving():
    # Only 2 recommendations survive (Heat, Alien): the released code caps the ideal at 2.
    text = "Her (2013)\nHeat (1995)\nAlien (1979)"
    gt_ideal = ndcg_at_k(text, GT, SEEN, CAT, 5)
    surv = ndcg_at_k(text, GT, SEEN, CAT, 5, ideal="surviving")
    assert gt_ideal == pytest.approx(1 / (d(1) + d(2) + d(3) + d(4)), abs=1e-12)
    assert surv == pytest.approx(1 / (d(1) + d(2)), abs=1e-12)
    assert ndcg_at_k("", GT, SEEN, CAT, 5, ideal="surviving") == 0.0
    with pytest.raises(ValueError, match="ideal"):
        ndcg_at_k(text, GT, SEEN, CAT, 5, ideal="best")


def test_each_groundtruth_credited_once_and_perfect_list():
    assert evaluation_hits("Heat (1995)\nHeat (1995)", GT, [], CAT)[0] == [1, 0]
    perfect = "Heat (1995)\nUp (2009)\nJaws (1975)\nSaw (2004)"
    for k in (1, 4, 20):
        assert ndcg_at_k(perfect, GT, [], CAT, k) == pytest.approx(1.0)
    assert recall_at_k(perfect, GT, [], CAT, 4) == 1.0


ITEMS = sorted(CAT)
lists = st.lists(st.sampled_from(ITEMS), max_size=12)


@settings(max_examples=200)
@given(lists, st.lists(st.sampled_from(ITEMS), min_size=1, max_size=5),
       st.integers(1, 20), st.sampled_from(["groundtruth", "surviving"]))
def test_ndcg_and_recall_in_unit_interval(recs, gt, k, ideal):
    gt = [[t, str(y)] for t, y in gt]
    assert 0.0 <= ndcg_at_k(recs, gt, [], CAT, k, ideal=ideal) <= 1.0 + 1e-12
    assert 0.0 <= recall_at_k(recs, gt, [], CAT, k) <= 1.0


@settings(max_examples=300)
@given(lists, st.lists(st.sampled_from(ITEMS), min_size=1, max_size=5), st.integers(1, 12),
       st.data())
def test_moving_a_hit_up_never_lowers_ndcg(recs, gt, k, data):
    gt = [[t, str(y)] for t, y in gt]
    hits, _ = evaluation_hits(recs, gt, [], CAT)
    pairs = [(i, j) for j in range(len(hits)) for i in range(j) if hits[j] and not hits[i]]
    if not pairs:
        return
    i, j = data.draw(st.sampled_from(pairs))
    moved = list(recs)
    moved[i], moved[j] = moved[j], moved[i]
    assert ndcg_at_k(moved, gt, [], CAT, k) >= ndcg_at_k(recs, gt, [], CAT, k) - 1e-12


def test_list_diagnostics():
    text = "Intro line\nHeat (1995)\nheat (1995)\nHer (2013)\nNope (2020)\n\nUp (2009)"
    diag = list_diagnostics(text, SEEN, CAT, num_ranks=4)
    assert diag == {"lines": 6, "parse_failures": 1, "items": 5, "considered": 4,
                    "out_of_catalog": 1, "seen": 1, "duplicates": 1}


def test_evaluate():
    records = [
        {"groundtruth_with_release_year": GT, "seen_titles": SEEN},
        {"groundtruth_with_release_year": [["Big", "1988"]], "seen_titles": []},
        {"groundtruth_with_release_year": [], "seen_titles": []},
    ]
    gens = [TEXT, "Big (1988)", "garbage"]
    out = evaluate(records, gens, CAT)
    assert out["num_evaluated"] == 2 and out["num_skipped_empty_groundtruth"] == 1
    assert out["recall@5"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["ndcg@5"] == pytest.approx((0.39732201 + 1.0) / 2, abs=1e-8)
    assert set(out) >= {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 15, 20)}
    assert out["empty_list_rate"] == pytest.approx(1 / 3)
    assert out["items_per_list"] == pytest.approx((8 + 1 + 0) / 3)
    assert out["parse_failure_rate"] == pytest.approx(1 / 10)
    assert out["out_of_catalog_rate"] == pytest.approx(1 / 9)
    assert out["seen_rate"] == pytest.approx(1 / 9)
    with pytest.raises(ValueError, match="generations"):
        evaluate(records, gens[:2], CAT)
