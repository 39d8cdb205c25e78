"""Reflect (Eq. 11): the teacher rates the top remapped candidates, `s_reflect = s_remap +
gamma * r` (docs/rra/README.md).

The teacher answers one line per candidate, `title (year)####rating` with the rating in
{-2, -1, 0, 1, 2}. `parse_ratings` reads that robustly: numbering, markdown and quotes
around the title are tolerated (the project's list parser), the separator may be 2-4 `#`
characters, and a line that cannot be read, names no candidate or carries a rating outside
the range is counted as garbled. Candidates the teacher did not rate get 0 and are counted as
missing, so nothing disappears silently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..parsing import parse_line

RATINGS = (-2, -1, 0, 1, 2)
_SEP = re.compile(r"#{2,4}")
_RATING = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)(?:\s*/\s*\d+)?\s*[.)*]*\s*$")

RATE_PROMPT = (
    "Pretend you are a movie recommender system.\n"
    "I will give you a conversation between a user and you (a recommender system), and a "
    "list of candidate movies. Rate how well each candidate fits the user's request on a "
    "scale of -2 (very bad), -1 (bad), 0 (neutral), 1 (good), 2 (very good). Answer one line "
    "per candidate, in the same order, in the form title (year)####rating, with NO extra "
    "words or sentences.\n"
    "Here is the conversation: {conversation}\n"
    "Here are the candidates:\n{candidates}\n"
)


def rate_prompt(conversation: str, candidates: Sequence[tuple[str, int]]) -> str:
    """The rating request sent to an LLM teacher."""
    lines = "\n".join(f"{t} ({y})" for t, y in candidates)
    return RATE_PROMPT.format(conversation=conversation.strip(), candidates=lines)


@dataclass
class Ratings:
    """Parsed ratings for the candidates of one conversation.

    `ratings[i]` belongs to `candidates[i]` (0 when missing); `missing` counts candidates
    with no readable rating, `garbled` counts answer lines that could not be used.
    """

    ratings: list[float]  # ints, or fractional ones from `parse_ratings(fractional=True)`
    missing: int = 0
    garbled: int = 0
    garbled_lines: list[str] = field(default_factory=list)


def _match(item: tuple[str, int] | None, title_only: str | None,
           exact: dict[tuple[str, int], int], by_title: dict[str, list[int]]) -> int | None:
    if item is not None and item in exact:
        return exact[item]
    title = item[0] if item is not None else title_only
    if title is not None:
        hits = by_title.get(title.casefold(), [])
        if len(hits) == 1:  # a unique title is enough; an ambiguous one is not
            return hits[0]
    return None


def parse_ratings(text: str, candidates: Sequence[tuple[str, int]], *,
                  fractional: bool = False) -> Ratings:
    """Ratings in {-2..2} for `candidates` from a teacher's `title (year)####rating` lines.

    The first readable rating of a candidate wins; later repeats count as garbled. With
    `fractional` (the answers of `rate_decoding=expected`) a rating may be any number in
    [-2, 2]; otherwise a fractional one is garbled.
    """
    exact = {(str(t), int(y)): i for i, (t, y) in reversed(list(enumerate(candidates)))}
    by_title: dict[str, list[int]] = {}
    for i, (t, _) in enumerate(candidates):
        by_title.setdefault(str(t).casefold(), []).append(i)
    got: dict[int, int] = {}
    garbled: list[str] = []
    for line in (text or "").split("\n"):
        if not line.strip():
            continue
        parts = _SEP.split(line)
        if len(parts) < 2:
            garbled.append(line)
            continue
        head, tail = "#".join(parts[:-1]), parts[-1]
        m = _RATING.match(tail)
        value = float(m.group(1)) if m else None
        if value is None or not (RATINGS[0] <= value <= RATINGS[-1]) or (
                not fractional and not value.is_integer()):
            garbled.append(line)
            continue
        item = parse_line(head)
        idx = _match(item, head.strip().strip("\"'*") or None, exact, by_title)
        if idx is None or idx in got:
            garbled.append(line)
            continue
        got[idx] = int(value) if value.is_integer() else value
    ratings = [got.get(i, 0) for i in range(len(candidates))]
    return Ratings(ratings, missing=len(candidates) - len(got), garbled=len(garbled),
                   garbled_lines=garbled[:5])


def reflect_scores(remap: torch.Tensor, candidate_ids: Sequence[int], ratings: Sequence[int],
                   *, gamma: float = 0.5) -> torch.Tensor:
    """Eq. 11: `s_reflect = s_remap + gamma * r`, `r` zero outside the rated candidates.

    Args:
        remap: [C] remap scores of one conversation.
        candidate_ids: catalog columns of the rated candidates.
        ratings: one rating in [-2, 2] per candidate (an integer, or fractional from
            `rate_decoding=expected`).
    Returns:
        [C] tensor (a new one; `remap` is not modified).
    """
    if len(candidate_ids) != len(ratings):
        raise ValueError(f"{len(candidate_ids)} candidates but {len(ratings)} ratings")
    r = torch.zeros_like(remap)
    if len(candidate_ids):
        bad = [x for x in ratings if not RATINGS[0] <= x <= RATINGS[-1]]
        if bad:
            raise ValueError(f"ratings must be in [{RATINGS[0]}, {RATINGS[-1]}], got {bad[:5]}")
        r[torch.as_tensor(list(candidate_ids), dtype=torch.long)] = torch.as_tensor(
            list(ratings), dtype=remap.dtype)
    return remap + gamma * r
