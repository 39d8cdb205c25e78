"""docs/math.md sections 2, 3 and 5: matching, rank rewards and length shaping, against
hand-worked literals, plus hypothesis properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankgrpo.catalog import Catalog
from rankgrpo.config import GRPOConfig, validate_section
from rankgrpo.rewards import (
    RANK_REWARD_KINDS,
    REWARD_KINDS,
    LengthShaping,
    eos_mask_from_ids,
    length_shaping,
    rank_relevance,
    rank_rewards,
    relevance_matrix,
    reward_matrix,
    rewards_from_relevance,
    sequence_dcg,
    token_advantages,
)

CATALOG = Catalog([
    ("Heat", 1995), ("Alien", 1979), ("Aliens", 1985), ("Up", 2009), ("Her", 2013),
    ("Jaws", 1975), ("Amélie", 2001), ("Solaris", 2002), ("Solaris", 2004), ("heat", 1995),
])

# Every rule of section 2, one rank each (the comment is the reason for rel_k).
TEXT = "\n".join([
    "1. **Heat (1995)**",          # 1: exact match
    "Heat (1995)",                 # 0: its ground-truth entry is used up
    "Alien (1979)",                # 1: ground truth lists Alien twice (multiset) ...
    '"Alien" (1979)',              # 1: ... so the second copy scores too
    "Alien (1979)",                # 0: both copies used
    "Up (2009)",                   # 1: ground truth "up" 2007: casefold, year -2
    "Aliens (1985)",               # 1: ground truth 1986, year +1 off
    "Her (2013)",                  # 0: a seen title
    "Jaws (1975)",                 # 0: ground truth 1972 is 3 years off
    "Gladiator (2000)",            # 0: in the ground truth but out of catalog
    "not a movie line",            # (dropped: takes no rank)
    "",                            # (blank: takes no rank)
    "Amélie (2001)",               # 1: non-ASCII title
    "heat (1995)",                 # 0: in catalog as lower case, but Heat is used up
])
GT = [["Heat", "1995"], ["Alien", "1979"], ["Alien", "1979"], ["up", "2007"],
      ["Aliens", "1986"], ["Her", "2013"], ["Jaws", "1972"], ["Gladiator", "2000"],
      ["Amélie", "2001"]]
SEEN = ["Her", "Gattaca"]


def test_rank_relevance_every_rule():
    rel = rank_relevance(TEXT, GT, SEEN, CATALOG, num_ranks=20)
    assert rel == [1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0] + [0] * 8


def test_rank_relevance_accepts_parsed_items_and_int_years():
    items = [("Heat", 1995), ("Alien", "1979")]
    assert rank_relevance(items, [("Heat", 1995), ("Alien", 1979)], [], CATALOG, 2) == [1, 1]


def test_more_than_n_items_only_first_n_count():
    text = "Up (2009)\nHeat (1995)\nAlien (1979)"
    assert rank_relevance(text, GT, [], CATALOG, num_ranks=2) == [1, 1]


def test_fewer_than_n_items_zero_padded():
    assert rank_relevance("Heat (1995)", GT, [], CATALOG, num_ranks=4) == [1, 0, 0, 0]
    assert rank_relevance("", GT, [], CATALOG, num_ranks=3) == [0, 0, 0]


def test_year_order_tries_plus_one_before_minus_one():
    # Ground truth Solaris 2003 and 2001; "Solaris (2002)" takes 2003 (+1 is tried before -1),
    # so "Solaris (2004)" finds 2004, 2005, (2003 used), 2006, 2002: none -> 0.
    gt = [["Solaris", "2003"], ["Solaris", "2001"]]
    assert rank_relevance("Solaris (2002)\nSolaris (2004)", gt, [], CATALOG, 2) == [1, 0]


@pytest.mark.parametrize("diff, rel", [(-3, 0), (-2, 1), (-1, 1), (0, 1), (1, 1), (2, 1),
                                       (3, 0)])
def test_year_tolerance_both_directions(diff, rel):
    assert rank_relevance("Heat (1995)", [["Heat", str(1995 + diff)]], [], CATALOG, 1) == [rel]


def test_catalog_none_skips_catalog_check_and_bad_gt_year_never_matches():
    assert rank_relevance("Gladiator (2000)", GT, [], None, 1) == [1]
    assert rank_relevance("Heat (1995)", [["Heat", "n/a"]], [], CATALOG, 1) == [0]


def test_seen_is_exact_string():
    # "her" is not the seen title "Her"; but (her, 2013) is not in the catalog either
    cat = Catalog([("her", 2013), ("Her", 2013)])
    assert rank_relevance("her (2013)\nHer (2013)", [["Her", "2013"]], ["Her"], cat, 2) == [1, 0]


# ------------------------------------------------------------------ rank rewards


def test_rank_rewards_literals():
    rel = [1, 0, 1, 0]
    assert rank_rewards(rel) == [1.0, 0.0, 1.0, 0.0]
    # log: r_3 = 1/log2(4) = 0.5, r_2 = 0.5, r_1 = 1/log2(2) + 0.5 = 1.5
    assert rank_rewards(rel, "log") == [1.5, 0.5, 0.5, 0.0]
    # exp_gamma, Gamma = 2: r_3 = 1, r_2 = 1/2, r_1 = 1 + 1/4
    assert rank_rewards(rel, "exp_gamma", gamma=2.0) == [1.25, 0.5, 1.0, 0.0]
    assert rank_rewards([0, 1], "log") == pytest.approx([0.6309297535714575] * 2, abs=1e-15)
    assert sequence_dcg(rel) == 1.5
    assert sequence_dcg([0, 1]) == pytest.approx(0.6309297535714575, abs=1e-15)


def test_rank_rewards_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        rank_rewards([1], "dcg")
    with pytest.raises(ValueError, match="gamma > 1"):
        rank_rewards([1], "exp_gamma")
    with pytest.raises(ValueError, match="gamma > 1"):
        rank_rewards([1], "exp_gamma", gamma=1.0)


rels = st.lists(st.integers(0, 1), min_size=1, max_size=30)


@given(rels)
def test_exp_inf_is_relevance(rel):
    assert rank_rewards(rel) == [float(r) for r in rel]
    assert rank_rewards(rel, "exp_gamma", gamma=math.inf) == [float(r) for r in rel]


@given(rels)
def test_log_rewards_in_range_and_causal(rel):
    r = rank_rewards(rel, "log")
    for k in range(len(rel)):
        bound = sum(1 / math.log2(j + 2) for j in range(k, len(rel)))
        assert -1e-12 <= r[k] <= bound + 1e-12
        if k + 1 < len(rel):
            assert r[k] >= r[k + 1]  # causal DCG never grows with the rank
        # r_k only depends on ranks >= k (no credit from earlier ranks)
        changed = [1 - x if j < k else x for j, x in enumerate(rel)]
        assert rank_rewards(changed, "log")[k] == pytest.approx(r[k], abs=1e-12)
    assert r[0] == pytest.approx(sequence_dcg(rel), abs=1e-12)


@given(rels, st.floats(1.01, 50.0))
def test_exp_gamma_in_range(rel, gamma):
    r = rank_rewards(rel, "exp_gamma", gamma=gamma)
    for k in range(len(rel)):
        assert rel[k] - 1e-12 <= r[k] <= 1 / (1 - 1 / gamma) + 1e-9


@given(st.lists(st.sampled_from(sorted(CATALOG)), max_size=25),
       st.lists(st.sampled_from(sorted(CATALOG)), max_size=6), st.integers(1, 20))
def test_relevance_binary_and_bounded(recs, gt, n):
    rel = rank_relevance(recs, [[t, str(y)] for t, y in gt], [], CATALOG, n)
    assert len(rel) == n and set(rel) <= {0, 1}
    assert sum(rel) <= min(len(gt), len(recs), n)


def test_matrices():
    records = [{"groundtruth_with_release_year": GT, "seen_titles": SEEN},
               {"groundtruth_with_release_year": [["Up", "2009"]], "seen_titles": []}]
    gens = [TEXT, "Heat (1995)\nUp (2009)"]
    rel = relevance_matrix(gens, records, CATALOG, num_ranks=4)
    assert rel.tolist() == [[1, 0, 1, 1], [0, 1, 0, 0]]
    assert reward_matrix(gens, records, CATALOG, 4, "log").tolist()[1] == pytest.approx(
        [1 / math.log2(3)] * 2 + [0, 0])
    assert reward_matrix(gens, records, CATALOG, 4, "sequence_dcg").shape == (2,)


@pytest.mark.parametrize("kind", REWARD_KINDS)
def test_rewards_from_relevance_every_kind(kind, rng):
    """The batch path equals the per-list functions for every kind the config accepts."""
    rel = torch.randint(0, 2, (5, 6), generator=rng).float()
    gamma = 1.5 if kind == "exp_gamma" else None
    got = rewards_from_relevance(rel, kind, gamma)
    assert got.dtype == torch.float32
    if kind in RANK_REWARD_KINDS:
        want = [rank_rewards(r, kind, gamma) for r in rel.tolist()]
    else:
        want = [sequence_dcg(r) for r in rel.tolist()]
    assert torch.equal(got, torch.tensor(want, dtype=torch.float32))
    validate_section("grpo", GRPOConfig(reward_kind=kind, reward_gamma=gamma))  # accepted


def test_one_name_per_reward_kind():
    assert set(RANK_REWARD_KINDS) < set(REWARD_KINDS)
    rel = torch.ones(1, 3)
    with pytest.raises(ValueError, match="sequence_dcg"):  # the old alias is gone
        rewards_from_relevance(rel, "sequence")
    with pytest.raises(ValueError, match="one reward per completion"):
        rank_rewards([1, 0], "sequence_dcg")


# ------------------------------------------------------------------ length shaping

N = 3
# rows: exact N items + EOS; short list + EOS; truncated with overflow; overflow + EOS
SEG = torch.tensor([[0, 0, 1, 2, 2, -1],
                    [0, 1, 1, -1, -1, -1],
                    [0, 1, 2, 3, 3, 3],
                    [0, 1, 2, 3, 3, -1]])
MASK = SEG >= 0
EOS = torch.tensor([[0, 0, 0, 0, 1, 0],
                    [0, 0, 1, 0, 0, 0],
                    [0, 0, 0, 0, 0, 0],
                    [0, 0, 0, 0, 1, 0]], dtype=torch.bool)


def test_length_shaping_literals():
    out = length_shaping(SEG, MASK, EOS, N)
    expected = torch.tensor([[0, 0, 0, 0, 0.1, 0],
                             [0, 0, -0.1, 0, 0, 0],
                             [0, 0, 0, -0.1, -0.1, -0.1],
                             [0, 0, 0, -0.1, -0.1, 0]])
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32


def test_length_shaping_configurable_and_num_items_override():
    cfg = LengthShaping(overflow_penalty=-1.0, short_eos_penalty=-2.0, exact_eos_bonus=3.0)
    out = length_shaping(SEG, MASK, EOS, N, config=cfg)
    assert out[0, 4] == 3.0 and out[1, 2] == -2.0 and out[2, 3:].tolist() == [-1.0] * 3
    # aligned mode passes parsed counts: row 0 has only 2 parsed items -> short
    out = length_shaping(SEG, MASK, EOS, N, num_items=torch.tensor([2, 2, 0, 5]))
    assert out[0, 4].item() == pytest.approx(-0.1)
    zero = LengthShaping(0.0, 0.0, 0.0)
    assert not length_shaping(SEG, MASK, EOS, N, config=zero).any()


def test_token_advantages():
    a = torch.tensor([[1.0, 2.0, 3.0]] * 4)
    out = token_advantages(a, SEG, MASK, EOS, shaping=LengthShaping())
    expected = torch.tensor([[1, 1, 2, 3, 0.1, 0],        # EOS gets 0 + bonus
                             [1, 2, -0.1, 0, 0, 0],
                             [1, 2, 3, -0.1, -0.1, -0.1],  # overflow gets 0 + penalty
                             [1, 2, 3, -0.1, -0.1, 0]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(token_advantages(a, SEG, MASK, EOS, shaping=None),
                               expected - length_shaping(SEG, MASK, EOS, N))


def test_eos_mask_from_ids():
    ids = torch.tensor([[5, 7, 0, 0], [5, 5, 5, 5], [9, 2, 3, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    out = eos_mask_from_ids(ids, mask, [0, 2])
    assert out.tolist() == [[False, False, True, False], [False] * 4,
                            [False, True, False, False]]


def test_shaping_shape_errors():
    with pytest.raises(ValueError, match="eos_mask"):
        length_shaping(SEG, MASK, EOS[:, :3], N)


def _slow_shaping(seg, mask, eos, n, cfg):
    """Per-token loop: the definition of section 5, written the obvious way."""
    out = [[0.0] * len(row) for row in seg]
    for b, row in enumerate(seg):
        overflow = any(m and s >= n for s, m in zip(row, mask[b]))
        e = [t for t in range(len(row)) if eos[b][t] and mask[b][t]]
        for t, s in enumerate(row):
            if mask[b][t] and s >= n:
                out[b][t] += cfg.overflow_penalty
        if e:
            items = min(row[e[0]] + 1, n + 1)
            if items < n:
                out[b][e[0]] += cfg.short_eos_penalty
            if items == n and not overflow:
                out[b][e[0]] += cfg.exact_eos_bonus
    return out


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_vectorised_shaping_matches_loop(data):
    b = data.draw(st.integers(1, 5))
    t = data.draw(st.integers(1, 12))
    n = data.draw(st.integers(1, 4))
    seg, mask, eos = [], [], []
    for _ in range(b):
        length = data.draw(st.integers(0, t))
        nl = data.draw(st.lists(st.integers(0, 2), min_size=length, max_size=length))
        row, c = [], 0
        for x in nl:  # exclusive cumsum, clamped: a valid newline-mode segment row
            row.append(min(c, n))
            c += x
        ended = length > 0 and data.draw(st.booleans())
        seg.append(row + [-1] * (t - length))
        mask.append([True] * length + [False] * (t - length))
        eos.append([ended and i == length - 1 for i in range(t)])
    cfg = LengthShaping(-0.25, -0.5, 0.75)
    got = length_shaping(torch.tensor(seg), torch.tensor(mask), torch.tensor(eos), n,
                         config=cfg)
    torch.testing.assert_close(got, torch.tensor(_slow_shaping(seg, mask, eos, n, cfg)))
