"""The CPU demo: the synthetic world's properties, the tiny tokenizer, and a --quick run."""

from __future__ import annotations

import json

import pytest

from rankgrpo.catalog import Catalog
from rankgrpo.metrics import ndcg_at_k, recall_at_k
from rankgrpo.parsing import parse_recommendations
from rankgrpo.records import validate_records
from rankgrpo.synthetic import WorldConfig, build_world, record_conversation

SMALL = WorldConfig(num_items=80, num_tastes=5, num_train_users=150, num_heldout_users=60)


@pytest.fixture(scope="module")
def world():
    return build_world(3, SMALL)


@pytest.fixture(scope="module")
def tokenizer(world):
    from rankgrpo.tiny import build_tokenizer

    return build_tokenizer(world.titles, texts=[r["prompt"] for r in world.train],
                           words=world.taste_words)


def test_world_is_deterministic_given_the_seed(world):
    again = build_world(3, SMALL)
    assert again.train == world.train and again.heldout == world.heldout
    assert again.items == world.items
    other = build_world(4, SMALL)
    assert other.train != world.train


def test_no_user_in_both_splits(world):
    assert world.train and world.heldout
    assert len(world.train_users) == len(world.train)
    assert len(world.heldout_users) == len(world.heldout)
    assert not set(world.train_users) & set(world.heldout_users)


def test_records_have_the_reddit_v2_form(world):
    validate_records(world.train + world.heldout)
    catalog = Catalog((t, int(y)) for t, y in world.items)
    n = world.config.num_recommendations
    for r in world.train[:50] + world.heldout[:50]:
        assert r["prompt"].startswith("Pretend you are a movie recommender system.")
        assert "Here is the conversation: USER: " in r["prompt"]
        items = parse_recommendations(r["completion"])
        assert len(items) == n and len(set(items)) == n
        assert all(it in catalog for it in items)
        assert not {t for t, _ in items} & set(r["seen_titles"])
        gt = r["groundtruth_with_release_year"]
        assert gt and all((t, int(y)) in catalog for t, y in gt)
        assert not {t for t, _ in gt} & set(r["seen_titles"])
        for title in r["seen_titles"]:
            assert title in record_conversation(r)


def test_the_teacher_ignores_the_conversation_and_the_conversation_carries_signal(world):
    """An oracle that reads only the conversation's taste words and liked movies beats the
    popularity list by a wide margin; the popularity list is the teacher's ranking."""
    catalog = Catalog((t, int(y)) for t, y in world.items)

    def mean(metric, lists, k):
        return sum(metric(lst, r["groundtruth_with_release_year"], r["seen_titles"], catalog, k)
                   for lst, r in zip(lists, world.heldout)) / len(world.heldout)

    pop = [world.popularity_list(r["seen_titles"]) for r in world.heldout]
    oracle = [world.oracle_list(r) for r in world.heldout]
    assert mean(ndcg_at_k, oracle, 10) > 2 * mean(ndcg_at_k, pop, 10) + 0.1
    assert mean(recall_at_k, oracle, 20) > mean(recall_at_k, pop, 20) + 0.2
    # teacher lists are sorted by popularity
    rank = {t: i for i, (t, _) in enumerate(world.popularity_ranking())}
    for r in world.train[:20]:
        order = [rank[t] for t, _ in parse_recommendations(r["completion"])]
        assert order == sorted(order)


def test_world_config_is_checked():
    with pytest.raises(ValueError, match="num_tastes"):
        WorldConfig(num_tastes=1).validate()
    with pytest.raises(ValueError, match="groundtruth_range"):
        WorldConfig(groundtruth_range=(3, 2)).validate()


