"""Remap-Reflect-Adjust end to end: 20 shipped ReDial records with the in-process tiny model
as the teacher, the offline all-MiniLM-L6-v2 embedder, the SFT output read back by the
records loader, resumption from the answer cache, and bad input (empty catalog, a teacher
that returns nothing, a missing embedder, a conversation too long for the teacher)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from rankgrpo.catalog import load_default_catalog, write_catalog_tsv
from rankgrpo.records import groundtruth_pairs, load_records
from rankgrpo.redial import load_default_redial
from rankgrpo.rra.cli import main as rra_main
from rankgrpo.rra.config import RRAConfig, load_rra_config
from rankgrpo.rra.embed import EmbedderError, SentenceTransformerEmbedder
from rankgrpo.rra.pipeline import RRAError, run_rra
from rankgrpo.rra.teacher import CooccurrenceRRATeacher, HFTeacher, conversation_of
from rankgrpo.teacher import format_completion

N_TRAIN, N_EVAL = 20, 8
sys.path.insert(0, str(Path(__file__).parent))  # tests/_rra_tiny.py


@pytest.fixture(scope="module")
def embedder():
    return SentenceTransformerEmbedder()


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    """The records' own items plus the first 150 others: small enough to embed fast."""
    full = list(load_default_catalog("redial"))
    recs = load_default_redial("train")[:N_TRAIN] + load_default_redial("test")[:N_EVAL]
    keep = set(full[:150])
    by_title = {}
    for t, y in full:
        by_title.setdefault(t, []).append((t, y))
    for r in recs:
        keep.update(it for it in groundtruth_pairs(r) if it in set(full))
        for t in r["seen_titles"]:
            keep.update(by_title.get(t, ()))
    path = tmp_path_factory.mktemp("cat") / "catalog.tsv"
    write_catalog_tsv(keep, path)
    return str(path)


def _cfg(tmp_path, catalog, **kw):
    base = dict(train_file="redial:train", eval_file="redial:test", catalog=catalog,
                max_records=N_TRAIN, max_eval_records=N_EVAL, output_dir=str(tmp_path / "out"),
                disable_tqdm=True, max_new_tokens=40, rate_max_new_tokens=40, reflect_top=5,
                teacher_batch_size=8)
    base.update(kw)
    return RRAConfig(**base)


@pytest.fixture(scope="module")
def tiny_teacher(small_catalog):
    """The tiny in-process model, taught the list and rating formats (tests/_rra_tiny.py)."""
    from _rra_tiny import build_trained_teacher_model

    from rankgrpo.catalog import load_catalog

    model, tok = build_trained_teacher_model(load_default_redial("train")[:N_TRAIN],
                                             list(load_catalog(small_catalog)))
    return HFTeacher(model, tok, name="tiny", batch_size=8, max_new_tokens=40,
                     rate_max_new_tokens=40)


class ScriptedTeacher:
    """Lists the record's ground truth (or nothing for chosen conversations) and rates the
    first candidate 2; counts its calls."""

    name, can_rate = "scripted", True

    def __init__(self, empty_for=()):
        self.empty_for = set(empty_for)
        self.calls = 0

    def fingerprint(self):
        return {"kind": "scripted", "empty": sorted(self.empty_for)}

    def recommend(self, conversations, n):
        self.calls += len(conversations)
        return ["" if c.record.get("turn_id") in self.empty_for else
                format_completion(groundtruth_pairs(c.record)) for c in conversations]

    def rate_raw(self, conversation, candidates):
        self.calls += 1
        return "\n".join(f"{t} ({y})####{2 if i == 0 else 0}"
                         for i, (t, y) in enumerate(candidates))


@pytest.mark.slow  # ~20-30 s on a busy 2-core machine; still runs in CI
def test_end_to_end_tiny_teacher(tmp_path, small_catalog, embedder, tiny_teacher):
    cfg = _cfg(tmp_path, small_catalog)
    man = run_rra(cfg, teacher=tiny_teacher, embedder=embedder)
    recs = load_records(tmp_path / "out" / "sft.jsonl")  # validates the Reddit-v2 form
    assert len(recs) == man["train"]["written"] == N_TRAIN - man["train"]["skipped"]
    train = load_default_redial("train")[:N_TRAIN]
    for r in recs:
        items = [ln for ln in r["completion"].split("\n") if ln]
        assert len(items) == cfg.num_out
        assert r["prompt"] in {t["prompt"] for t in train}
        seen = set(r["seen_titles"])
        assert not any(ln.rsplit(" (", 1)[0] in seen for ln in items)
    assert man["teacher"]["name"] == "tiny" and man["embedder"] == "all-MiniLM-L6-v2"
    counts = man["train"]["counts"]
    assert counts["reflect rated conversations"] == len(recs)
    assert counts["reflect candidates"] == 5 * len(recs)
    assert counts["reflect ratings missing (scored 0)"] <= counts["reflect candidates"]
    assert man["adjust"]["grad_norm"] < 1e-3
    table = json.loads((tmp_path / "out" / "ablation.json").read_text())["table"]
    assert set(table) == {"teacher", "remap", "remap+reflect", "full"}
    for row in table.values():
        assert all(0.0 <= v <= 1.0 for v in row.values())
    # a rerun resumes from the cache: no new generation, same output
    first = (tmp_path / "out" / "sft.jsonl").read_text()
    calls = []
    orig = tiny_teacher.complete
    tiny_teacher.complete = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        man2 = run_rra(cfg, teacher=tiny_teacher, embedder=embedder)
    finally:
        tiny_teacher.complete = orig
    assert calls == []
    assert man2["catalog"]["embedding_cache_hit"]
    assert man2["cache"]["answer_hits"] > 0
    assert (tmp_path / "out" / "sft.jsonl").read_text() == first


