"""Constrained rating (rankgrpo.rra.constrained): the rating trie, the cached decoding against
a full forward without a cache, the HF teacher's answers, and the pipeline with it."""

import sys
from pathlib import Path

import pytest
import torch

from rankgrpo.config import ConfigError
from rankgrpo.rra.config import RRAConfig
from rankgrpo.rra.constrained import (
    answer_text,
    candidate_segments,
    rate_constrained,
    rating_trie,
)
from rankgrpo.rra.reflect import RATINGS, parse_ratings
from rankgrpo.rra.teacher import Conversation, HFTeacher, fingerprint_for
from rankgrpo.tiny import build_tokenizer, tiny_model

sys.path.insert(0, str(Path(__file__).parent))

ITEMS = [("Alien", 1979), ("Heat", 1995), ("Up", 2009), ("Jaws", 1975), ("Big", 1988)]
WORDS = ["#", "-", "0", "1", "2", "rate", "these", "movies"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([f"{t} ({y})" for t, y in ITEMS], ["rate these movies"],
                           words=WORDS)


def _encode(tok):
    """The tokenizer itself: it writes '-2' as two tokens ('-', '2')."""
    return lambda s: list(tok(s, add_special_tokens=False)["input_ids"])


def _one_token_encode(tok):
    """Each rating as one token (as in tokenizers that merge '-2'): the negatives borrow the
    ids of two words."""
    enc = _encode(tok)
    return lambda s: {"-2": enc("rate"), "-1": enc("these")}.get(s) or enc(s)


def test_rating_trie_shapes_and_errors(tok):
    enc = _encode(tok)
    assert enc("Alien (1979)####")[1:] == enc("#") * 4  # no unknown token in the segments
    one = rating_trie(_one_token_encode(tok))
    assert sorted(n.rating for n in one.children.values()) == sorted(RATINGS)
    two = rating_trie(enc)
    minus = two.children[enc("-")[0]]
    assert minus.rating is None and sorted(n.rating for n in minus.children.values()) == [-2, -1]
    assert len(two.children) == 4  # '-', '0', '1', '2'
    codes = {"-1": [5], "-2": [5, 6], "0": [7], "1": [8], "2": [9]}
    with pytest.raises(ValueError, match="prefix"):
        rating_trie(codes.__getitem__)
    with pytest.raises(ValueError, match="no token"):
        rating_trie(lambda s: [] if s == "0" else [RATINGS.index(int(s)) + 1])


def _full_check(model, prompt, segs, chosen, trie):
    """Replay the answer in one forward with no cache: at every decision the chosen token must
    be the allowed token of highest logit."""
    seq, decisions = list(prompt), []
    for seg, toks in zip(segs, chosen):
        seq += list(seg)
        node = trie
        for t in toks:
            decisions.append((len(seq) - 1, list(node.children), t))
            node = node.children[t]
            seq.append(t)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    for pos, allowed, t in decisions:
        assert allowed[int(torch.argmax(logits[pos, allowed]))] == t


@pytest.mark.parametrize("split", [False, True], ids=["one-token", "two-token"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_decoding_equals_full_forward(tok, split, seed):
    model = tiny_model(tok, seed=seed).eval()
    enc = _encode(tok) if split else _one_token_encode(tok)
    trie = rating_trie(enc)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, len(tok), (12,), generator=g).tolist()
    cands = [ITEMS[int(i)] for i in torch.randperm(len(ITEMS), generator=g)]
    segs = candidate_segments(enc, cands)
    ratings, chosen = rate_constrained(model, prompt, segs, trie)
    assert len(ratings) == len(cands) and set(ratings) <= set(RATINGS)
    _full_check(model, prompt, segs, chosen, trie)
    parsed = parse_ratings(answer_text(cands, ratings), cands)
    assert (parsed.ratings, parsed.missing, parsed.garbled) == (ratings, 0, 0)


def _restricted(logits, allowed):
    return dict(zip(allowed, torch.softmax(logits[allowed].float(), 0).tolist()))


@pytest.mark.parametrize("seed", [0, 4])
def test_expected_ratings_equal_the_restricted_distribution(tok, seed):
    """The mean rating under P restricted to {-2..2}, with P(-v) = P('-') P(v | '-'), each
    from a full forward with no cache; the greedy lines (the context) are unchanged, so the
    cache crops after exploring '-' must be exact."""
    model = tiny_model(tok, seed=seed).eval()
    enc = _encode(tok)
    trie = rating_trie(enc)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, len(tok), (10,), generator=g).tolist()
    segs = candidate_segments(enc, ITEMS)
    greedy, chosen = rate_constrained(model, prompt, segs, trie)
    mean, chosen_e = rate_constrained(model, prompt, segs, trie, expected=True)
    assert chosen_e == chosen
    minus, digits = enc("-")[0], {v: enc(str(v))[0] for v in (0, 1, 2)}
    seq = list(prompt)
    for seg, toks, m in zip(segs, chosen, mean):
        seq += list(seg)
        with torch.no_grad():
            last = model(input_ids=torch.tensor([seq])).logits[0, -1]
            after = model(input_ids=torch.tensor([seq + [minus]])).logits[0, -1]
        top = _restricted(last, [minus, *digits.values()])
        neg = _restricted(after, [digits[1], digits[2]])
        want = (sum(v * top[digits[v]] for v in (1, 2))
                - top[minus] * (neg[digits[1]] + 2 * neg[digits[2]]))
        assert m == pytest.approx(want, abs=6e-5)  # 4 decimals kept: 5e-5, plus float noise
        seq += toks
    assert any(float(m) != float(round(m)) for m in mean)
    text = answer_text(ITEMS, mean)
    assert parse_ratings(text, ITEMS, fractional=True).ratings == mean
    strict = parse_ratings(text, ITEMS)
    assert strict.garbled == sum(not float(m).is_integer() for m in mean)


def test_hf_teacher_constrained_answers_and_cache_keys(tok):
    model = tiny_model(tok, seed=3, max_position_embeddings=2048).eval()
    free = HFTeacher(model, tok, name="t", max_new_tokens=8, rate_max_new_tokens=8)
    con = HFTeacher(model, tok, name="t", max_new_tokens=8, rate_max_new_tokens=8,
                    rate_decoding="constrained")
    conv = Conversation("rate these movies", {})
    r = con.rate(conv, ITEMS)
    assert r.missing == 0 and r.garbled == 0 and set(r.ratings) <= set(RATINGS)
    assert con.rate_raw_many([conv, conv], [ITEMS, ITEMS[:2]])[1] == answer_text(
        ITEMS[:2], con.rate(conv, ITEMS[:2]).ratings)
    # lists are keyed alike, ratings not: switching the rating mode re-asks no list
    assert fingerprint_for(free, "recommend") == fingerprint_for(con, "recommend")
    assert fingerprint_for(free, "rate") != fingerprint_for(con, "rate")
    exp = HFTeacher(model, tok, name="t", rate_decoding="expected").rate(conv, ITEMS)
    assert exp.missing == 0 and exp.garbled == 0 and all(-2 <= x <= 2 for x in exp.ratings)
    tight = HFTeacher(model, tok, name="t", max_context=20, rate_decoding="constrained")
    from rankgrpo.rra.teacher import ContextTooLong

    with pytest.raises(ContextTooLong, match="context of 20"):
        tight.rate(conv, ITEMS)
    with pytest.raises(ValueError, match="rate_decoding='beam'"):
        HFTeacher(model, tok, rate_decoding="beam")


def test_config_checks_rate_decoding():
    with pytest.raises(ConfigError, match="rra.rate_decoding='greedy'"):
        RRAConfig(rate_decoding="greedy").validate()
    with pytest.raises(ConfigError, match="needs rra.teacher=hf"):
        RRAConfig(rate_decoding="constrained", teacher="cooccurrence").validate()
    with pytest.raises(ConfigError, match="rate_decoding=expected needs rra.teacher=hf"):
        RRAConfig(rate_decoding="expected", teacher="endpoint", endpoint_url="http://x",
                  endpoint_model="m").validate()
    assert RRAConfig(rate_decoding="constrained").validate().rate_decoding == "constrained"
