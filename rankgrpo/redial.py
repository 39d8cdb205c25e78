"""ReDial -> records in the Reddit-v2 form, split by dialogue (docs/math.md section 12).

Source: the ReDial test split as processed by CRSLab and re-released by He et al. (CIKM 2023);
ReDial is by Li et al. (NeurIPS 2018), CC BY 4.0. The raw files ship gzipped in
`rankgrpo/data/` (see `rankgrpo/data/PROVENANCE.md`), and so does the converted default
(`load_default_redial`), so nothing here needs `../shared`.

One record per recommender turn:
- prompt: docs/math.md section 1's prompt around the dialogue so far. CRSLab's `context` starts with
  an empty placeholder and its ready-made `input` transcript labels the first utterance
  "User" even when the recommender opened; roles are rebuilt instead: the last context
  utterance is the user's (every row is a recommender turn, `is_user` = 0) and roles
  alternate backwards (consecutive rows of a dialogue always add an even number of
  utterances, which confirms it). `%3F`-style escapes left in the text are decoded.
- ground truth: the turn's `rec` entity ids as `(title, year)`. DBpedia ids carry no year,
  so each id is resolved from the data's own `Title (Year)` names, first in the turn
  (`entity_name`, then the reply text), then across the data set, then from a year in the
  DBpedia disambiguation (`Speed_(1994_film)`). Unresolved ids are dropped as "no_year", or
  "not_a_movie" when the DBpedia page is not a film (`Thor_(volcano)`, `Dirty_Dancing_(song)`).
  Ground-truth movies the conversation already mentioned are dropped ("already_seen"): they
  can never score (docs/math.md section 2, rule 1) and He et al. show they inflate ReDial results.
- seen titles: bare titles of the movies (`item_ids`) in `prev_entity`.
- catalog: every movie of the data with a year (resolved items, ground truth, and the
  `Title (Year)` names in `entity_name`).
- completion: the SFT target of `rankgrpo.teacher.CooccurrenceTeacher`, fit on the train
  split only.
Records whose ground truth ends up empty are dropped ("empty_ground_truth").

Run `python -m rankgrpo.redial` to convert the shipped raw files and print the report
(`--write` refreshes the shipped converted files).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import unicodedata
import urllib.parse
from collections import Counter
from collections.abc import Container, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Catalog, data_path, load_catalog, write_catalog_tsv
from .fileio import atomic_write_text, open_text
from .prompts import SYSTEM, USER, build_prompt
from .records import read_jsonl, write_jsonl
from .teacher import CooccurrenceTeacher, build_sft_targets

RAW_FILES = {"rows": "redial_raw_test.jsonl.gz", "entity2id": "redial_raw_entity2id.json.gz",
             "item_ids": "redial_raw_item_ids.json.gz"}
SPLITS = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SEED = 0

_NAME = re.compile(r"^(.*\S)\s*\((\d{4})\)\s*$")
_YEAR_MENTION = re.compile(r"\((\d{4})\)")
_ESCAPE = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_ARTICLES = {"the", "a", "an"}
_MAX_TITLE_WORDS = 15


# ---------------------------------------------------------------- raw files


@dataclass
class RedialRaw:
    """The three raw files: turn rows, DBpedia URI -> entity id, movie entity ids."""

    rows: list[dict[str, Any]]
    entity2id: dict[str, int]
    item_ids: set[int]


def load_raw(directory: str | Path | None = None) -> RedialRaw:
    """Read the raw files from `directory` (plain `test.jsonl`, `entity2id.json`,
    `item_ids.json`, or the package's gzipped copies); default: the shipped copies."""
    if directory is None:
        paths = {k: data_path(v) for k, v in RAW_FILES.items()}
    else:
        d = Path(directory)
        plain = {"rows": "test.jsonl", "entity2id": "entity2id.json", "item_ids": "item_ids.json"}
        paths = {}
        for k in plain:
            cands = [d / plain[k], d / (plain[k] + ".gz"), d / RAW_FILES[k]]
            found = next((p for p in cands if p.exists()), None)
            if found is None:
                raise FileNotFoundError(f"no {plain[k]}(.gz) in {d}")
            paths[k] = found
    with open_text(paths["rows"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open_text(paths["entity2id"]) as f:
        entity2id = json.load(f)
    with open_text(paths["item_ids"]) as f:
        item_ids = set(json.load(f))
    return RedialRaw(rows, entity2id, item_ids)


# ---------------------------------------------------------------- text helpers


def unescape(text: str) -> str:
    """Decode percent escapes left in the text (`What About Bob%3F` -> `What About Bob?`)."""
    return _ESCAPE.sub(lambda m: urllib.parse.unquote(m.group(0), errors="strict"), text) \
        if "%" in text else text


def _words(s: str) -> list[str]:
    s = unicodedata.normalize("NFKD", s).casefold()
    return re.findall(r"[0-9a-z]+", s)


def strict_key(s: str) -> str:
    """Letters and digits only, casefolded: `Police Academy 2:` == `police academy 2`."""
    return "".join(_words(s))


def loose_key(s: str) -> str:
    """`strict_key` without a leading article: `Conjuring (film)` matches `The Conjuring`."""
    w = _words(s)
    return "".join(w[1:] if len(w) > 1 and w[0] in _ARTICLES else w)


def uri_label(uri: str) -> tuple[str, str | None]:
    """`<http://dbpedia.org/resource/Speed_(1994_film)>` -> (`Speed`, `1994 film`)."""
    name = urllib.parse.unquote(uri.strip("<>").rsplit("/", 1)[-1]).replace("_", " ").strip()
    m = re.match(r"^(.*?)\s*\(([^()]*)\)$", name)
    if m and m.group(1):
        return m.group(1), m.group(2)
    return name, None


def _uri_year(disambiguation: str | None) -> int | None:
    if disambiguation and "film" in disambiguation:
        m = re.match(r"^(\d{4})\b", disambiguation)
        if m:
            return int(m.group(1))
    return None


def _is_film_page(disambiguation: str | None) -> bool:
    return disambiguation is None or "film" in disambiguation or "movie" in disambiguation


def year_names(names: Sequence[str]) -> list[tuple[str, int]]:
    """The `Title (Year)` entries of an `entity_name` list, as `(title, year)`."""
    out = []
    for n in dict.fromkeys(names):
        m = _NAME.match(unescape(n))
        if m:
            out.append((m.group(1).strip(), int(m.group(2))))
    return out


def _clean_mention(s: str) -> str:
    return s.lstrip("\"'“‘*_-#([ ").strip()


def _longer_title(words: list[str], key: str, known: Container[str]) -> bool:
    """True if `words` (capitalised, so plausibly a title start) form a known title other
    than `key`."""
    first = words[0].lstrip("\"'“‘*_-#([")
    k = strict_key(" ".join(words))
    return bool(first) and (first[0].isupper() or first[0].isdigit()) and k != key \
        and k in known


def text_mention(text: str, label: str, known: Container[str] = ()
                 ) -> tuple[str, int] | None:
    """A `Title (Year)` mention of `label` in free text, where the title's left end is
    unknown: the shortest word suffix equal to the label (letters and digits; with a
    capitalised article just before it, that too), else the longest capitalised suffix equal
    up to a leading article. A mention whose longer suffix is a `known` title (strict keys)
    belongs to that title: "Street" is not found in "A Nightmare on Elm Street (1984)"."""
    strict, loose = strict_key(label), loose_key(label)
    if not strict:
        return None
    fallback = None
    for m in _YEAR_MENTION.finditer(text):
        words = text[:m.start()].split()
        year = int(m.group(1))
        longest = min(_MAX_TITLE_WORDS, len(words))
        for n in range(1, longest + 1):
            cand = _clean_mention(" ".join(words[-n:]))
            if strict_key(cand) == strict:
                if any(_longer_title(words[-j:], strict, known)
                       for j in range(n + 1, longest + 1)):
                    break  # part of a longer known title: try the next mention
                # DBpedia often drops a leading article the title has: keep a capitalised
                # "The"/"A"/"An" just before ("The Conjuring", not "Conjuring").
                if n < len(words) and words[-n - 1] in ("The", "A", "An"):
                    cand = " ".join(words[-n - 1:])
                return cand, year
            if cand and loose_key(cand) == loose and (cand[0].isupper() or cand[0].isdigit()):
                fallback = (cand, year)
    return fallback


# ---------------------------------------------------------------- entity resolution


def _best(counter: Counter) -> Any:
    """Most common key; ties broken by sorted order so the result never depends on hashing."""
    return min(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0]


class EntityResolver:
    """Maps a movie entity id to `(title, year)` using the data's own names."""

    def __init__(self, raw: RedialRaw):
        self.item_ids = raw.item_ids
        id2uri = {v: k for k, v in raw.entity2id.items()}
        self.labels = {i: uri_label(id2uri[i]) for i in raw.item_ids if i in id2uri}
        self.id_votes: dict[int, Counter] = {}
        self.names_strict: dict[str, Counter] = {}
        self.names_loose: dict[str, Counter] = {}
        for row in raw.rows:
            names = year_names(row.get("entity_name", ()))
            for t, y in names:
                self.names_strict.setdefault(strict_key(t), Counter())[(t, y)] += 1
                self.names_loose.setdefault(loose_key(t), Counter())[(t, y)] += 1
            for x in dict.fromkeys(row.get("entity", ())):
                hit = self._match_names(x, names)
                if hit is not None:
                    self.id_votes.setdefault(x, Counter())[hit] += 1

    def label(self, entity_id: int) -> str | None:
        lab = self.labels.get(entity_id)
        return unescape(lab[0]) if lab else None

    def _match_names(self, x: int, names: list[tuple[str, int]]) -> tuple[str, int] | None:
        if x not in self.labels or not names:
            return None
        lab = self.labels[x][0]
        for key in (strict_key, loose_key):
            k = key(lab)
            for name in names:
                if k and key(name[0]) == k:
                    return name
        return None

    def resolve_global(self, x: int) -> tuple[tuple[str, int] | None, str]:
        """Without a turn: votes from turns, then the name table, then the DBpedia year."""
        if x not in self.labels:
            return None, "not_a_movie"
        if x in self.id_votes:
            return _best(self.id_votes[x]), "id_votes"
        lab, dis = self.labels[x]
        for table, key in ((self.names_strict, strict_key), (self.names_loose, loose_key)):
            c = table.get(key(lab))
            if c:
                return _best(c), "name_table"
        year = _uri_year(dis)
        if year is not None:
            return (unescape(lab), year), "uri_year"
        return None, ("no_year" if _is_film_page(dis) else "not_a_movie")

    def resolve(self, x: int, row: Mapping[str, Any], text: str
                ) -> tuple[tuple[str, int] | None, str]:
        """`(title, year)` of entity `x` in a turn, and where it came from (or why not)."""
        if x not in self.item_ids or x not in self.labels:
            return None, "not_a_movie"
        hit = self._match_names(x, year_names(row.get("entity_name", ())))
        if hit is not None:
            return hit, "turn_entity_name"
        hit = text_mention(text, self.labels[x][0], self.names_strict)
        if hit is not None:
            return hit, "turn_text"
        return self.resolve_global(x)


# ---------------------------------------------------------------- conversion


def conversation_turns(context: Sequence[str]) -> list[tuple[str, str]]:
    """`(role, text)` for the non-empty utterances; the last one is the user's and roles
    alternate backwards (see the module docstring)."""
    n = len(context)
    turns = []
    for i, utt in enumerate(context):
        text = unescape(utt).strip()
        if text:
            turns.append((USER if (n - 1 - i) % 2 == 0 else SYSTEM, text))
    return turns


def split_dialogues(dialog_ids: Sequence[str], seed: int = DEFAULT_SEED,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """Dialogue id -> split name, by a seeded shuffle of the sorted ids (deterministic)."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers, "
                         f"got {fractions!r}")
    ids = sorted(set(dialog_ids))
    random.Random(seed).shuffle(ids)
    total = sum(fractions)
    n_train = round(len(ids) * fractions[0] / total)
    n_valid = round(len(ids) * fractions[1] / total)
    out = {}
    for i, d in enumerate(ids):
        out[d] = "train" if i < n_train else "valid" if i < n_train + n_valid else "test"
    return out


@dataclass
class ConversionReport:
    """Counts of a ReDial conversion (what was kept, dropped and why)."""

    rows: int = 0
    dialogues: int = 0
    records_kept: int = 0
    records_dropped: dict[str, int] = field(default_factory=dict)
    groundtruth_items: int = 0
    groundtruth_kept: int = 0
    groundtruth_dropped: dict[str, int] = field(default_factory=dict)
    groundtruth_sources: dict[str, int] = field(default_factory=dict)
    seen_entities_not_movies: int = 0
    catalog_size: int = 0
    catalog_sources: dict[str, int] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    seed: int = DEFAULT_SEED

    def summary(self) -> str:
        """Human-readable lines (what `python -m rankgrpo.redial` prints)."""
        def kv(d: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
        lines = [
            f"ReDial rows (recommender turns): {self.rows} from {self.dialogues} dialogues",
            f"records kept: {self.records_kept}; dropped: {kv(self.records_dropped)}",
            f"ground-truth items: {self.groundtruth_items}, kept {self.groundtruth_kept}; "
            f"dropped: {kv(self.groundtruth_dropped)}",
            f"ground-truth years from: {kv(self.groundtruth_sources)}",
            f"seen entities that are not movies (left out of seen_titles): "
            f"{self.seen_entities_not_movies}",
            f"catalog: {self.catalog_size} (title, year) pairs; from: {kv(self.catalog_sources)}",
        ]
        for name in SPLITS:
            s = self.splits.get(name, {})
            lines.append(f"split {name} (seed {self.seed}): {s.get('records', 0)} records, "
                         f"{s.get('dialogues', 0)} dialogues")
        return "\n".join(lines)


@dataclass
class RedialConversion:
    splits: dict[str, list[dict[str, Any]]]
    catalog: Catalog
    report: ConversionReport


def _turn_record(row: Mapping[str, Any], resolver: EntityResolver, report: ConversionReport,
                 num_ranks: int, drop_seen: bool) -> tuple[dict[str, Any] | None, str | None,
                                                        list[tuple[str, int]]]:
    """One row -> (record or None, drop reason, all resolved ground-truth pairs)."""
    context = row.get("context", [])
    seen: list[str] = []
    for x in row.get("prev_entity", ()):
        if x not in resolver.item_ids:
            report.seen_entities_not_movies += 1
            continue
        pair, _ = resolver.resolve(x, row, "\n".join(context))
        title = pair[0] if pair else resolver.label(x)
        if title and title not in seen:
            seen.append(title)
    gt: list[tuple[str, int]] = []
    resolved = []
    dropped: Counter = Counter()
    sources: Counter = Counter()
    for x in dict.fromkeys(row.get("rec", ())):
        report.groundtruth_items += 1
        pair, how = resolver.resolve(x, row, unescape(row.get("resp", "")))
        if pair is None:
            dropped[how] += 1
            continue
        resolved.append(pair)
        if pair in gt:
            dropped["duplicate"] += 1
        elif drop_seen and pair[0] in seen:
            dropped["already_seen"] += 1
        else:
            sources[how] += 1
            gt.append(pair)
    for k, v in dropped.items():
        report.groundtruth_dropped[k] = report.groundtruth_dropped.get(k, 0) + v
    for k, v in sources.items():
        report.groundtruth_sources[k] = report.groundtruth_sources.get(k, 0) + v
    report.groundtruth_kept += len(gt)
    turns = conversation_turns(context)
    if not turns:
        return None, "empty_conversation", resolved
    if not gt:
        return None, "empty_ground_truth", resolved
    record = {
        "prompt": build_prompt(turns, num_ranks),
        "completion": "",
        "seen_titles": seen,
        "groundtruth_with_release_year": [[t, str(y)] for t, y in gt],
        "dialog_id": str(row.get("dialog_id")),
        "turn_id": row.get("turn_id"),
    }
    return record, None, resolved


def convert_redial(raw: RedialRaw | str | Path | None = None, *, seed: int = DEFAULT_SEED,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS, num_ranks: int = 20,
                   drop_seen_groundtruth: bool = True) -> RedialConversion:
    """Convert ReDial rows into records split by dialogue; see the module docstring.

    Args:
        raw: a `RedialRaw`, a folder of raw files, or None for the shipped copies.
        seed, fractions: the dialogue split (train, valid, test).
        num_ranks: N, used in the prompt and the SFT completion.
        drop_seen_groundtruth: drop ground-truth movies mentioned earlier in the dialogue.
    """
    if not isinstance(raw, RedialRaw):
        raw = load_raw(raw)
    resolver = EntityResolver(raw)
    report = ConversionReport(rows=len(raw.rows), seed=seed)
    dialog_ids = [str(r.get("dialog_id")) for r in raw.rows]
    report.dialogues = len(set(dialog_ids))
    assignment = split_dialogues(dialog_ids, seed, fractions)
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    dropped: Counter = Counter()
    catalog_pairs: dict[tuple[str, int], str] = {}
    for row in raw.rows:
        record, reason, resolved = _turn_record(row, resolver, report, num_ranks,
                                                drop_seen_groundtruth)
        for p in resolved:
            catalog_pairs.setdefault(p, "groundtruth")
        if record is None:
            dropped[reason] += 1
            continue
        splits[assignment[record["dialog_id"]]].append(record)
    for x in sorted(resolver.labels):
        pair, how = resolver.resolve_global(x)
        if pair is not None:
            catalog_pairs.setdefault(pair, how)
    for row in raw.rows:
        for p in year_names(row.get("entity_name", ())):
            catalog_pairs.setdefault(p, "entity_name")
    catalog = Catalog(catalog_pairs)
    teacher = CooccurrenceTeacher.from_records(splits["train"], catalog)
    splits = {s: build_sft_targets(recs, teacher, num_ranks) for s, recs in splits.items()}
    report.records_dropped = dict(dropped)
    report.records_kept = sum(len(v) for v in splits.values())
    report.catalog_size = len(catalog)
    report.catalog_sources = dict(Counter(catalog_pairs.values()))
    report.splits = {s: {"records": len(recs), "dialogues": len({r["dialog_id"] for r in recs})}
                     for s, recs in splits.items()}
    return RedialConversion(splits, catalog, report)


# ---------------------------------------------------------------- shipped data


def write_conversion(conv: RedialConversion, directory: str | Path,
                     prefix: str = "redial_") -> None:
    """Write `{prefix}{split}.jsonl.gz`, `{prefix}catalog.tsv`, `{prefix}report.json`."""
    d = Path(directory)
    for s, recs in conv.splits.items():
        write_jsonl(recs, d / f"{prefix}{s}.jsonl.gz")
    write_catalog_tsv(conv.catalog, d / f"{prefix}catalog.tsv")
    with atomic_write_text(d / f"{prefix}report.json") as f:
        json.dump(asdict(conv.report), f, indent=1, sort_keys=True)
        f.write("\n")


def load_default_redial(split: str | None = None
                        ) -> list[dict[str, Any]] | dict[str, list[dict[str, Any]]]:
    """The shipped converted ReDial records: one split's list, or `{split: records}`."""
    names = SPLITS if split is None else (split,)
    for s in names:
        if s not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {s!r}")
    out = {s: read_jsonl(data_path(f"redial_{s}.jsonl.gz")) for s in names}
    return out[split] if split is not None else out


def load_default_redial_catalog() -> Catalog:
    """The shipped ReDial catalog."""
    return load_catalog(data_path("redial_catalog.tsv"))


def load_default_redial_report() -> dict[str, Any]:
    """The report saved when the shipped files were converted."""
    with open_text(data_path("redial_report.json")) as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m rankgrpo.redial [--raw DIR] [--seed S] [--out DIR | --write]`."""
    ap = argparse.ArgumentParser(prog="python -m rankgrpo.redial", description=__doc__.split(
        "\n")[0])
    ap.add_argument("--raw", help="folder with test.jsonl, entity2id.json, item_ids.json "
                    "(default: the copies shipped in the package)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--num-ranks", type=int, default=20)
    ap.add_argument("--out", help="write the converted files to this folder")
    ap.add_argument("--write", action="store_true",
                    help="refresh the converted files shipped in rankgrpo/data/")
    args = ap.parse_args(argv)
    conv = convert_redial(args.raw, seed=args.seed, num_ranks=args.num_ranks)
    print(conv.report.summary())
    out = data_path("") if args.write else args.out
    if out:
        write_conversion(conv, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
