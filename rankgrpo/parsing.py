"""Parse a generated recommendation list into `(title, year)` items (docs/math.md section 2).

The rules, in order:
1. The text is split on `\\n` only (other line breaks such as `\\r` or U+2028 are ordinary
   whitespace); each line is stripped and blank lines are dropped, which is the same as
   collapsing runs of `\\n`.
2. Each line is cleaned: whitespace runs collapse to one space; runs of the markdown
   characters `* _ - #` are stripped from both ends and leading numbering (`1.`, `2)`,
   `3 -`; followed by whitespace, so a title like `2.0` survives; `4、` needs none) is
   removed, repeated until stable; then one pair of surrounding quotes (`"..."`, `'...'`,
   `“...”`, `‘...’`) is removed.
3. The line must match `^(.+?)\\s+\\((\\d{4})\\)` (anything may follow the year); a line that
   does not is dropped and takes no rank.
4. The title is cleaned again until stable: innermost `(...)` groups removed, whitespace
   collapsed, the markdown characters of rule 2 stripped, one pair of surrounding quotes
   removed. "Format chars" in docs/math.md section 2 means these markdown characters; Unicode
   characters are left exactly as generated (matching is exact).

`parse_lines` also returns each line's character span in the original text, so the token
alignment (`rankgrpo.alignment`) can map every parsed item to the tokens that produced it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WS = re.compile(r"\s+")
_LEAD_MARK = re.compile(r"^[*_\-#]+")
_TRAIL_MARK = re.compile(r"[*_\-#]+$")
# Numbering must be followed by whitespace: "1. Heat (1995)" loses "1. ", "2.0 (2018)" stays.
# The CJK enumeration comma is the exception: "4、Her (2013)" is written without a space.
_NUMBERING = re.compile(r"^\d+\s*(?:[.)\-—–]\s+|、\s*)")
_ITEM = re.compile(r"^(.+?)\s+\((\d{4})\)")
_PARENS = re.compile(r"\([^()]*\)")
_QUOTE_PAIRS = {('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019")}


@dataclass(frozen=True)
class ParsedLine:
    """One non-blank line of a generation.

    `start`/`end` delimit the raw line in the text, `end` including its terminating `\\n`
    when there is one. `title`/`year` are None for a line that did not parse.
    """

    start: int
    end: int
    title: str | None
    year: int | None

    @property
    def parsed(self) -> bool:
        return self.title is not None


def _collapse_ws(s: str) -> str:
    return _WS.sub(" ", s).strip()


def _strip_format(s: str) -> str:
    """Strip markdown characters from both ends and leading numbering, until stable."""
    s = s.strip()
    while True:
        new = _LEAD_MARK.sub("", s).strip()
        new = _TRAIL_MARK.sub("", new).strip()
        new = _NUMBERING.sub("", new).strip()
        if new == s:
            return s
        s = new


def _unquote_once(s: str) -> str:
    if len(s) >= 2 and (s[0], s[-1]) in _QUOTE_PAIRS:
        return s[1:-1]
    return s


def clean_line(line: str) -> str:
    """Rule 2: the cleaned form of one raw line."""
    return _unquote_once(_strip_format(_collapse_ws(line)))


def clean_title(title: str) -> str:
    """Rule 4: clean a matched title until it no longer changes."""
    while True:
        new = _unquote_once(_strip_format(_collapse_ws(_PARENS.sub("", title.strip()))))
        if new == title:
            return title
        title = new


def parse_line(line: str) -> tuple[str, int] | None:
    """Parse one line into `(title, year)`, or None if it does not match."""
    m = _ITEM.match(clean_line(line))
    if m is None:
        return None
    return clean_title(m.group(1)), int(m.group(2))


def parse_lines(text: str) -> list[ParsedLine]:
    """Every non-blank line of `text` with its span and parse result, in order."""
    out: list[ParsedLine] = []
    pos = 0
    n = len(text)
    while pos < n:
        nl = text.find("\n", pos)
        end = n if nl < 0 else nl + 1
        line = text[pos:end]
        if line.strip():
            item = parse_line(line)
            title, year = (item if item is not None else (None, None))
            out.append(ParsedLine(pos, end, title, year))
        pos = end
    return out


def parse_recommendations(text: str) -> list[tuple[str, int]]:
    """All parsed `(title, year)` items of a generation, in order (docs/math.md section 2).

    No truncation here: the reward and the metrics take the first N.
    """
    return [(p.title, p.year) for p in parse_lines(text) if p.title is not None]
