"""SFT targets for stage 1: catalog-grounded N-item lists from a simple recommender.

The paper builds its demonstrations with a strong teacher LLM (Remap-Reflect-Adjust); offline
we have none, so the default teacher is a small recommender over the training records:
the record's ground truth first, then movies that co-occur with the conversation's movies
in other dialogues, then the most popular movies. Every item comes from the catalog and is
never a title the user already mentioned. Any callable `(record, n) -> [(title, year), ...]`
can stand in (the `Teacher` protocol), e.g. an LLM wrapped to return parsed items.

`PopularityTeacher` is the deliberately weak teacher: the same popular list for every
conversation (minus seen titles). It is also the popularity baseline for evaluation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .parsing import parse_line

Item = tuple[str, int]


@runtime_checkable
class Teacher(Protocol):
    """Anything that recommends `n` catalog items for a record."""

    def __call__(self, record: Mapping[str, Any], n: int) -> list[Item]: ...


def format_completion(items: Iterable[Item]) -> str:
    """N lines `Title (Year)` joined by `\\n`, no numbering, no trailing newline
    (docs/math.md section 1)."""
    return "\n".join(f"{t} ({y})" for t, y in items)


def round_trips(item: Item) -> bool:
    """True if `Title (Year)` parses back to the same item (a title holding `(...)`, leading
    numbering or surrounding quotes would not, so it could never be matched)."""
    return parse_line(f"{item[0]} ({item[1]})") == (item[0], int(item[1]))


def _gt_items(record: Mapping[str, Any]) -> list[Item]:
    out = []
    for t, y in record.get("groundtruth_with_release_year", ()):
        try:
            out.append((str(t), int(str(y).strip())))
        except ValueError:
            continue
    return out


def _title_index(catalog: Iterable[Item]) -> dict[str, list[Item]]:
    idx: dict[str, list[Item]] = {}
    for t, y in sorted(catalog):
        idx.setdefault(t, []).append((t, int(y)))
    return idx


class _Picker:
    """Collects up to n distinct usable items, skipping seen titles."""

    def __init__(self, record: Mapping[str, Any], n: int, allowed: set[Item]):
        self.seen = set(record.get("seen_titles", ()))
        self.n, self.allowed = n, allowed
        self.items: list[Item] = []
        self._have: set[Item] = set()

    def add(self, items: Iterable[Item]) -> bool:
        """Add in order; returns True once the list is full."""
        for it in items:
            if len(self.items) >= self.n:
                return True
            if it in self._have or it[0] in self.seen or it not in self.allowed:
                continue
            self._have.add(it)
            self.items.append(it)
        return len(self.items) >= self.n


class PopularityTeacher:
    """The same most-popular list for every record (seen titles removed)."""

    def __init__(self, ranking: Sequence[Item]):
        self.ranking = [(str(t), int(y)) for t, y in ranking]
        self._allowed = {it for it in self.ranking if round_trips(it)}

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]],
                     catalog: Iterable[Item]) -> PopularityTeacher:
        """Rank catalog items by how many records name them as ground truth or seen; items
        never named follow in sorted order so a list of any length can be filled."""
        catalog = sorted((str(t), int(y)) for t, y in catalog)
        by_title = _title_index(catalog)
        allowed = set(catalog)
        counts: Counter[Item] = Counter()
        for r in records:
            named = {it for it in _gt_items(r) if it in allowed}
            for title in r.get("seen_titles", ()):
                named.update(by_title.get(title, ()))
            counts.update(named)
        ranking = sorted(catalog, key=lambda it: (-counts[it], it))
        return cls(ranking)

    def __call__(self, record: Mapping[str, Any], n: int) -> list[Item]:
        pick = _Picker(record, n, self._allowed)
        pick.add(self.ranking)
        return pick.items


class CooccurrenceTeacher:
    """Ground truth first, then co-occurrence neighbours, then popularity.

    Co-occurrence counts how many dialogues (records sharing `group_key`, or single records
    without it) mention both movies, as ground truth or as seen titles. A record's
    neighbours are scored by the summed co-occurrence with its seen and ground-truth movies;
    ties go to the more popular item, then the title.
    """

    def __init__(self, cooccurrence: Mapping[Item, Counter], popularity: PopularityTeacher,
                 catalog: Iterable[Item]):
        self.cooccurrence = cooccurrence
        self.popularity = popularity
        self._by_title = _title_index(catalog)
        self._allowed = {it for items in self._by_title.values() for it in items
                         if round_trips(it)}
        self._pop_rank = {it: i for i, it in enumerate(popularity.ranking)}

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], catalog: Iterable[Item],
                     group_key: str = "dialog_id") -> CooccurrenceTeacher:
        """Fit on training records (never on the test split)."""
        catalog = sorted((str(t), int(y)) for t, y in catalog)
        by_title = _title_index(catalog)
        allowed = set(catalog)
        groups: dict[Any, set[Item]] = {}
        for i, r in enumerate(records):
            key = r.get(group_key, ("record", i))
            bag = groups.setdefault(key, set())
            bag.update(it for it in _gt_items(r) if it in allowed)
            for title in r.get("seen_titles", ()):
                bag.update(by_title.get(title, ()))
        cooc: dict[Item, Counter] = {}
        for bag in groups.values():
            for a in bag:
                c = cooc.setdefault(a, Counter())
                c.update(b for b in bag if b != a)
        return cls(cooc, PopularityTeacher.from_records(records, catalog), catalog)

    def __call__(self, record: Mapping[str, Any], n: int) -> list[Item]:
        pick = _Picker(record, n, self._allowed)
        gt = _gt_items(record)
        if pick.add(gt):
            return pick.items
        anchors = set(gt)
        for title in record.get("seen_titles", ()):
            anchors.update(self._by_title.get(title, ()))
        scores: Counter[Item] = Counter()
        for a in anchors:
            scores.update(self.cooccurrence.get(a, {}))
        last = len(self._pop_rank)
        neighbours = sorted(scores, key=lambda it: (-scores[it], self._pop_rank.get(it, last), it))
        if pick.add(neighbours):
            return pick.items
        pick.add(self.popularity.ranking)
        return pick.items


def build_sft_targets(records: Iterable[Mapping[str, Any]], teacher: Teacher,
                      n: int = 20) -> list[dict[str, Any]]:
    """Copies of `records` whose `completion` is the teacher's list, formatted as
    docs/math.md section 1."""
    out = []
    for r in records:
        rec = dict(r)
        rec["completion"] = format_completion(teacher(r, n))
        out.append(rec)
    return out
