"""Offline evaluation: Recall@K and NDCG@K (docs/math.md section 10), plus list diagnostics
(section 9).

Evaluation differs from the reward on purpose, as in the paper: seen and out-of-catalog
items are removed first and the list compacts (the next item moves up), then a title must
equal a ground-truth title exactly (case-sensitive) with a year within +-2 (tried 0, +1,
-1, +2, -2), and each ground-truth entry is credited once.

`Recall@K = hits in the top K / |GT|`; `NDCG@K = DCG@K / IDCG@K`, `DCG = sum rel_i /
log2(i + 1)`. The ideal list has `min(|GT|, K)` hits (`ideal="groundtruth"`, the default,
what `evaluate` prints unless told otherwise) or, as the released code does,
`min(|GT|, K, surviving recommendations)` (`ideal="surviving"`).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

from .parsing import parse_lines, parse_recommendations
from .rewards import normalize_title, sequence_dcg, year_offsets

DEFAULT_KS = (5, 10, 15, 20)
IDEALS = ("groundtruth", "surviving")

Recs = Sequence[tuple[str, int]] | str


def _as_recs(recs: Recs) -> list[tuple[str, int]]:
    return parse_recommendations(recs) if isinstance(recs, str) else list(recs)


def _gt_multiset(groundtruth: Iterable[Sequence[Any]]) -> tuple[dict[str, dict[int, int]], int]:
    remaining: dict[str, dict[int, int]] = {}
    size = 0
    for title, year in groundtruth:
        size += 1
        try:
            y = int(str(year).strip())
        except ValueError:
            continue
        bucket = remaining.setdefault(str(title), {})
        bucket[y] = bucket.get(y, 0) + 1
    return remaining, size


def evaluation_hits(recs: Recs, groundtruth: Iterable[Sequence[Any]],
                    seen_titles: Iterable[str], catalog: Container | None,
                    *, year_tolerance: int = 2) -> tuple[list[int], int]:
    """Hits of the compacted list (seen and out-of-catalog items removed) and `|GT|`."""
    seen = set(seen_titles)
    remaining, size = _gt_multiset(groundtruth)
    offsets = year_offsets(year_tolerance)
    hits = []
    for title, year in _as_recs(recs):
        if title in seen or (catalog is not None and (title, year) not in catalog):
            continue
        hit = 0
        bucket = remaining.get(title)
        if bucket:
            for d in offsets:
                if bucket.get(year + d, 0) > 0:
                    bucket[year + d] -= 1
                    hit = 1
                    break
        hits.append(hit)
    return hits, size


def recall_at_k(recs: Recs, groundtruth: Iterable[Sequence[Any]], seen_titles: Iterable[str],
                catalog: Container | None, k: int) -> float:
    """Hits in the top `k` of the compacted list over `|GT|` (0 when the ground truth is
    empty). `recs` may be parsed items or the generated text."""
    hits, size = evaluation_hits(recs, groundtruth, seen_titles, catalog)
    return sum(hits[:k]) / size if size else 0.0


def ndcg_at_k(recs: Recs, groundtruth: Iterable[Sequence[Any]], seen_titles: Iterable[str],
              catalog: Container | None, k: int, *, ideal: str = "groundtruth") -> float:
    """`DCG@k / IDCG@k` of the compacted list, in [0, 1]; 0 when the ideal list is empty.

    ideal: "groundtruth" (IDCG from `min(|GT|, k)` hits, docs/math.md section 10) or
    "surviving" (also capped by the number of recommendations left after removing seen and
    out-of-catalog items, as the released code does).
    """
    if ideal not in IDEALS:
        raise ValueError(f"ideal must be one of {IDEALS}, got {ideal!r}")
    hits, size = evaluation_hits(recs, groundtruth, seen_titles, catalog)
    n_ideal = min(size, k) if ideal == "groundtruth" else min(size, k, len(hits))
    idcg = sequence_dcg([1] * n_ideal)
    return sequence_dcg(hits[:k]) / idcg if idcg > 0 else 0.0


def list_diagnostics(text: str, seen_titles: Iterable[str], catalog: Container | None,
                     num_ranks: int = 20) -> dict[str, int]:
    """Counts for one generated list (the first `num_ranks` parsed items are "the list").

    Returns `lines` (non-blank), `parse_failures` (non-blank lines that did not parse),
    `items` (parsed, all), `considered` (min(items, N)), and among the considered items
    `out_of_catalog`, `seen`, `duplicates` (same casefolded title and year as an earlier one).
    """
    lines = parse_lines(text)
    items = [(p.title, p.year) for p in lines if p.title is not None]
    seen = set(seen_titles)
    considered = items[:num_ranks]
    earlier: set[tuple[str, int]] = set()
    ooc = seen_n = dup = 0
    for title, year in considered:
        key = (normalize_title(title), year)
        dup += key in earlier
        earlier.add(key)
        seen_n += title in seen
        ooc += catalog is not None and (title, year) not in catalog
    return {"lines": len(lines), "parse_failures": len(lines) - len(items), "items": len(items),
            "considered": len(considered), "out_of_catalog": ooc, "seen": seen_n,
            "duplicates": dup}


def aggregate_diagnostics(per_list: Sequence[Mapping[str, int]], num_ranks: int = 20
                          ) -> dict[str, float]:
    """Batch rates from `list_diagnostics` results (names follow docs/math.md section 9)."""
    n = len(per_list)
    tot = {k: sum(d[k] for d in per_list) for k in
           ("lines", "parse_failures", "items", "considered", "out_of_catalog", "seen",
            "duplicates")}

    def rate(a: float, b: float) -> float:
        return a / b if b else 0.0
    return {
        "items_per_list": rate(tot["items"], n),
        "parse_failure_rate": rate(tot["parse_failures"], tot["lines"]),
        "empty_list_rate": rate(sum(d["items"] == 0 for d in per_list), n),
        "exact_length_rate": rate(sum(d["items"] == num_ranks for d in per_list), n),
        "out_of_catalog_rate": rate(tot["out_of_catalog"], tot["considered"]),
        "seen_rate": rate(tot["seen"], tot["considered"]),
        "duplicate_rate": rate(tot["duplicates"], tot["considered"]),
    }


def evaluate(records: Sequence[Mapping[str, Any]], generations: Sequence[str],
             catalog: Container | None, ks: Sequence[int] = DEFAULT_KS, *,
             ideal: str = "groundtruth", num_ranks: int = 20) -> dict[str, float]:
    """Mean `recall@K` / `ndcg@K` over records with non-empty ground truth, plus diagnostics.

    `generations[i]` is the (greedy) text generated for `records[i]`. Keys: `recall@5`,
    `ndcg@5`, ..., `num_evaluated`, `num_skipped_empty_groundtruth`, `ndcg_ideal` (which
    ideal list was used: 0 groundtruth, 1 surviving), and the `aggregate_diagnostics` rates.
    """
    if len(records) != len(generations):
        raise ValueError(f"{len(records)} records but {len(generations)} generations")
    if ideal not in IDEALS:
        raise ValueError(f"ideal must be one of {IDEALS}, got {ideal!r}")
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    evaluated = skipped = 0
    diags = []
    for rec, text in zip(records, generations):
        seen = rec["seen_titles"]
        diags.append(list_diagnostics(text, seen, catalog, num_ranks))
        gt = rec["groundtruth_with_release_year"]
        if not gt:
            skipped += 1
            continue
        evaluated += 1
        items = parse_recommendations(text)
        for k in ks:
            sums[f"recall@{k}"] += recall_at_k(items, gt, seen, catalog, k)
            sums[f"ndcg@{k}"] += ndcg_at_k(items, gt, seen, catalog, k, ideal=ideal)
    out = {key: (v / evaluated if evaluated else 0.0) for key, v in sums.items()}
    out["num_evaluated"] = float(evaluated)
    out["num_skipped_empty_groundtruth"] = float(skipped)
    out["ndcg_ideal"] = float(IDEALS.index(ideal))
    out.update(aggregate_diagnostics(diags, num_ranks))
    return out