def test_tiny_tokenizer_items_are_single_tokens(world, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from rankgrpo.tokens import newline_counts

    ids = tokenizer(world.titles, add_special_tokens=False)["input_ids"]
    assert all(len(x) == 1 for x in ids)
    rec = world.heldout[0]
    for text in (rec["prompt"], rec["completion"]):
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in enc
        assert tokenizer.decode(enc) == text
    comp = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
    assert len(comp) == 2 * world.config.num_recommendations - 1
    nl = newline_counts(tokenizer)
    assert int(nl[tokenizer.convert_tokens_to_ids("\n")]) == 1
    assert int(nl[ids[0][0]]) == 0 and int(nl.sum()) == 1
    for r in world.heldout:  # held-out prompts use no word outside the training vocabulary
        assert tokenizer.unk_token_id not in tokenizer(r["prompt"])["input_ids"]
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(rec["completion"])["input_ids"] == tokenizer(rec["completion"])["input_ids"]
    chat = again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert chat.endswith("<|assistant|>")


def test_tiny_model_generates_items(tokenizer):
    import torch

    from rankgrpo.tiny import tiny_model

    model = tiny_model(tokenizer, seed=0, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    assert model.config.vocab_size == len(tokenizer)
    ids = torch.tensor([tokenizer("Pretend")["input_ids"]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] <= ids.shape[1] + 3


def test_quick_demo_writes_results_and_plots(tmp_path):
    from rankgrpo.demo import KS, main

    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0
    res = json.loads((out / "demo_results.json").read_text())
    keys = {f"{m}@{k}" for k in KS for m in ("recall", "ndcg")}
    for name in ("teacher", "popularity", "sft", "rank_grpo"):
        assert set(res[name]) == keys
        assert all(0.0 <= v <= 1.0 for v in res[name].values())
    for name in ("popularity", "sft", "rank_grpo"):
        assert set(res["redial"][name]) == keys
    assert res["seed"] == 0 and res["seconds"] > 0 and res["quick"] is True
    assert res["synthetic"]["world"]["synthetic"] is True
    assert res["labels"]["rank_grpo"] == "Rank-GRPO (exp_inf)"
    for png in ("rewards_per_rank.png", "heldout_ndcg.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_summary_reports_lift_and_spread():
    from rankgrpo.demo import seed_summary

    def run(seed, sft, rg):
        m = {"teacher": {"ndcg@10": 0.1, "recall@10": 0.1},
             "sft": {"ndcg@10": sft, "recall@10": sft},
             "rank_grpo": {"ndcg@10": rg, "recall@10": rg}}
        return {"seed": seed, "metrics": m}

    s = seed_summary([run(0, 0.10, 0.30), run(1, 0.12, 0.28), run(2, 0.11, 0.33)])
    assert s["spread"]["rank_grpo/ndcg@10"] == pytest.approx(0.05)
    assert s["min_lift_ndcg@10"] == pytest.approx(0.16)
    assert s["lift_exceeds_spread"] is True
    s = seed_summary([run(0, 0.10, 0.12), run(1, 0.12, 0.20)])
    assert s["lift_exceeds_spread"] is False


def test_stage2_row_is_named_from_its_config():
    from rankgrpo.demo import load_demo_config, stage2_label

    assert stage2_label(load_demo_config("demo", []).grpo) == "Rank-GRPO (exp_inf)"
    assert stage2_label(load_demo_config("demo", ["grpo.reward_kind=log"]).grpo) == \
        "Rank-GRPO (log)"
    gspo = load_demo_config("demo", ["grpo.importance_sampling_level=sequence"]).grpo
    assert stage2_label(gspo) == "stage 2 (exp_inf reward, sequence level)"


def test_demo_rejects_bad_arguments(capsys):
    from rankgrpo.demo import main

    assert main(["--seeds", "0"]) == 2
    assert main(["grpo.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_redial_cuts_keep_the_end_of_the_conversation_and_the_most_mentioned_movies():
    from rankgrpo.demo import last_turns, most_mentioned
    from rankgrpo.prompts import build_prompt

    turns = [("USER" if i % 2 == 0 else "SYSTEM", f"turn {i}") for i in range(7)]
    rec = {"prompt": build_prompt(turns), "completion": "", "seen_titles": ["B"],
           "groundtruth_with_release_year": [["A", "2001"]]}
    assert last_turns(rec, 3)["prompt"] == build_prompt(turns[-3:])
    assert last_turns(rec, 3)["seen_titles"] == ["B"]
    assert last_turns(rec, 7)["prompt"] == rec["prompt"]
    catalog = Catalog([("A", 2001), ("B", 1999), ("C", 2010)])
    other = {**rec, "groundtruth_with_release_year": [["C", "2010"]], "seen_titles": ["B"]}
    assert most_mentioned([rec, other], catalog, 2) == [("B", 1999), ("A", 2001)]


def test_control_world_removes_list_coherence():
    """The coherent world's teacher lists one taste (its first item decides the rest); the
    control world's lists are taste-independent across ranks (docs/demo/control-world-design.md).
    Measured on the teacher lists of 150 held-out users (40 items per taste, so no top-up)."""
    import dataclasses

    from rankgrpo.synthetic import list_coherence

    cfg = WorldConfig(num_items=200, num_tastes=5, num_train_users=20, num_heldout_users=150)
    coherent = build_world(5, cfg)
    control = build_world(5, dataclasses.replace(cfg, teacher="global"))
    a, b = list_coherence(coherent), list_coherence(control)
    assert a["same_taste_as_first"] == 1.0
    assert b["same_taste_as_first"] < 1.5 / cfg.num_tastes
    assert a["hits_after_first_in_taste"] > 5 * a["hits_after_first_off_taste"]
    assert abs(b["hits_after_first_in_taste"] - b["hits_after_first_off_taste"]) < \
        0.3 * (a["hits_after_first_in_taste"] - a["hits_after_first_off_taste"])
    # lists given explicitly: the ground truth itself is all hits
    lists = [[f"{t} ({y})" for t, y in r["groundtruth_with_release_year"]]
             for r in coherent.heldout]
    c = list_coherence(coherent, lists)
    assert c["hits_after_first_in_taste"] >= 1.0 and c["hits_after_first_off_taste"] >= 1.0
    with pytest.raises(ValueError, match="one per held-out record"):
        list_coherence(coherent, lists[:-1])


def test_stage2_runs_and_signal_summary():
    from rankgrpo.demo import _signal, compare_summary, load_demo_config, stage2_runs

    cfg = load_demo_config("demo", [])
    assert [n for n, _ in stage2_runs(cfg, False, None)] == ["rank_grpo"]
    runs = dict(stage2_runs(cfg, True, None))
    assert list(runs) == ["rank_grpo", "rank_grpo_log", "grpo"]
    assert runs["rank_grpo_log"]["reward_kind"] == "log"
    assert runs["grpo"] == {"reward_kind": "sequence_dcg", "importance_sampling_level": "token",
                            "epsilon": 0.2, "epsilon_high": 0.26}
    runs = dict(stage2_runs(cfg, True, ["newline", "aligned"]))
    assert list(runs) == ["rank_grpo@newline", "rank_grpo@aligned", "rank_grpo_log@newline",
                          "rank_grpo_log@aligned", "grpo"]  # token-level GRPO has no segments
    assert runs["rank_grpo_log@aligned"] == {"reward_kind": "log",
                                             "importance_sampling_level": "rank",
                                             "segment_mode": "aligned"}
    assert dict(stage2_runs(cfg, False, ["aligned"]))["rank_grpo"] == {"segment_mode": "aligned"}
    hist = [{"step": 1, "frac_reward_zero_std": 0.5, "frac_reward_zero_std_cells": 0.75,
             "frac_tokens_nonzero_advantage": 0.2},
            {"step": 2, "frac_reward_zero_std": 0.0, "frac_reward_zero_std_cells": 0.25,
             "frac_tokens_nonzero_advantage": 0.6}]
    sig = _signal(hist)
    assert sig == {"frac_reward_zero_std": 0.25, "frac_reward_zero_std_cells": 0.5,
                   "frac_tokens_nonzero_advantage": 0.4}
    m = {"grpo": {"ndcg@10": 0.3, "recall@10": 0.2}}
    runs = [{"seed": s, "metrics": m, "signal": {"grpo": sig}, "run_seconds": {"grpo": 10.0 * s}}
            for s in (1, 3)]
    summ = compare_summary(runs)["grpo"]
    assert summ["ndcg@10"] == [0.3, 0.3] and summ["mean_run_seconds"] == 20.0
    assert summ["frac_tokens_nonzero_advantage"] == pytest.approx(0.4)


def test_quick_compare_in_the_control_world(tmp_path):
    from rankgrpo.demo import main

    out = tmp_path / "cmp"
    assert main(["--quick", "--compare", "--world", "control", "--skip-redial",
                 "--segment-modes", "aligned", "--out", str(out)]) == 0
    res = json.loads((out / "demo_results.json").read_text())
    assert set(res["worlds"]) == {"control"}
    assert res["worlds"]["control"]["teacher"] == "global"
    for world in res["worlds"].values():
        comp = world["compare"]
        assert list(comp) == ["rank_grpo", "rank_grpo_log", "grpo"]
        for row in comp.values():
            assert 0.0 <= row["frac_reward_zero_std_cells"] <= 1.0
            assert 0.0 <= row["frac_tokens_nonzero_advantage"] <= 1.0
            assert row["frac_reward_zero_std"] <= row["frac_reward_zero_std_cells"] + 1e-9
    assert res["settings"]["segment_modes"] == ["aligned"]
    assert (out / "compare_ndcg.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--segment-modes", "newline,bogus", "--out", str(out)]) == 2
