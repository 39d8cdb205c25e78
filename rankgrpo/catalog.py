"""Item catalogs: the set of `(title, year)` pairs a recommendation may score on.

Membership is exact: case-sensitive on the title, exact on the integer year (docs/math.md
section 2). Catalogs load from TSV, CSV, JSON or JSONL, never from pickle. Every load keeps a
`LoadReport` saying how many rows were kept and which were skipped, and why.

Reddit-v2 quirk: its catalog has one row `The Wall<TAB>201` (a 3-digit year). A parsed
recommendation always carries a 4-digit year (the parse regex is `\\d{4}`), so that row can
never be matched; the default (`strict_year=True`) skips it and says so in the report
(`The Wall` 2012 and 2017 are separate rows and stay). `strict_year=False` keeps any integer
year.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text, open_text

FORMATS = ("tsv", "csv", "json", "jsonl")


@dataclass
class SkippedRow:
    """One input row the loader did not keep."""

    row: int  # 1-based line number (TSV/CSV/JSONL) or list index (JSON)
    reason: str
    raw: str


@dataclass
class LoadReport:
    """What a catalog load kept and skipped."""

    source: str
    rows: int = 0
    kept: int = 0
    duplicates: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    def summary(self) -> str:
        """One human-readable paragraph, e.g. for a CLI or a log."""
        lines = [f"catalog {self.source}: {self.rows} rows, {self.kept} kept, "
                 f"{self.duplicates} duplicate rows merged, {len(self.skipped)} skipped"]
        for s in self.skipped[:20]:
            lines.append(f"  skipped row {s.row}: {s.reason}: {s.raw!r}")
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


def _as_year(value: Any) -> int | None:
    """An integer year from an int or a digit string; None if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


class Catalog:
    """An immutable set of `(title, year)` pairs with exact membership.

    `(title, year) in catalog` accepts the year as an int or a digit string (records store
    years as strings). Iteration is in sorted order, so outputs built from it are stable.
    """

    def __init__(self, pairs: Iterable[tuple[str, int]] = (), report: LoadReport | None = None):
        self._pairs = frozenset((str(t), int(y)) for t, y in pairs)
        self.report = report
        self._by_title: dict[str, list[int]] | None = None

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            return False
        year = _as_year(item[1])
        return year is not None and (item[0], year) in self._pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(sorted(self._pairs))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and self._pairs == other._pairs

    def __hash__(self) -> int:
        return hash(self._pairs)

    def __repr__(self) -> str:
        return f"Catalog({len(self)} items)"

    @property
    def pairs(self) -> frozenset[tuple[str, int]]:
        """The underlying frozenset (fast membership for hot loops)."""
        return self._pairs

    def years(self, title: str) -> list[int]:
        """Sorted years listed for an exact title (empty if none)."""
        if self._by_title is None:
            idx: dict[str, list[int]] = {}
            for t, y in sorted(self._pairs):
                idx.setdefault(t, []).append(y)
            self._by_title = idx
        return list(self._by_title.get(title, ()))

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, Any, Any, str]], source: str,
                  strict_year: bool = True) -> Catalog:
        """Build from `(row_number, title, year, raw_text)` rows, recording what is skipped."""
        report = LoadReport(source=source)
        pairs: set[tuple[str, int]] = set()
        for row, title, year_raw, raw in rows:
            report.rows += 1
            if not isinstance(title, str) or not title.strip():
                report.skipped.append(SkippedRow(row, "empty or missing title", raw))
                continue
            year = _as_year(year_raw)
            if year_raw is None or (isinstance(year_raw, str) and not year_raw.strip()):
                report.skipped.append(SkippedRow(row, "missing year", raw))
                continue
            if year is None:
                report.skipped.append(SkippedRow(row, f"year {year_raw!r} is not an integer", raw))
                continue
            if strict_year and not 1000 <= year <= 9999:
                report.skipped.append(SkippedRow(
                    row, f"year {year_raw!r} is not a 4-digit year (a parsed recommendation "
                         "always has 4 digits, so it could never match)", raw))
                continue
            pair = (title.strip(), year)
            if pair in pairs:
                report.duplicates += 1
                continue
            pairs.add(pair)
        report.kept = len(pairs)
        return cls(pairs, report)


def _detect_format(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    ext = name.rsplit(".", 1)[-1].lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot tell the catalog format of {str(path)!r}: expected one of "
                         f"{', '.join('.' + f for f in FORMATS)} (optionally .gz), or pass "
                         "format=")
    return ext