@pytest.mark.slow  # ~10 s
def test_expected_ratings_end_to_end(tmp_path, small_catalog, embedder, tiny_teacher):
    """rate_decoding=expected: every candidate gets a rating, none missing or garbled (the
    fractional answers pass the parser), and the teacher is named so in the manifest."""
    teacher = HFTeacher(tiny_teacher.model, tiny_teacher.tokenizer, name="tiny",
                        batch_size=8, max_new_tokens=40, rate_max_new_tokens=40,
                        rate_decoding="expected")
    man = run_rra(_cfg(tmp_path, small_catalog, eval_file=None, adjust=False,
                       rate_decoding="expected"), teacher=teacher, embedder=embedder)
    counts = man["train"]["counts"]
    assert counts["reflect candidates"] == 5 * counts["reflect rated conversations"] > 0
    assert counts["reflect ratings missing (scored 0)"] == 0
    assert counts["reflect garbled lines"] == 0
    assert counts["reflect nonzero ratings"] > 0
    assert man["teacher"]["rate_decoding"] == "expected"


def test_scripted_teacher_grounds_the_ground_truth(tmp_path, small_catalog, embedder):
    teacher = ScriptedTeacher()
    man = run_rra(_cfg(tmp_path, small_catalog, adjust=False), teacher=teacher,
                  embedder=embedder)
    table = man["eval"]["ablation"]
    # the teacher names exactly the ground truth, which is in the catalog: remap must rank
    # it first (p_1 (S + I) = 2 beats anything else), so recall@5 is the teacher's own
    assert table["remap"]["recall@5"] == pytest.approx(table["teacher"]["recall@5"])
    assert table["teacher"]["recall@5"] > 0.9
    assert man["train"]["counts"]["reflect garbled lines"] == 0
    assert man["train"]["counts"]["reflect nonzero ratings"] == man["train"]["written"]


def test_empty_teacher_answers_are_counted_skips(tmp_path, small_catalog, embedder):
    train = load_default_redial("train")[:N_TRAIN]
    empty = {train[i]["turn_id"] for i in (0, 3, 7)}
    man = run_rra(_cfg(tmp_path, small_catalog, eval_file=None),
                  teacher=ScriptedTeacher(empty), embedder=embedder)
    assert man["train"]["skips"] == {"teacher returned nothing": 3}
    assert man["train"]["written"] == N_TRAIN - 3
    every = {r["turn_id"] for r in train}
    with pytest.raises(RRAError, match="no usable training record.*returned nothing"):
        run_rra(_cfg(tmp_path / "b", small_catalog, eval_file=None),
                teacher=ScriptedTeacher(every), embedder=embedder)


