"""The Remap-Reflect-Adjust run: teacher lists -> Eq. 10 -> Eq. 11 -> Eq. 12-13 -> SFT records.

`run_rra(cfg)` is resumable: every teacher answer (list or ratings) is cached on disk per
conversation, keyed by the teacher's fingerprint and the request, so a rerun after a crash or
an interrupt re-asks nothing; the catalog embeddings are cached by embedder and catalog
content. Outputs in `cfg.output_dir` (all written atomically):

- `sft.jsonl`: the top `num_out` items of `s_final` per training conversation as Reddit-v2
  records (prompt, completion, seen_titles, groundtruth_with_release_year, ...), loadable by
  `rankgrpo.records.load_records` and trainable with `rankgrpo sft`;
- `manifest.json`: teacher, embedder, options, counts, skips (with reasons), parse failures,
  the adjust fit and timings;
- `ablation.json` / `ablation.md` when `eval_file` is set: Recall/NDCG@5/10/20 of the
  teacher's raw list, remap only, remap + reflect and the full pipeline on held-out records.

Titles the user already mentioned (`seen_titles`) are never output and never rated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..catalog import DEFAULT_CATALOGS, Catalog, load_catalog, load_default_catalog
from ..fileio import atomic_write_text, open_text
from ..metrics import ndcg_at_k, recall_at_k
from ..parsing import parse_recommendations
from ..records import groundtruth_pairs, load_records, write_jsonl
from ..teacher import format_completion
from .adjust import AdjustResult, fit_adjust
from .config import RRAConfig
from .embed import Embedder, SentenceTransformerEmbedder, catalog_embeddings
from .reflect import parse_ratings, reflect_scores
from .remap import exact_match_indicator, remap_scores
from .teacher import (
    ContextTooLong,
    CooccurrenceRRATeacher,
    EndpointTeacher,
    HFTeacher,
    Teacher,
    conversation_of,
    fingerprint_for,
    recommend_prompt,
)

log = logging.getLogger(__name__)
KS = (5, 10, 20)
VARIANTS = ("teacher", "remap", "remap+reflect", "full")


class RRAError(ValueError):
    """Input the pipeline cannot use (empty catalog, no usable record, ...)."""


# ---------------------------------------------------------------- inputs


def load_input_records(spec: str, limit: int | None) -> list[dict[str, Any]]:
    """`redial:SPLIT` (the shipped ReDial split) or a records file/folder."""
    if spec.startswith("redial:"):
        from ..redial import load_default_redial

        recs = load_default_redial(spec.split(":", 1)[1])
    else:
        recs = load_records(spec, "train" if Path(spec).is_dir() else None)
    return list(recs[:limit] if limit else recs)


def load_rra_catalog(spec: str) -> Catalog:
    cat = load_default_catalog(spec) if spec in DEFAULT_CATALOGS else load_catalog(spec)
    if len(cat) == 0:
        raise RRAError(f"rra.catalog={spec!r}: the catalog is empty (nothing to remap onto)")
    return cat


def item_texts(items: Sequence[tuple[str, int]], metadata_file: str | None = None,
               columns: Sequence[str] = ()) -> list[str]:
    """`Title (Year)` per item, followed by `; column: value` for each metadata column of a
    TSV with `title` and `year` headers (keywords, plot, ...)."""
    texts = [f"{t} ({y})" for t, y in items]
    if metadata_file is None:
        return texts
    meta: dict[tuple[str, int], dict[str, str]] = {}
    with open_text(metadata_file) as f:
        header = [h.strip() for h in f.readline().rstrip("\r\n").split("\t")]
        low = [h.lower() for h in header]
        if "title" not in low or "year" not in low:
            raise RRAError(f"rra.metadata_file={metadata_file!r}: the header needs 'title' and "
                           f"'year' columns, got {header}")
        ti, yi = low.index("title"), low.index("year")
        use = list(columns) or [h for i, h in enumerate(header) if i not in (ti, yi)]
        for c in use:
            if c not in header:
                raise RRAError(f"rra.metadata_columns: {c!r} is not a column of "
                               f"{metadata_file} ({header})")
        for line in f:
            cells = line.rstrip("\r\n").split("\t")
            if len(cells) <= max(ti, yi) or not cells[yi].strip().isdigit():
                continue
            row = dict(zip(header, cells))
            meta[(cells[ti].strip(), int(cells[yi]))] = {c: row.get(c, "").strip() for c in use}
    out = []
    for text, it in zip(texts, items):
        extra = "; ".join(f"{k}: {v}" for k, v in meta.get(tuple(it), {}).items() if v)
        out.append(f"{text}; {extra}" if extra else text)
    return out


def build_teacher(cfg: RRAConfig, train_records: Sequence[Mapping[str, Any]], catalog: Catalog,
                  cache_dir: Path) -> Teacher:
    if cfg.teacher == "cooccurrence":
        return CooccurrenceRRATeacher.from_records(train_records, catalog)
    if cfg.teacher == "endpoint":
        return EndpointTeacher(cfg.endpoint_url or "", cfg.endpoint_model or "",
                               cache_dir=cache_dir / "endpoint", api_key_env=cfg.api_key_env,
                               max_new_tokens=cfg.max_new_tokens,
                               rate_max_new_tokens=cfg.rate_max_new_tokens,
                               max_retries=cfg.max_retries, backoff=cfg.retry_backoff,
                               concurrency=cfg.endpoint_concurrency)
    return HFTeacher.from_source(cfg.teacher_model, gguf_file=cfg.teacher_gguf_file,
                                 dtype=cfg.teacher_dtype, batch_size=cfg.teacher_batch_size,
                                 max_new_tokens=cfg.max_new_tokens,
                                 rate_max_new_tokens=cfg.rate_max_new_tokens,
                                 max_context=cfg.teacher_max_context,
                                 rate_decoding=cfg.rate_decoding)


# ---------------------------------------------------------------- cache


class AnswerCache:
    """One JSON file per teacher answer, named by a hash of (teacher, request)."""

    def __init__(self, folder: Path, teacher: Teacher):
        self.folder = folder
        self.teacher = teacher
        self.hits = 0

    def _path(self, kind: str, request: Any) -> Path:
        prefix = json.dumps(fingerprint_for(self.teacher, kind), sort_keys=True)
        blob = json.dumps([prefix, kind, request], sort_keys=True, ensure_ascii=False)
        return self.folder / kind / f"{hashlib.sha256(blob.encode()).hexdigest()[:32]}.json"

    def get(self, kind: str, request: Any) -> Any:
        p = self._path(kind, request)
        if p.exists():
            self.hits += 1
            return json.loads(p.read_text(encoding="utf-8"))["answer"]
        return None

    def put(self, kind: str, request: Any, answer: Any) -> None:
        with atomic_write_text(self._path(kind, request)) as f:
            json.dump({"request": request, "answer": answer}, f, ensure_ascii=False)


def _bar(it, total: int, desc: str, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        return it
    return tqdm(it, total=total, desc=desc, disable=disable, dynamic_ncols=True)


# ---------------------------------------------------------------- stages


@dataclass
class Scored:
    """Scores of one split: which records were kept, their teacher items and score rows."""

    kept: list[int] = field(default_factory=list)  # indices into the split's records
    teacher_text: list[str] = field(default_factory=list)
    teacher_items: list[list[tuple[str, int]]] = field(default_factory=list)
    remap: torch.Tensor | None = None  # [n_kept, C], memory-mapped when a folder is given
    reflect: torch.Tensor | None = None  # [n_kept, C], memory-mapped when a folder is given
    skips: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)


def _each_that_fits(ask_batch, ask_one, items: Sequence[Any]) -> list[Any]:
    """`ask_batch(items)`; when a request does not fit the teacher's context (or there is no
    batch call), each item alone, None for the ones that do not fit."""
    if ask_batch is not None:
        try:
            return ask_batch(items)
        except ContextTooLong:
            pass
    out = []
    for it in items:
        try:
            out.append(ask_one(it))
        except ContextTooLong:
            out.append(None)
    return out


def teacher_lists(records: Sequence[Mapping[str, Any]], teacher: Teacher, cache: AnswerCache,
                  cfg: RRAConfig, desc: str) -> tuple[list[str | None], Counter]:
    """Raw list text per record (None for a skipped one) and the skip reasons."""
    convs = [conversation_of(r) for r in records]
    n = cfg.teacher_list_size
    out: list[str | None] = [None] * len(records)
    skips: Counter = Counter()
    todo = []
    for i, c in enumerate(convs):
        if not c.text:
            skips["empty conversation"] += 1
            continue
        got = cache.get("recommend", [c.text, n])
        if got is not None:
            out[i] = got
            continue
        check = getattr(teacher, "context_problem", None)
        if check is not None and check(recommend_prompt(c, n), cfg.max_new_tokens):
            skips["conversation longer than the teacher's context"] += 1
            continue
        todo.append(i)
    step = cfg.teacher_batch_size
    bar = _bar(range(0, len(todo), step), (len(todo) + step - 1) // step, f"{desc}: teacher",
               cfg.disable_tqdm)
    for s in bar:
        idx = todo[s:s + step]
        texts = _each_that_fits(lambda ids: teacher.recommend([convs[i] for i in ids], n),
                                lambda i: teacher.recommend([convs[i]], n)[0], idx)
        if len(texts) != len(idx):
            raise RRAError(f"teacher {teacher.name!r} returned {len(texts)} lists for "
                           f"{len(idx)} conversations")
        for i, t in zip(idx, texts):
            if t is None:
                skips["conversation longer than the teacher's context"] += 1
                continue
            cache.put("recommend", [convs[i].text, n], t)
            out[i] = t
    for i, t in enumerate(out):
        if t is not None and not t.strip():
            out[i] = None
            skips["teacher returned nothing"] += 1
    return out, skips


def _seen_mask(record: Mapping[str, Any], titles: Sequence[str]) -> torch.Tensor:
    seen = set(record.get("seen_titles", ()))
    return torch.tensor([t in seen for t in titles], dtype=torch.bool)


def score_matrix(n: int, c: int, path: Path | None) -> torch.Tensor:
    """A float32 [n, C] matrix: in memory, or backed by a file at `path` (a memory map, so a
    large n x C never has to fit in memory; rows are written as they are computed)."""
    if path is None:
        return torch.zeros(n, c)
    path.parent.mkdir(parents=True, exist_ok=True)
    return torch.from_numpy(np.memmap(path, dtype=np.float32, mode="w+", shape=(n, c)))


def score_split(records: Sequence[Mapping[str, Any]], teacher: Teacher, embedder: Embedder,
                cache: AnswerCache, catalog_items: list[tuple[str, int]],
                catalog_emb: torch.Tensor, cfg: RRAConfig, desc: str,
                scores_dir: Path | None = None) -> Scored:
    """Teacher lists, Eq. 10 and (when the teacher can rate) Eq. 11 for each record; the
    score matrices live in `scores_dir` as memory-mapped files when it is given."""
    index = {it: c for c, it in enumerate(catalog_items)}
    titles = [t for t, _ in catalog_items]
    res = Scored()
    texts, res.skips = teacher_lists(records, teacher, cache, cfg, desc)
    res.kept = [i for i, t in enumerate(texts) if t is not None]
    if not res.kept:
        return res
    res.teacher_text = [texts[i] or "" for i in res.kept]
    for t in res.teacher_text:
        items = list(dict.fromkeys(parse_recommendations(t)))[:cfg.teacher_list_size]
        res.teacher_items.append(items)
        res.counts["teacher items parsed"] += len(items)
        res.counts["teacher items in catalog (exact)"] += sum(it in index for it in items)
        if not items:
            res.counts["teacher lists with no parsable item"] += 1
    # embed every distinct teacher item and conversation once
    uniq = sorted({f"{t} ({y})" for items in res.teacher_items for t, y in items})
    item_emb = dict(zip(uniq, embedder.encode(uniq))) if uniq else {}
    conv_emb = embedder.encode([conversation_of(records[i]).text for i in res.kept])
    c = len(catalog_items)
    n = len(res.kept)
    res.remap = score_matrix(n, c, scores_dir / f"{desc}_remap.f32" if scores_dir else None)
    res.reflect = score_matrix(n, c, scores_dir / f"{desc}_reflect.f32" if scores_dir else None)
    for j, items in enumerate(res.teacher_items):
        emb = (torch.stack([item_emb[f"{t} ({y})"] for t, y in items]) if items
               else torch.zeros(0, catalog_emb.shape[1]))
        ind = exact_match_indicator(items, index, c)
        res.remap[j] = remap_scores(emb, ind, conv_emb[j], catalog_emb,
                                    lam=cfg.lambda_context)
        res.reflect[j] = res.remap[j]
    if not (cfg.reflect and cfg.reflect_top > 0 and teacher.can_rate):
        return res
    top = min(cfg.reflect_top, c)
    bar = _bar(range(len(res.kept)), len(res.kept), f"{desc}: reflect", cfg.disable_tqdm)
    pending: list[tuple[int, list[int], list[tuple[str, int]]]] = []
    fractional = getattr(teacher, "fractional_ratings", False)

    def flush():
        if not pending:
            return
        convs = [conversation_of(records[res.kept[j]]) for j, _, _ in pending]
        raw_many = getattr(teacher, "rate_raw_many", None)
        requests = [(cv, cands) for cv, (_, _, cands) in zip(convs, pending)]
        answers = _each_that_fits(
            raw_many and (lambda rs: raw_many([c for c, _ in rs], [k for _, k in rs])),
            lambda r: teacher.rate_raw(*r), requests)
        for cv, (j, ids, cands), ans in zip(convs, pending, answers):
            if ans is None:  # its row keeps the remap scores
                res.counts["reflect skipped: request longer than the teacher's context"] += 1
                continue
            cache.put("rate", [cv.text, [list(x) for x in cands]], ans)
            _apply_rating(j, ids, cands, ans)
        pending.clear()

    def _apply_rating(j, ids, cands, ans):
        r = parse_ratings(ans, cands, fractional=fractional)
        res.counts["reflect rated conversations"] += 1
        res.counts["reflect candidates"] += len(cands)
        res.counts["reflect ratings missing (scored 0)"] += r.missing
        res.counts["reflect garbled lines"] += r.garbled
        res.counts["reflect nonzero ratings"] += sum(x != 0 for x in r.ratings)
        res.reflect[j] = reflect_scores(res.remap[j], ids, r.ratings, gamma=cfg.gamma)

    for j in bar:
        rec = records[res.kept[j]]
        masked = res.remap[j].masked_fill(_seen_mask(rec, titles), float("-inf"))
        ids = masked.topk(top).indices.tolist()
        ids = [i for i in ids if masked[i] != float("-inf")]
        cands = [catalog_items[i] for i in ids]
        req = [conversation_of(rec).text, [list(x) for x in cands]]
        ans = cache.get("rate", req)
        if ans is not None:
            _apply_rating(j, ids, cands, ans)
            continue
        pending.append((j, ids, cands))
        if len(pending) >= cfg.teacher_batch_size:
            flush()
    flush()
    return res


def top_items(scores: torch.Tensor, record: Mapping[str, Any],
              catalog_items: list[tuple[str, int]], k: int) -> list[tuple[str, int]]:
    """The `k` best catalog items for a record, never a title the user already mentioned."""
    titles = [t for t, _ in catalog_items]
    masked = scores.masked_fill(_seen_mask(record, titles), float("-inf"))
    idx = masked.topk(min(k, len(catalog_items))).indices.tolist()
    return [catalog_items[i] for i in idx if masked[i] != float("-inf")]


def _targets(records, kept, index) -> list[list[int]]:
    out = []
    for i in kept:
        out.append([index[it] for it in groundtruth_pairs(records[i]) if it in index])
    return out


def ablation(records: Sequence[Mapping[str, Any]], scored: Scored, fit: AdjustResult | None,
             catalog: Catalog, catalog_items: list[tuple[str, int]], k_max: int = 20
             ) -> dict[str, dict[str, float]]:
    """Mean Recall/NDCG@5/10/20 of each variant over the kept records (docs/math.md section 10)."""
    table: dict[str, dict[str, float]] = {}
    variants = {"teacher": None, "remap": scored.remap, "remap+reflect": scored.reflect}
    if fit is not None:
        variants["full"] = scored.reflect
    for name, mat in variants.items():
        sums = Counter()
        for j, i in enumerate(scored.kept):
            rec = records[i]
            row = None if mat is None else (fit.apply(mat[j]) if name == "full" else mat[j])
            recs = (scored.teacher_items[j] if row is None
                    else top_items(row, rec, catalog_items, k_max))
            gt = rec["groundtruth_with_release_year"]
            seen = rec.get("seen_titles", ())
            for k in KS:
                sums[f"recall@{k}"] += recall_at_k(recs, gt, seen, catalog, k)
                sums[f"ndcg@{k}"] += ndcg_at_k(recs, gt, seen, catalog, k)
        n = max(len(scored.kept), 1)
        table[name] = {key: sums[key] / n for key in
                       [f"{m}@{k}" for m in ("recall", "ndcg") for k in KS]}
    return table


def ablation_markdown(table: Mapping[str, Mapping[str, float]], n: int) -> str:
    cols = [f"{m}@{k}" for m in ("recall", "ndcg") for k in KS]
    lines = [f"| variant (n={n}) | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- run


def run_rra(cfg: RRAConfig, *, teacher: Teacher | None = None,
            embedder: Embedder | None = None) -> dict[str, Any]:
    """Run the pipeline (see the module doc); returns the manifest."""
    t0 = time.time()
    cfg.validate()
    out = Path(cfg.output_dir)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    catalog = load_rra_catalog(cfg.catalog)
    catalog_items = list(catalog)
    index = {it: c for c, it in enumerate(catalog_items)}
    train = load_input_records(cfg.train_file, cfg.max_records)
    if not train:
        raise RRAError(f"rra.train_file={cfg.train_file!r}: no records")
    evals = (load_input_records(cfg.eval_file, cfg.max_eval_records) if cfg.eval_file
             else [])
    if embedder is None:
        embedder = SentenceTransformerEmbedder(cfg.embedder)
    if teacher is None:
        teacher = build_teacher(cfg, train, catalog, cache_dir)
    cache = AnswerCache(cache_dir / "answers", teacher)
    t_load = time.time() - t0
    texts = item_texts(catalog_items, cfg.metadata_file, cfg.metadata_columns)
    cat_emb, cat_hit = catalog_embeddings(embedder, texts, cache_dir / "embeddings")
    manifest: dict[str, Any] = {
        "teacher": {"name": teacher.name, **teacher.fingerprint(),
                    "can_rate": teacher.can_rate},
        "embedder": embedder.name, "options": cfg.to_dict(),
        "catalog": {"source": cfg.catalog, "items": len(catalog_items),
                    "embedding_cache_hit": cat_hit},
    }
    reflect_on = cfg.reflect and cfg.reflect_top > 0 and teacher.can_rate
    if not reflect_on:
        manifest["reflect_skipped"] = (
            f"teacher {teacher.name!r} cannot rate candidates" if not teacher.can_rate
            else "disabled by rra.reflect=false or rra.reflect_top=0")
    t1 = time.time()
    scores_dir = out / "scores"  # memory-mapped score matrices, removed at the end
    tr = score_split(train, teacher, embedder, cache, catalog_items, cat_emb, cfg, "train",
                     scores_dir)
    if not tr.kept:
        raise RRAError(f"no usable training record: all {len(train)} were skipped "
                       f"({dict(tr.skips)})")
    t_train = time.time() - t1
    targets = _targets(train, tr.kept, index)
    fit = None
    if cfg.adjust:
        # The fit reads the memory-mapped scores chunk by chunk.
        fit = fit_adjust(tr.reflect, targets, lambda_w=cfg.lambda_w, lambda_b=cfg.lambda_b,
                         chunk_size=cfg.adjust_chunk_size, max_iter=cfg.adjust_max_iter)
        manifest["adjust"] = {"objective": fit.objective, "grad_norm": fit.grad_norm,
                              "iterations": fit.iterations, "pairs": fit.num_pairs,
                              "w_mean": float(fit.w.mean()), "w_std": float(fit.w.std()),
                              "b_std": float(fit.b.std())}
        torch.save({"w": fit.w, "b": fit.b, "catalog": catalog_items}, out / "adjust.pt")
    sft = []
    for j, i in enumerate(tr.kept):
        rec = dict(train[i])
        row = fit.apply(tr.reflect[j]) if fit is not None else tr.reflect[j]
        items = top_items(row, rec, catalog_items, cfg.num_out)
        rec["completion"] = format_completion(items)
        sft.append(rec)
    written = write_jsonl(sft, out / "sft.jsonl")
    manifest["train"] = {"records": len(train), "written": written,
                         "skipped": sum(tr.skips.values()), "skips": dict(tr.skips),
                         "counts": dict(tr.counts),
                         "records_with_gt_in_catalog": sum(bool(t) for t in targets)}
    if evals:
        t2 = time.time()
        ev = score_split(evals, teacher, embedder, cache, catalog_items, cat_emb, cfg, "eval",
                         scores_dir)
        table = ablation(evals, ev, fit, catalog, catalog_items) if ev.kept else {}
        manifest["eval"] = {"records": len(evals), "scored": len(ev.kept),
                            "skips": dict(ev.skips), "counts": dict(ev.counts),
                            "ablation": table, "seconds": round(time.time() - t2, 1)}
        with atomic_write_text(out / "ablation.json") as f:
            json.dump({"n": len(ev.kept), "table": table}, f, indent=1)
        with atomic_write_text(out / "ablation.md") as f:
            f.write(ablation_markdown(table, len(ev.kept)))
    del tr
    if evals:
        del ev
    shutil.rmtree(scores_dir, ignore_errors=True)
    manifest["cache"] = {"answer_hits": cache.hits, "folder": str(cache_dir)}
    if hasattr(teacher, "requests_sent"):  # the endpoint teacher's own HTTP cache
        manifest["cache"]["endpoint_requests_sent"] = teacher.requests_sent
        manifest["cache"]["endpoint_cache_hits"] = teacher.cache_hits
    manifest["seconds"] = {"load": round(t_load, 1), "train_scoring": round(t_train, 1),
                           "total": round(time.time() - t0, 1)}
    manifest["output"] = str(out / "sft.jsonl")
    with atomic_write_text(out / "manifest.json") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    return manifest
