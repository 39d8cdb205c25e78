"""ReDial conversion: counts, split by dialogue, role rebuilding, entity resolution, and the
shipped converted data equal to a fresh conversion of the shipped raw files."""

import pytest

from rankgrpo.catalog import Catalog
from rankgrpo.parsing import parse_recommendations
from rankgrpo.prompts import PROMPT_PREFIX, SYSTEM, USER, build_prompt
from rankgrpo.records import validate_records
from rankgrpo.redial import (
    SPLITS,
    EntityResolver,
    RedialRaw,
    conversation_turns,
    convert_redial,
    load_default_redial,
    load_default_redial_catalog,
    load_default_redial_report,
    load_raw,
    split_dialogues,
    text_mention,
    unescape,
    uri_label,
)


@pytest.fixture(scope="module")
def raw():
    return load_raw()


@pytest.fixture(scope="module")
def conv(raw):
    return convert_redial(raw)


def test_conversion_counts(conv):
    rep = conv.report
    assert (rep.rows, rep.dialogues) == (3552, 1322)
    assert rep.records_kept == 3141
    assert rep.records_dropped == {"empty_conversation": 52, "empty_ground_truth": 359}
    assert rep.records_kept + sum(rep.records_dropped.values()) == rep.rows
    assert (rep.groundtruth_items, rep.groundtruth_kept) == (4778, 4115)
    assert rep.groundtruth_dropped == {"already_seen": 476, "duplicate": 13, "no_year": 129,
                                       "not_a_movie": 45}
    assert rep.groundtruth_kept + sum(rep.groundtruth_dropped.values()) == 4778
    assert rep.catalog_size == len(conv.catalog) == 2632
    assert rep.splits == {"train": {"records": 2503, "dialogues": 1050},
                          "valid": {"records": 305, "dialogues": 131},
                          "test": {"records": 333, "dialogues": 131}}
    assert "records kept: 3141" in rep.summary()


def test_no_dialogue_in_two_splits(conv):
    ids = {s: {r["dialog_id"] for r in recs} for s, recs in conv.splits.items()}
    assert not ids["train"] & ids["valid"]
    assert not ids["train"] & ids["test"]
    assert not ids["valid"] & ids["test"]


def test_split_is_seeded_and_by_dialogue(raw):
    ids = [r["dialog_id"] for r in raw.rows]
    a = split_dialogues(ids, seed=0)
    assert a == split_dialogues(list(reversed(ids)), seed=0)  # input order does not matter
    b = split_dialogues(ids, seed=1)
    assert a != b
    assert sorted(a) == sorted(set(ids))
    counts = {s: sum(v == s for v in a.values()) for s in SPLITS}
    assert counts == {"train": 1058, "valid": 132, "test": 132}
    with pytest.raises(ValueError, match="fractions"):
        split_dialogues(ids, fractions=(1.0, 0.0))


def test_shipped_data_is_this_conversion(conv):
    shipped = load_default_redial()
    assert set(shipped) == set(SPLITS)
    for s in SPLITS:
        assert shipped[s] == conv.splits[s], s
    assert load_default_redial_catalog() == conv.catalog
    report = load_default_redial_report()
    assert report["records_kept"] == 3141 and report["splits"] == conv.report.splits
    assert load_default_redial("valid") == conv.splits["valid"]
    with pytest.raises(ValueError, match="split"):
        load_default_redial("dev")


def test_records_are_well_formed(conv):
    cat = conv.catalog
    for s, recs in conv.splits.items():
        validate_records(recs, s)
        for r in recs:
            gt = [(t, int(y)) for t, y in r["groundtruth_with_release_year"]]
            assert gt and all(p in cat for p in gt)
            assert not {t for t, _ in gt} & set(r["seen_titles"])
            assert r["prompt"].startswith(PROMPT_PREFIX.format(num_ranks=20))
            assert r["prompt"].endswith("\n")
            last = r["prompt"].rstrip("\n").split("\n")[-1]
            assert last.startswith(("USER: ", "Here is the conversation: USER: "))
            items = parse_recommendations(r["completion"])
            assert len(items) == 20 == len(set(items))
            assert items[:len(gt)] == gt  # the teacher puts the ground truth first
            assert all(p in cat for p in items)
            assert not {t for t, _ in items} & set(r["seen_titles"])


def test_roles_rebuilt_from_context():
    assert conversation_turns(["", "hi", "hello", "any comedies?"]) == [
        (USER, "hi"), (SYSTEM, "hello"), (USER, "any comedies?")]
    # the recommender opened: CRSLab's `input` would call "Hello!" the user
    assert conversation_turns(["", "Hello!", "Hi", "What do you like?", "Horror"]) == [
        (SYSTEM, "Hello!"), (USER, "Hi"), (SYSTEM, "What do you like?"), (USER, "Horror")]
    assert conversation_turns([""]) == []
    prompt = build_prompt(conversation_turns(["", "hi %3F"]))
    assert prompt.endswith("Here is the conversation: USER: hi ?\n")