def test_conversation_longer_than_context_is_a_counted_skip(tmp_path, small_catalog,
                                                             embedder, tiny_teacher):
    convs = [conversation_of(r) for r in load_default_redial("train")[:N_TRAIN]]
    lengths = sorted(len(tiny_teacher._ids(c.text)) for c in convs)
    short = HFTeacher(tiny_teacher.model, tiny_teacher.tokenizer, name="tiny-short",
                      max_new_tokens=40, rate_max_new_tokens=40,
                      max_context=lengths[N_TRAIN // 2] + 120)
    man = run_rra(_cfg(tmp_path, small_catalog, eval_file=None, reflect=False), teacher=short,
                  embedder=embedder)
    skipped = man["train"]["skips"].get("conversation longer than the teacher's context", 0)
    assert 0 < skipped < N_TRAIN
    assert man["train"]["written"] == N_TRAIN - skipped


def test_rating_request_longer_than_context_is_a_counted_skip(tmp_path, small_catalog,
                                                                embedder):
    """A rating request that does not fit keeps its row's remap scores and is counted; the
    other requests of its batch are still rated."""
    from rankgrpo.rra.teacher import ContextTooLong

    train = load_default_redial("train")[:N_TRAIN]
    long = {conversation_of(train[i]).text for i in (1, 4)}

    class Tight(ScriptedTeacher):
        def rate_raw_many(self, conversations, candidates):
            if any(c.text in long for c in conversations):
                raise ContextTooLong("a rating request does not fit")
            return [self.rate_raw(c, cands) for c, cands in zip(conversations, candidates)]

        def rate_raw(self, conversation, candidates):
            if conversation.text in long:
                raise ContextTooLong("does not fit")
            return super().rate_raw(conversation, candidates)

    man = run_rra(_cfg(tmp_path, small_catalog, eval_file=None, adjust=False), teacher=Tight(),
                  embedder=embedder)
    counts = man["train"]["counts"]
    assert counts["reflect skipped: request longer than the teacher's context"] == 2
    assert counts["reflect rated conversations"] == N_TRAIN - 2
    assert man["train"]["written"] == N_TRAIN


def test_cooccurrence_teacher_skips_reflect(tmp_path, small_catalog, embedder):
    from rankgrpo.catalog import load_catalog

    train = load_default_redial("train")[:N_TRAIN]
    teacher = CooccurrenceRRATeacher.from_records(train, load_catalog(small_catalog))
    man = run_rra(_cfg(tmp_path, small_catalog, eval_file=None), teacher=teacher,
                  embedder=embedder)
    assert "cannot rate" in man["reflect_skipped"]
    assert "reflect rated conversations" not in man["train"]["counts"]
    assert man["train"]["written"] == N_TRAIN


def test_empty_catalog_is_an_error(tmp_path, embedder):
    path = tmp_path / "empty.tsv"
    path.write_text("title\tyear\n")
    with pytest.raises(RRAError, match="catalog is empty"):
        run_rra(_cfg(tmp_path, str(path)), teacher=ScriptedTeacher(), embedder=embedder)
    assert rra_main([f"catalog={path}", f"output_dir={tmp_path}/o", "teacher=cooccurrence",
                     "disable_tqdm=true"]) == 2


def test_missing_embedder_is_a_clear_error(monkeypatch):
    with pytest.raises(EmbedderError, match="not installed"):
        SentenceTransformerEmbedder("pkg:no_such_embedder_pkg/model")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(EmbedderError, match="needs sentence-transformers"):
        SentenceTransformerEmbedder()


def test_config_overrides_and_errors(tmp_path, capsys):
    f = tmp_path / "rra.yaml"
    f.write_text("rra:\n  teacher: cooccurrence\n  reflect_top: 7\n")
    cfg = load_rra_config([str(f)], ["gamma=0.25", "rra.max_records=3"])
    assert (cfg.teacher, cfg.reflect_top, cfg.gamma, cfg.max_records) == \
        ("cooccurrence", 7, 0.25, 3)
    assert rra_main(["--config", str(f), "reflect_topp=3"]) == 2
    assert "unknown config key 'rra.reflect_topp'" in capsys.readouterr().err
    assert rra_main(["gamma=abc"]) == 2
    assert "rra.gamma" in capsys.readouterr().err
    assert rra_main(["teacher=endpoint"]) == 2
    assert "endpoint_url" in capsys.readouterr().err
    assert rra_main(["--print-config", "num_out=5"]) == 0
    assert "num_out: 5" in capsys.readouterr().out


def test_remap_scores_are_float32_rows(tmp_path, small_catalog, embedder):
    # catalog embeddings are cached by embedder + content; a different text set misses
    from rankgrpo.rra.embed import catalog_embeddings

    a, hit_a = catalog_embeddings(embedder, ["Heat (1995)", "Alien (1979)"], tmp_path)
    b, hit_b = catalog_embeddings(embedder, ["Heat (1995)", "Alien (1979)"], tmp_path)
    c, hit_c = catalog_embeddings(embedder, ["Heat (1995)"], tmp_path)
    assert (hit_a, hit_b, hit_c) == (False, True, False)
    assert torch.equal(a, b) and a.dtype == torch.float32 and c.shape[0] == 1


def test_item_texts_with_metadata(tmp_path):
    from rankgrpo.rra.pipeline import item_texts

    meta = tmp_path / "meta.tsv"
    meta.write_text("title\tyear\tkeywords\tplot\nHeat\t1995\theist, LA\tA cop and a thief.\n"
                    "Alien\t1979\t\tA crew meets a creature.\n")
    items = [("Alien", 1979), ("Heat", 1995), ("Jaws", 1975)]
    assert item_texts(items) == ["Alien (1979)", "Heat (1995)", "Jaws (1975)"]
    assert item_texts(items, str(meta)) == [
        "Alien (1979); plot: A crew meets a creature.",
        "Heat (1995); keywords: heist, LA; plot: A cop and a thief.", "Jaws (1975)"]
    assert item_texts(items, str(meta), ["keywords"])[1] == "Heat (1995); keywords: heist, LA"
    with pytest.raises(RRAError, match="'genre' is not a column"):
        item_texts(items, str(meta), ["genre"])