def _delimited_rows(path: Path, delimiter: str) -> Iterator[tuple[int, Any, Any, str]]:
    with open_text(path) as f:
        if delimiter == "\t":
            # TSV is read line by line, not with csv: titles may contain quote characters
            # that csv would treat as quoting.
            lines = (line.rstrip("\r\n") for line in f)
            table = (line.split("\t") for line in lines)
        else:
            table = csv.reader(f)
        header = next(table, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        if "title" in names and "year" in names:
            ti, yi = names.index("title"), names.index("year")
            start = 2
        else:  # no header: the first row is data
            ti, yi = 0, 1
            table = _chain([header], table)
            start = 1
        for n, cells in enumerate(table, start=start):
            if not cells or all(not c.strip() for c in cells):
                continue
            raw = delimiter.join(cells)
            if len(cells) <= max(ti, yi):
                yield n, cells[ti] if ti < len(cells) else None, None, raw
                continue
            yield n, cells[ti], cells[yi], raw


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def _item_fields(obj: Any) -> tuple[Any, Any]:
    if isinstance(obj, dict):
        return obj.get("title"), obj.get("year")
    if isinstance(obj, (list, tuple)) and len(obj) == 2:
        return obj[0], obj[1]
    return None, None


def _json_rows(path: Path) -> Iterator[tuple[int, Any, Any, str]]:
    with open_text(path) as f:
        data = json.load(f)
    if isinstance(data, dict):
        data = data.get("catalog", data.get("items"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of [title, year] pairs or "
                         "{'title': ..., 'year': ...} objects (or {'catalog': [...]})")
    for i, obj in enumerate(data):
        title, year = _item_fields(obj)
        yield i, title, year, json.dumps(obj, ensure_ascii=False)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, Any, str]]:
    with open_text(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield n, None, None, line.rstrip("\n")
                continue
            title, year = _item_fields(obj)
            yield n, title, year, line.rstrip("\n")


def load_catalog(path: str | os.PathLike, *, format: str | None = None,
                 strict_year: bool = True) -> Catalog:
    """Load a catalog file; `catalog.report` says what was kept and skipped.

    Formats: TSV/CSV with a `title`/`year` header (or two columns without one), a JSON list of
    `[title, year]` or `{"title", "year"}` items, JSONL with one such item per line; any of
    them may be gzipped (`.gz`). Pickle is refused: unpickling runs arbitrary code.
    """
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        raise ValueError(f"{str(path)!r}: refusing to unpickle a catalog (pickle runs code); "
                         "convert it to TSV/JSON first")
    fmt = (format or _detect_format(path)).lower()
    if fmt == "tsv":
        rows = _delimited_rows(path, "\t")
    elif fmt == "csv":
        rows = _delimited_rows(path, ",")
    elif fmt == "json":
        rows = _json_rows(path)
    elif fmt == "jsonl":
        rows = _jsonl_rows(path)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return Catalog.from_rows(rows, source=str(path), strict_year=strict_year)


def write_catalog_tsv(catalog: Iterable[tuple[str, int]], path: str | os.PathLike) -> None:
    """Write `title<TAB>year` rows (sorted, with a header), atomically."""
    pairs = sorted({(str(t), int(y)) for t, y in catalog})
    for t, _ in pairs:
        if "\t" in t or "\n" in t:
            raise ValueError(f"title {t!r} contains a tab or newline; cannot write it as TSV")
    with atomic_write_text(path) as f:
        f.write("title\tyear\n")
        for t, y in pairs:
            f.write(f"{t}\t{y}\n")


def data_path(name: str) -> Path:
    """Path of a file shipped in the package's `data/` folder."""
    return Path(str(resources.files("rankgrpo").joinpath("data", name)))


DEFAULT_CATALOGS = {"reddit_v2": "reddit_v2_catalog.tsv", "redial": "redial_catalog.tsv"}


def load_default_catalog(name: str = "reddit_v2", *, strict_year: bool = True) -> Catalog:
    """A catalog shipped with the package: "reddit_v2" (7,403 kept of 7,404 rows) or "redial"
    (built by `rankgrpo.redial` from the ReDial movies)."""
    if name not in DEFAULT_CATALOGS:
        raise ValueError(f"unknown catalog {name!r}; shipped: {sorted(DEFAULT_CATALOGS)}")
    return load_catalog(data_path(DEFAULT_CATALOGS[name]), strict_year=strict_year)
