"""Catalog loading (all formats, the load report) and Reddit-v2 records IO and validation."""

import gzip
import json
import os

import pytest

from rankgrpo.catalog import (
    Catalog,
    load_catalog,
    load_default_catalog,
    write_catalog_tsv,
)
from rankgrpo.records import (
    RecordError,
    groundtruth_pairs,
    load_records,
    prompt_messages,
    prompt_text,
    read_jsonl,
    validate_record,
    write_jsonl,
)

# ------------------------------------------------------------------ catalog


def test_default_reddit_catalog_skips_the_three_digit_year():
    cat = load_default_catalog("reddit_v2")
    rep = cat.report
    assert rep.rows == 7404 and rep.kept == 7403 == len(cat)
    assert [(s.row, s.raw) for s in rep.skipped] == [(6626, "The Wall\t201")]
    assert "4-digit" in rep.skipped[0].reason and "skipped" in rep.summary()
    assert ("The Wall", 2012) in cat and ("The Wall", "2017") in cat
    assert ("The Wall", 201) not in cat and ("the wall", 2012) not in cat
    assert ("'71", 2014) in cat
    kept = load_default_catalog("reddit_v2", strict_year=False)
    assert len(kept) == 7404 and ("The Wall", 201) in kept


def test_formats_agree(tmp_path):
    pairs = [("Heat", 1995), ("Amélie", 2001), ('Say "Hi"', 2000), ("A, B", 1990)]
    (tmp_path / "c.tsv").write_text("title\tyear\n" + "".join(f"{t}\t{y}\n" for t, y in pairs))
    import csv
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["year", "title"])  # header order does not matter
        w.writerows([(y, t) for t, y in pairs])
    (tmp_path / "c.json").write_text(json.dumps([[t, str(y)] for t, y in pairs]))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"title": t, "year": y}) + "\n"
                                              for t, y in pairs))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write((tmp_path / "c.jsonl").read_text())
    expected = Catalog(pairs)
    for name in ("c.tsv", "c.csv", "c.json", "c.jsonl", "c.jsonl.gz"):
        cat = load_catalog(tmp_path / name)
        assert cat == expected, name
        assert cat.report.kept == 4 and not cat.report.skipped
    write_catalog_tsv(expected, tmp_path / "out.tsv")
    assert load_catalog(tmp_path / "out.tsv") == expected


def test_catalog_report_reasons(tmp_path):
    (tmp_path / "c.tsv").write_text(
        "title\tyear\nHeat\t1995\nHeat\t1995\n\t2000\nNo year\t\nBad\tabc\nOnly title\n")
    cat = load_catalog(tmp_path / "c.tsv")
    assert len(cat) == 1 and cat.report.duplicates == 1
    reasons = [s.reason for s in cat.report.skipped]
    assert reasons[0] == "empty or missing title"
    assert reasons[1:] == ["missing year", "year 'abc' is not an integer", "missing year"]


def test_catalog_refuses_pickle_and_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unpickle"):
        load_catalog(tmp_path / "gt_catalog.pkl")
    with pytest.raises(ValueError, match="format"):
        load_catalog(tmp_path / "c.parquet")


def test_catalog_set_behaviour():
    cat = Catalog([("B", 2000), ("A", 1999), ("A", 2001)])
    assert list(cat) == [("A", 1999), ("A", 2001), ("B", 2000)]
    assert cat.years("A") == [1999, 2001] and cat.years("C") == []
    assert ("A", "1999") in cat and ("A", " x") not in cat and "A" not in cat
    assert ("A", True) not in cat


# ------------------------------------------------------------------ records

REC = {
    "prompt": "Pretend you are a movie recommender system.\n...USER: hi\n",
    "completion": "Heat (1995)\nAlien (1979)",
    "seen_titles": ["Up"],
    "groundtruth_with_release_year": [["Heat", "1995"]],
    "dialog_id": "d1",
}


def test_jsonl_roundtrip_plain_and_gz(tmp_path):
    recs = [REC, dict(REC, prompt=[{"role": "user", "content": "hi"}])]
    for name in ("r.jsonl", "r.jsonl.gz"):
        assert write_jsonl(recs, tmp_path / name) == 2
        assert read_jsonl(tmp_path / name) == recs
        assert load_records(tmp_path / name) == recs
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "r.jsonl.gz"]  # no temp files left
    assert load_records(tmp_path, "r") == recs


def test_write_is_atomic_on_failure(tmp_path):
    write_jsonl([REC], tmp_path / "r.jsonl")
    with pytest.raises(TypeError):
        write_jsonl([REC, dict(REC, extra=object())], tmp_path / "r.jsonl")
    assert read_jsonl(tmp_path / "r.jsonl") == [REC]  # the old file is untouched
    assert os.listdir(tmp_path) == ["r.jsonl"]


@pytest.mark.parametrize("change, field, words", [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": [{"role": "user"}]}, "prompt", "message 0"),
    ({"completion": None}, "completion", "string"),
    ({"seen_titles": "Up"}, "seen_titles", "list"),
    ({"seen_titles": ["Up", 3]}, "seen_titles", "item 1"),
    ({"groundtruth_with_release_year": [["Heat", "1995"], ["Heat"]]},
     "groundtruth_with_release_year", "item 1"),
    ({"groundtruth_with_release_year": [["Heat", "19x5"]]},
     "groundtruth_with_release_year", "digit-string year"),
])
def test_validation_names_record_and_field(change, field, words):
    with pytest.raises(RecordError) as e:
        validate_record(dict(REC, **change), index=7)
    assert e.value.index == 7 and e.value.field == field
    assert f"record 7, field {field!r}" in str(e.value) and words in str(e.value)


def test_validation_missing_field_and_bad_json(tmp_path):
    bad = {k: v for k, v in REC.items() if k != "seen_titles"}
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(REC) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"r.jsonl: record 1, field 'seen_titles': missing"):
        read_jsonl(p)
    assert len(read_jsonl(p, validate=False)) == 2
    p.write_text("{not json\n")
    with pytest.raises(RecordError, match="line 1 is not valid JSON"):
        read_jsonl(p)


def test_prompt_helpers():
    assert prompt_text(REC) == REC["prompt"]
    assert prompt_messages(REC) == [{"role": "user", "content": REC["prompt"]}]
    chat = dict(REC, prompt=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert prompt_text(chat) == "u" and prompt_messages(chat)[0]["role"] == "system"
    assert groundtruth_pairs(REC) == [("Heat", 1995)]


def test_save_to_disk_roundtrip(tmp_path):
    pytest.importorskip("datasets")
    from rankgrpo.records import load_from_disk, save_to_disk

    recs = [REC, dict(REC, groundtruth_with_release_year=[["Up", 2009]], dialog_id="d2")]
    save_to_disk(recs, tmp_path / "ds")
    out = load_from_disk(tmp_path / "ds")
    assert out[1]["groundtruth_with_release_year"] == [["Up", "2009"]]  # years as strings
    assert out[0] == REC
    save_to_disk({"train": recs, "test": recs[:1]}, tmp_path / "dd")
    save_to_disk({"train": recs, "test": recs[:1]}, tmp_path / "dd")  # replaces in place
    assert load_records(tmp_path / "dd", "test") == [REC]
    assert sorted(load_from_disk(tmp_path / "dd")) == ["test", "train"]
    with pytest.raises(ValueError, match="split"):
        load_records(tmp_path / "dd")
    assert sorted(os.listdir(tmp_path)) == ["dd", "ds"]
