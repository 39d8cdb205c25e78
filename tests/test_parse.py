"""docs/math.md section 2 parse: one fixture per rule, on messy generated text."""

import pytest

from rankgrpo.parsing import clean_title, parse_line, parse_lines
from rankgrpo.rewards import parse_recommendations


@pytest.mark.parametrize("text, expected", [
    # the well-formed output of docs/math.md section 1
    ("Heat (1995)\nAlien (1979)", [("Heat", 1995), ("Alien", 1979)]),
    # blank lines and runs of newlines collapse; whitespace-only lines are blank
    ("Heat (1995)\n\n\n  \nAlien (1979)\n", [("Heat", 1995), ("Alien", 1979)]),
    # trailing newline
    ("Heat (1995)\nAlien (1979)\n", [("Heat", 1995), ("Alien", 1979)]),
    # numbering 1. 2) 3 - 4、
    ("1. Heat (1995)\n2) Alien (1979)\n3 - Up (2009)\n4、Her (2013)",
     [("Heat", 1995), ("Alien", 1979), ("Up", 2009), ("Her", 2013)]),
    # markdown bold, italics, bullets, headings
    ("**Heat (1995)**\n* Alien (1979)\n- _Up (2009)_\n### Her (2013)\n1. **Jaws (1975)**",
     [("Heat", 1995), ("Alien", 1979), ("Up", 2009), ("Her", 2013), ("Jaws", 1975)]),
    # the prompt's own form: "movie name" (release_year); quotes around the whole line
    ('"Heat" (1995)\n"Alien (1979)"\n\u201cUp\u201d (2009)',
     [("Heat", 1995), ("Alien", 1979), ("Up", 2009)]),
    # whitespace collapses inside the title
    ("The   Dark\tKnight (2008)", [("The Dark Knight", 2008)]),
    # nested parentheses and extra groups are removed from the title
    ("Amores perros (Love's a Bitch (2000 cut)) (2000)", [("Amores perros", 2000)]),
    ("Seven (Se7en) (1995) - a thriller", [("Seven", 1995)]),
    # lines without a 4-digit year in parentheses are dropped (take no rank)
    ("Here are my picks:\nHeat (1995)\nAlien\nUp (09)\nHer(2013)\nJaws (1975)",
     [("Heat", 1995), ("Jaws", 1975)]),
    # non-ASCII titles are kept exactly
    ("Amélie (2001)\n千と千尋の神隠し (2001)\nLéon: The Professional (1994)",
     [("Amélie", 2001), ("千と千尋の神隠し", 2001), ("Léon: The Professional", 1994)]),
    # a title starting with an apostrophe or digits survives (only paired quotes go)
    ("'71 (2014)\n2.0 (2018)\n10,000 BC (2008)",
     [("'71", 2014), ("2.0", 2018), ("10,000 BC", 2008)]),
    # \r is whitespace, not a line break
    ("Heat (1995)\r\nAlien (1979)\r\n", [("Heat", 1995), ("Alien", 1979)]),
    ("", []),
    ("\n\n", []),
])
def test_parse_recommendations(text, expected):
    assert parse_recommendations(text) == expected


def test_duplicates_and_more_than_n_are_kept_by_the_parse():
    # The parse never truncates or deduplicates: the reward takes the first N and handles
    # repeats through multiset consumption.
    text = "\n".join(["Heat (1995)"] * 3 + [f"Movie {i} (2000)" for i in range(30)])
    items = parse_recommendations(text)
    assert len(items) == 33 and items[:3] == [("Heat", 1995)] * 3


def test_truncated_last_line_is_dropped():
    # generation cut off mid-item (no EOS): the partial line does not parse
    assert parse_recommendations("Heat (1995)\nAlien (19") == [("Heat", 1995)]


def test_parse_lines_spans_cover_raw_lines():
    text = "\n1. Heat (1995)\n\nnot a movie\nAlien (1979)"
    lines = parse_lines(text)
    assert [(text[p.start:p.end], p.title) for p in lines] == [
        ("1. Heat (1995)\n", "Heat"), ("not a movie\n", None), ("Alien (1979)", "Alien")]


def test_clean_title_is_stable():
    assert clean_title('"**Heat**"') == "Heat"
    assert clean_title(clean_title("'Heat'")) == "Heat"
    assert parse_line("   ") is None
