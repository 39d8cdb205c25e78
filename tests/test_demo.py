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
