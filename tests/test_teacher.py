"""SFT targets: the pluggable teacher, the popularity teacher and the co-occurrence teacher."""

from rankgrpo.catalog import Catalog
from rankgrpo.parsing import parse_recommendations
from rankgrpo.teacher import (
    CooccurrenceTeacher,
    PopularityTeacher,
    Teacher,
    build_sft_targets,
    format_completion,
    round_trips,
)

CAT = Catalog([("A", 2000), ("B", 2001), ("C", 2002), ("D", 2003), ("E", 2004),
               ("F (film)", 2005), ("G", 2006)])


def rec(dialog, gt, seen=()):
    return {"prompt": "p", "completion": "", "dialog_id": dialog, "seen_titles": list(seen),
            "groundtruth_with_release_year": [[t, str(y)] for t, y in gt]}


TRAIN = [
    rec("d1", [("A", 2000)], seen=["B"]),     # A-B co-occur in d1
    rec("d1", [("C", 2002)], seen=["A", "B"]),  # d1 = {A, B, C}
    rec("d2", [("A", 2000), ("D", 2003)]),    # d2 = {A, D}
    rec("d3", [("D", 2003)], seen=["E"]),     # d3 = {D, E}
    rec("d4", [("D", 2003)]),
]


def test_format_and_round_trip():
    assert format_completion([("A", 2000), ("B", 2001)]) == "A (2000)\nB (2001)"
    assert round_trips(("Heat", 1995)) and round_trips(("'71", 2014))
    assert not round_trips(("F (film)", 2005))  # the parse would drop "(film)"
    assert not round_trips(('"Quoted"', 2000))


def test_popularity_teacher():
    pop = PopularityTeacher.from_records(TRAIN, CAT)
    # mentions per record: D 3, A 3, B 2, C 1, E 1; never named items follow sorted
    assert pop.ranking[:5] == [("A", 2000), ("D", 2003), ("B", 2001), ("C", 2002), ("E", 2004)]
    assert pop(rec("x", []), 3) == [("A", 2000), ("D", 2003), ("B", 2001)]
    assert pop(rec("x", [], seen=["A"]), 2) == [("D", 2003), ("B", 2001)]
    # "F (film)" can never be matched, so it is never recommended; 6 usable items in all
    assert len(pop(rec("x", []), 20)) == 6 and ("F (film)", 2005) not in pop(rec("x", []), 20)


def test_cooccurrence_teacher():
    t = CooccurrenceTeacher.from_records(TRAIN, CAT)
    # ground truth first (dedup), then neighbours of {B (gt), A (seen)}: co-occurrence
    # counts C: 1 (A) + 1 (B) = 2, D: 1 (A) = 1, then popularity fills (E, G)
    out = t(rec("x", [("B", 2001), ("B", 2001)], seen=["A"]), 5)
    assert out == [("B", 2001), ("C", 2002), ("D", 2003), ("E", 2004), ("G", 2006)]
    # seen titles never appear, even when they are ground truth
    assert t(rec("x", [("A", 2000)], seen=["A"]), 2) == [("D", 2003), ("B", 2001)]
    # ground truth outside the catalog is skipped (catalog-grounded lists)
    assert t(rec("x", [("Z", 1990)]), 1) == [("A", 2000)]


def test_teacher_is_pluggable():
    def fixed(record, n):
        return [("G", 2006)] * n

    assert isinstance(fixed, Teacher)
    out = build_sft_targets([rec("x", [])], fixed, n=2)
    assert out[0]["completion"] == "G (2006)\nG (2006)"
    assert parse_recommendations(out[0]["completion"]) == [("G", 2006)] * 2