def test_previous_reply_is_a_system_turn_in_the_next_row(raw):
    by_dialog = {}
    for r in raw.rows:
        by_dialog.setdefault(r["dialog_id"], []).append(r)
    checked = 0
    for rows in by_dialog.values():
        for a, b in zip(rows, rows[1:]):
            if a["resp"].strip():
                turns = conversation_turns(b["context"])
                idx = len([u for u in b["context"][:len(a["context"]) + 1] if u.strip()]) - 1
                assert turns[idx] == (SYSTEM, unescape(a["resp"]).strip())
                checked += 1
    assert checked > 2000


def test_text_helpers():
    assert unescape("What About Bob%3F (1991)") == "What About Bob? (1991)"
    assert unescape("100% sure") == "100% sure"
    assert uri_label("<http://dbpedia.org/resource/Speed_(1994_film)>") == ("Speed", "1994 film")
    assert uri_label("<http://dbpedia.org/resource/O_Brother,_Where_Art_Thou%3F>") == (
        "O Brother, Where Art Thou?", None)
    assert text_mention("I haven't seen the Get Out (2017) i heard", "Get Out") == (
        "Get Out", 2017)
    assert text_mention("The Good, the Bad and the Ugly (1966) Is super",
                        "The Good, the Bad and the Ugly") == ("The Good, the Bad and the Ugly",
                                                              1966)
    assert text_mention("have you seen The Conjuring (2013) ?", "Conjuring") == (
        "The Conjuring", 2013)
    assert text_mention("A Nightmare on Elm Street (1984)", "Street") == ("Street", 1984)
    known = {"anightmareonelmstreet"}
    assert text_mention("A Nightmare on Elm Street (1984)", "Street", known) is None
    assert text_mention("A Nightmare on Elm Street (1984) or Street (2015)", "Street",
                        known) == ("Street", 2015)
    assert text_mention("no year here", "Heat") is None


def _tiny_raw():
    e2i = {"<http://dbpedia.org/resource/Heat_(1995_film)>": 1,
           "<http://dbpedia.org/resource/Alien_(film)>": 2,
           "<http://dbpedia.org/resource/Thor_(volcano)>": 3,
           "<http://dbpedia.org/resource/Big_Lebowski>": 4,
           "<http://dbpedia.org/resource/Speed_(1994_film)>": 5,
           "<http://dbpedia.org/resource/Comedy>": 6}
    rows = [
        {"dialog_id": "d1", "turn_id": 1, "is_user": 0, "context": ["", "hi, a comedy?"],
         "resp": "Try Alien (1979) or Thor or The Big Lebowski", "rec": [2, 3, 4],
         "entity": [2, 3, 4, 6], "prev_entity": [6], "entity_name": ["Alien (1979)", "Thor"]},
        {"dialog_id": "d1", "turn_id": 2, "is_user": 0,
         "context": ["", "hi, a comedy?", "Try Alien (1979) or Thor or The Big Lebowski",
                     "seen Alien"],
         "resp": "Then Heat (1995) or Alien (1979) or Speed", "rec": [1, 2, 5],
         "entity": [1, 2, 5], "prev_entity": [6, 2, 3, 4], "entity_name": []},
    ]
    return RedialRaw(rows, e2i, {1, 2, 3, 4, 5})


def test_tiny_conversion_by_hand():
    raw = _tiny_raw()
    res = EntityResolver(raw)
    assert res.resolve(3, raw.rows[0], raw.rows[0]["resp"]) == (None, "not_a_movie")
    assert res.resolve(4, raw.rows[0], raw.rows[0]["resp"]) == (None, "no_year")
    assert res.resolve(5, raw.rows[1], raw.rows[1]["resp"]) == (("Speed", 1994), "uri_year")
    assert res.resolve(1, raw.rows[1], raw.rows[1]["resp"]) == (("Heat", 1995), "turn_text")
    assert res.resolve(6, raw.rows[0], "") == (None, "not_a_movie")
    conv = convert_redial(raw, fractions=(1, 0, 0))
    recs = conv.splits["train"]
    assert [r["groundtruth_with_release_year"] for r in recs] == [
        [["Alien", "1979"]], [["Heat", "1995"], ["Speed", "1994"]]]
    assert recs[1]["seen_titles"] == ["Alien", "Thor", "Big Lebowski"]
    assert conv.report.groundtruth_dropped == {"not_a_movie": 1, "no_year": 1,
                                               "already_seen": 1}
    assert conv.catalog == Catalog([("Alien", 1979), ("Heat", 1995), ("Speed", 1994)])
    assert recs[1]["prompt"].endswith(
        "USER: hi, a comedy?\nSYSTEM: Try Alien (1979) or Thor or The Big Lebowski\n"
        "USER: seen Alien\n")
    assert conv.report.seen_entities_not_movies == 2
