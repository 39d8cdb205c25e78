"""`rankgrpo demo`: the CPU demonstration (about 6 minutes on 2 idle cores).

Part a, a learning demonstration on a SYNTHETIC world (rankgrpo/synthetic.py): real Reddit-v2
catalog titles with random latent tastes, simulated users, conversations that mention liked
movies and taste words, ground truth drawn from the tastes. A tiny Qwen2 (0.6M parameters)
is trained from scratch. Stage 1 (SFT) imitates a deliberately weak teacher, a popularity
chart of a random taste that never looks at the conversation; its loss also covers the
conversation tokens, a stand-in for the language pretraining a real LLM brings (without it
the tiny model's hidden states carry nothing about the user, and in our runs RL then did
not learn within 90 steps). Stage 2 is Rank-GRPO (exp_inf) with the true per-rank reward.
Held-out Recall/NDCG@5/10/20 are printed for the teacher, the global popularity list, SFT
and Rank-GRPO (and vanilla GRPO with the sequence-DCG reward with --compare); --seeds N
repeats part a over N seeds and reports the spread.

Part b, a real-data check: the same pipeline on the ReDial-derived records shipped in
rankgrpo/data (stage 1 imitates the popularity teacher fitted on the training split, stage
2 is Rank-GRPO), printed beside that popularity baseline. For the CPU budget each
conversation keeps its last 4 turns and the policy's items are the 500 most-mentioned
movies (metrics still match against the full catalog). No lift is claimed: sparse real
data does not give a CPU-sized model a learnable signal in minutes.

Both parts go through the project's trainer (`sft_train`, `grpo_train`, `evaluate`); the
demo only builds the data, the tokenizer (rankgrpo/tiny.py: one token per catalog item) and
the model, and reports. Results go to `<out>/demo_results.json` (written atomically) with
two PNGs beside it: per-rank training rewards and held-out NDCG@10 over RL steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

KS = (5, 10, 20)
METRIC_KEYS = tuple(f"{m}@{k}" for k in KS for m in ("recall", "ndcg"))
# The stage-2 row ("rank_grpo") is named from its config: `stage2_label`.
LABELS = {"teacher": "teacher (taste chart)", "popularity": "popularity (global)",
          "sft": "SFT", "grpo": "GRPO (sequence DCG)", "rank_grpo_log": "Rank-GRPO (log)"}
# Stage-2 variants trained from the same SFT model with --compare (issue 16): the config's
# stage 2 (Rank-GRPO exp_inf by default), Rank-GRPO with the causal-DCG `log` reward, and
# vanilla GRPO (one sequence DCG reward, token-level ratio, clip 0.2 / 0.26).
COMPARE = {"rank_grpo_log": {"reward_kind": "log", "importance_sampling_level": "rank"},
           "grpo": {"reward_kind": "sequence_dcg", "importance_sampling_level": "token",
                    "epsilon": 0.2, "epsilon_high": 0.26}}
# The synthetic worlds (docs/demo/control-world-design.md): "coherent" is the default world,
# whose SFT teacher lists one taste's chart (the first item decides the rest); "control" is
# the same world with the global teacher (no taste coherence across ranks).
WORLDS = {"coherent": "taste_chart", "control": "global"}
# Per-step rollout metrics averaged over a run (rankgrpo/rl_step.py): how much of the reward
# carries no group-relative signal, and how many loss tokens get a non-zero advantage.
SIGNAL_KEYS = ("frac_reward_zero_std", "frac_reward_zero_std_cells",
               "frac_tokens_nonzero_advantage")


def stage2_label(grpo) -> str:
    """The stage-2 row's name from its config (overrides may change the reward or level)."""
    if grpo.importance_sampling_level == "rank":
        return f"Rank-GRPO ({grpo.reward_kind})"
    return f"stage 2 ({grpo.reward_kind} reward, {grpo.importance_sampling_level} level)"


TOKENIZER_NOTE = ("tokenizer: word level, built in-process; every catalog item `Title (Year)` "
                  "is ONE token, `\\n` is one token (a 20-item list is 40 tokens with EOS), "
                  "and the paper's fixed instruction that opens every prompt is one token")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rankgrpo demo", description=__doc__.split("\n\n")[0],
        epilog="Overrides (section.key=value) apply to part a's config, e.g. "
               "grpo.max_steps=200.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of world, model and training")
    p.add_argument("--seeds", type=int, default=1,
                   help="run part a for this many seeds (seed, seed+1, ...) and report the "
                        "spread; part b runs once")
    p.add_argument("--compare", action="store_true",
                   help="also train Rank-GRPO with the log reward and vanilla GRPO "
                        "(sequence-DCG reward, token-level ratio) from the same SFT model")
    p.add_argument("--world", choices=("coherent", "control", "both"), default="coherent",
                   help="synthetic world(s): coherent (default; the SFT teacher lists one "
                        "taste), control (the global teacher: no list-level coherence; "
                        "docs/demo/control-world-design.md) or both")
    p.add_argument("--segment-modes", default=None,
                   help="comma list, e.g. newline,aligned: run every rank-level method once "
                        "per segment mode (default: the config's grpo.segment_mode)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny world and a few steps (tests; numbers mean nothing)")
    p.add_argument("--skip-redial", action="store_true", help="skip part b")
    p.add_argument("--config", default="demo", help="part a config (preset or YAML file)")
    p.add_argument("--redial-config", default="demo-redial",
                   help="part b config (preset or YAML file)")
    p.add_argument("--redial-turns", type=int, default=4,
                   help="keep the last N turns of each ReDial conversation (0: all)")
    p.add_argument("--redial-items", type=int, default=500,
                   help="the policy's items: the N movies ReDial's training records mention "
                        "most (0: the whole catalog)")
    p.add_argument("overrides", nargs="*", help="section.key=value for part a")
    return p


# ----------------------------------------------------------------------------- helpers

DIAG_KEYS = ("items_per_list", "exact_length_rate", "duplicate_rate", "out_of_catalog_rate",
             "seen_rate", "parse_failure_rate")


def _pick(m: dict) -> dict[str, float]:
    return {k: float(m[k]) for k in METRIC_KEYS}


def _diag(m: dict) -> dict[str, float]:
    return {k: round(float(m[k]), 4) for k in DIAG_KEYS if k in m}


def _with(section, **changes):
    return dataclasses.replace(section, **changes)


def _quick_config(cfg):
    """Shrink a config to a smoke run (a few optimizer steps)."""
    cfg.model.tiny = {**(cfg.model.tiny or {}), "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 1, "num_attention_heads": 2,
                      "num_key_value_heads": 2}
    g = cfg.grpo.num_generations = 4
    cfg.sft = _with(cfg.sft, per_device_train_batch_size=8, max_steps=2, logging_steps=1)
    cfg.grpo = _with(cfg.grpo, per_device_train_batch_size=2 * g, max_steps=2, eval_steps=0,
                     logging_steps=1)
    cfg.eval = _with(cfg.eval, batch_size=16)
    return cfg


def _quiet_threads() -> None:
    """OpenMP threads that sleep instead of spinning while they wait. Must run before torch
    is imported. A tiny model makes thousands of small ops, and on a shared 2-core machine
    two processes with spinning threads slowed each other ~25x in our measurement
    (0.11 s -> 3.2 s per SFT step); passive waiting costs ~1.4x alone (0.16 s) and stays at
    0.19 s per step beside another such process. An explicit OMP_WAIT_POLICY wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _silence() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars


def _curve(history: list[dict], key: str = "ndcg@10") -> list[list[float]]:
    return [[float(e["step"]), float(e[key])] for e in history if key in e]


# ----------------------------------------------------------------------------- part a

def stage2_runs(cfg, compare: bool, segment_modes: list[str] | None) -> list[tuple[str, dict]]:
    """(name, GRPOConfig changes) of every stage-2 run trained from one SFT model. With
    several segment modes each rank-level run is repeated per mode, named `name@mode`
    (token-level GRPO does not use segments and runs once)."""
    runs = [("rank_grpo", {})] + (list(COMPARE.items()) if compare else [])
    if not segment_modes or len(segment_modes) == 1:
        mode = {"segment_mode": segment_modes[0]} if segment_modes else {}
        return [(n, {**c, **mode}) for n, c in runs]
    out = []
    for name, changes in runs:
        level = changes.get("importance_sampling_level", cfg.grpo.importance_sampling_level)
        if level == "token":
            out.append((name, changes))
        else:
            out += [(f"{name}@{m}", {**changes, "segment_mode": m}) for m in segment_modes]
    return out


class DemoInterrupted(Exception):
    """A training stage stopped by Ctrl-C: the demo stops too (no partial table)."""


def _stop_if_interrupted(res, what: str) -> None:
    if getattr(res, "interrupted", False):
        raise DemoInterrupted(f"{what} stopped by Ctrl-C after step {res.step}")


def _signal(history: list[dict]) -> dict[str, float]:
    """Run means of SIGNAL_KEYS over the logged steps (keys looked up by suffix)."""
    out = {}
    for key in SIGNAL_KEYS:
        vals = [float(v) for h in history for k, v in h.items()
                if (k == key or k.endswith("/" + key)) and v is not None]
        if vals:
            out[key] = round(sum(vals) / len(vals), 4)
    return out


def run_synthetic(seed: int, cfg, out: Path, *, compare: bool, quick: bool, log,
                  world_config=None, world_name: str = "coherent",
                  segment_modes: list[str] | None = None) -> dict:
    """Part a for one seed and world: world -> teacher -> SFT -> the stage-2 runs of
    `stage2_runs` (Rank-GRPO; with `compare` also Rank-GRPO log and GRPO), each from the same
    SFT model. Returns metrics, curves, the per-rank training rewards and per-run reward
    signal statistics (SIGNAL_KEYS)."""
    from .catalog import Catalog
    from .metrics import evaluate as score_texts
    from .sft import sft_train
    from .synthetic import WorldConfig, build_world, list_coherence
    from .teacher import PopularityTeacher, format_completion
    from .tiny import build_tokenizer, prompt_prefix, tiny_model
    from .train import grpo_train

    n = cfg.data.num_ranks
    wcfg = world_config or WorldConfig(num_recommendations=n)
    if quick:
        wcfg = WorldConfig(num_items=60, num_tastes=4, num_train_users=24,
                           num_heldout_users=6, num_recommendations=n)
    wcfg = dataclasses.replace(wcfg, teacher=WORLDS[world_name])
    t0 = time.perf_counter()
    world = build_world(seed, wcfg)
    catalog = Catalog((t, int(y)) for t, y in world.items)
    tok = build_tokenizer(world.titles, texts=[r["prompt"] for r in world.train],
                          words=world.taste_words, phrases=[prompt_prefix(n)])
    info = world.summary()
    info["name"] = world_name
    info["coherence"] = {k: round(v, 4) for k, v in list_coherence(world).items()}
    c = info["coherence"]
    log(f"[synthetic seed {seed}] world {world_name!r} (teacher {wcfg.teacher}): items 2..N "
        f"share item 1's taste {c['same_taste_as_first']:.0%}; hits at ranks 2..N "
        f"{c['hits_after_first_in_taste']:.2f} with item 1 in the user's taste, "
        f"{c['hits_after_first_off_taste']:.2f} otherwise (teacher lists, held-out)")
    log(f"[synthetic seed {seed}] SYNTHETIC world: {info['items']} real catalog titles with "
        f"random latent tastes {info['tastes']}; {info['train_records']} train conversations "
        f"({info['train_users']} users) / {info['heldout_records']} held-out "
        f"({info['heldout_users']} other users); vocabulary {len(tok)}")

    # The teacher's own lists for the held-out conversations (what SFT imitates) and the
    # single global popularity list.
    texts = [r["completion"] for r in world.heldout]
    results: dict[str, Any] = {"teacher": _pick(score_texts(world.heldout, texts, catalog,
                                                            KS, num_ranks=n))}
    popular = PopularityTeacher(world.popularity_ranking())
    texts = [format_completion(popular(r, n)) for r in world.heldout]
    results["popularity"] = _pick(score_texts(world.heldout, texts, catalog, KS, num_ranks=n))

    model = tiny_model(tok, seed=seed, **(cfg.model.tiny or {}))
    params = sum(p.numel() for p in model.parameters())
    whole = "" if cfg.sft.completion_only_loss else \
        "; SFT loss also on the conversation tokens (stand-in for language pretraining)"
    log(f"[synthetic seed {seed}] tiny Qwen2 from scratch: {params / 1e6:.2f}M parameters; "
        f"SFT teacher: a random taste's popularity chart, blind to the conversation{whole}")
    base = out / "synthetic" / (f"seed{seed}" if world_name == "coherent"
                                else f"{world_name}-seed{seed}")
    sft = sft_train(model, tok, world.train, _with(cfg.sft, output_dir=str(base / "sft"),
                                                   seed=seed),
                    catalog=catalog, num_ranks=n, eval_records=world.heldout,
                    eval_config=cfg.eval)
    _stop_if_interrupted(sft, "SFT")
    results["sft"] = _pick(sft.eval_history[-1])
    diagnostics = {"sft": _diag(sft.eval_history[-1])}
    curves: dict[str, list] = {"sft": _curve(sft.eval_history[-1:])}
    rewards: dict[str, list] = {}
    signal: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    runs = stage2_runs(cfg, compare, segment_modes)
    for i, (name, changes) in enumerate(runs):
        # every run starts from the same SFT weights (the last one may consume them)
        policy = sft.model if i == len(runs) - 1 else copy.deepcopy(sft.model)
        gcfg = _with(cfg.grpo, output_dir=str(base / name.replace("_", "-").replace("@", "-")),
                     seed=seed, **changes)
        t_run = time.perf_counter()
        res = grpo_train(policy, tok, world.train, catalog, gcfg, num_ranks=n,
                         eval_records=world.heldout, eval_config=cfg.eval)
        _stop_if_interrupted(res, name)
        results[name] = _pick(res.eval_history[-1])
        diagnostics[name] = _diag(res.eval_history[-1])
        start = [[0.0, results["sft"]["ndcg@10"]]]
        curves[name] = start + _curve(res.eval_history)
        rewards[name] = [[float(h["step"])] + [float(h.get(f"relevance/rank_{k + 1}", math.nan))
                                               for k in range(n)] for h in res.history]
        signal[name] = _signal(res.history)
        seconds[name] = round(time.perf_counter() - t_run, 1)
        log(f"[synthetic seed {seed}] {world_name} {name}: NDCG@10 "
            f"{results[name]['ndcg@10']:.4f} ({seconds[name]:.0f} s); " +
            ", ".join(f"{k} {v:.3f}" for k, v in signal[name].items()))
        del policy
    return {"seed": seed, "world_name": world_name, "metrics": results, "curves": curves,
            "relevance_per_rank": rewards, "diagnostics": diagnostics, "signal": signal,
            "run_seconds": seconds,
            "world": info, "vocab_size": len(tok), "parameters": params,
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- part b

def last_turns(record: dict, max_turns: int, num_ranks: int = 20) -> dict:
    """A copy of a ReDial record whose prompt keeps only the last `max_turns` turns of the
    conversation (the CPU budget; long dialogues are several hundred tokens)."""
    from .prompts import PROMPT_PREFIX, build_prompt

    prefix = PROMPT_PREFIX.format(num_ranks=num_ranks)
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.startswith(prefix):
        return dict(record)
    lines = prompt[len(prefix):].rstrip("\n").split("\n")
    if len(lines) <= max_turns or not all(ln.startswith(("USER: ", "SYSTEM: ")) for ln in lines):
        return dict(record)
    turns = [tuple(ln.split(": ", 1)) for ln in lines[-max_turns:]]
    return {**record, "prompt": build_prompt(turns, num_ranks)}


def most_mentioned(records, catalog, k: int) -> list[tuple[str, int]]:
    """The k catalog items the records mention most (ground truth and seen titles)."""
    from collections import Counter

    from .records import groundtruth_pairs

    by_title: dict[str, list[tuple[str, int]]] = {}
    for t, y in catalog:
        by_title.setdefault(t, []).append((t, int(y)))
    counts: Counter = Counter()
    for r in records:
        counts.update(it for it in groundtruth_pairs(r) if it in catalog)
        for title in r["seen_titles"]:
            counts.update(by_title.get(title, ()))
    return [it for it, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def run_redial(seed: int, cfg, out: Path, *, quick: bool, log, max_turns: int = 4,
               max_items: int = 500) -> dict:
    """Part b: the same pipeline as part a on the shipped ReDial records (train split ->
    test split): stage 1 imitates the weak popularity teacher (`PopularityTeacher` fitted on
    the training records), stage 2 is Rank-GRPO with the true reward. For the CPU budget
    each conversation keeps its last `max_turns` turns, and the policy's item vocabulary is
    the `max_items` movies the training records mention most (0 for either: no cut).
    Rewards and metrics match against the full ReDial catalog."""
    from .catalog import Catalog
    from .metrics import evaluate as score_texts
    from .records import groundtruth_pairs
    from .redial import load_default_redial, load_default_redial_catalog
    from .sft import sft_train
    from .teacher import PopularityTeacher, build_sft_targets, format_completion, round_trips
    from .tiny import build_tokenizer, prompt_prefix, tiny_model
    from .train import grpo_train

    n = cfg.data.num_ranks
    t0 = time.perf_counter()
    data = load_default_redial()
    train, test = data["train"], data["test"]
    if cfg.data.max_train_samples:
        train = train[:cfg.data.max_train_samples]
    if cfg.data.max_eval_samples:
        test = test[:cfg.data.max_eval_samples]
    if quick:
        train, test = train[:32], test[:8]
    if max_turns > 0:
        train = [last_turns(r, max_turns, n) for r in train]
        test = [last_turns(r, max_turns, n) for r in test]
    catalog = load_default_redial_catalog()
    movies = Catalog(most_mentioned(train, catalog, max_items)) if max_items > 0 else catalog
    popular = PopularityTeacher.from_records(train, movies)
    train = build_sft_targets(train, popular, n)
    items = [f"{t} ({y})" for t, y in movies if round_trips((t, y))]
    tok = build_tokenizer(items, texts=[r["prompt"] for r in train], min_count=3,
                          phrases=[prompt_prefix(n)])
    gt = [it for r in test for it in groundtruth_pairs(r)]
    coverage = sum(it in movies for it in gt) / max(1, len(gt))
    cut = f"the last {max_turns} turns of each conversation" if max_turns > 0 else \
        "whole conversations"
    log(f"[redial] ReDial (CC BY 4.0; Li et al. 2018, He et al. 2023): {len(train)} train / "
        f"{len(test)} test records, {cut}; the policy's items are the {len(movies)} movies "
        f"of the {len(catalog)}-movie catalog the training records mention most "
        f"({coverage:.0%} of the test ground truth); vocabulary {len(tok)} (words seen 3+ "
        "times in training prompts; the rest <unk>)")
    texts = [format_completion(popular(r, n)) for r in test]
    results: dict[str, Any] = {"popularity": _pick(score_texts(test, texts, catalog, KS,
                                                               num_ranks=n))}
    model = tiny_model(tok, seed=seed, **(cfg.model.tiny or {}))
    base = out / "redial"
    sft = sft_train(model, tok, train, _with(cfg.sft, output_dir=str(base / "sft"), seed=seed),
                    catalog=catalog, num_ranks=n, eval_records=test, eval_config=cfg.eval)
    results["sft"] = _pick(sft.eval_history[-1])
    res = grpo_train(sft.model, tok, train, catalog,
                     _with(cfg.grpo, output_dir=str(base / "rank-grpo"), seed=seed),
                     num_ranks=n, eval_records=test, eval_config=cfg.eval)
    results["rank_grpo"] = _pick(res.eval_history[-1])
    results.update({"train_records": len(train), "test_records": len(test),
                    "catalog_size": len(catalog), "max_turns": max_turns,
                    "policy_items": len(movies), "test_groundtruth_coverage": coverage,
                    "sft_steps": sft.step,
                    "rank_grpo_steps": res.step,
                    "diagnostics": {"sft": _diag(sft.eval_history[-1]),
                                    "rank_grpo": _diag(res.eval_history[-1])},
                    "seconds": time.perf_counter() - t0})
    return results


# ----------------------------------------------------------------------------- reporting

def _table(rows: list[tuple[str, dict]]) -> str:
    w = max([24] + [len(name) + 1 for name, _ in rows])
    head = " " * w + "".join(f"{k:>11s}" for k in METRIC_KEYS)
    lines = [head]
    for name, m in rows:
        lines.append(f"{name:{w}s}" + "".join(f"{m[k]:11.4f}" for k in METRIC_KEYS))
    return "\n".join(lines)


def seed_summary(runs: list[dict]) -> dict:
    """Per-seed NDCG@10 / Recall@10 of every method, means, spreads (max - min) and the lift
    of the first Rank-GRPO run (`rank_grpo`, or `rank_grpo@<mode>`) over SFT."""
    methods = list(runs[0]["metrics"])
    main_rg = next(m for m in methods if m.split("@")[0] == "rank_grpo")
    table = []
    for r in runs:
        row = {"seed": r["seed"]}
        for m in methods:
            row[f"{m}/ndcg@10"] = r["metrics"][m]["ndcg@10"]
            row[f"{m}/recall@10"] = r["metrics"][m]["recall@10"]
        row["lift/ndcg@10"] = row[f"{main_rg}/ndcg@10"] - row["sft/ndcg@10"]
        table.append(row)
    keys = [k for k in table[0] if k != "seed"]
    mean = {k: sum(t[k] for t in table) / len(table) for k in keys}
    spread = {k: max(t[k] for t in table) - min(t[k] for t in table) for k in keys}
    worst = max(spread["sft/ndcg@10"], spread[f"{main_rg}/ndcg@10"])
    return {"per_seed": table, "mean": mean, "spread": spread,
            "min_lift_ndcg@10": min(t["lift/ndcg@10"] for t in table),
            "largest_spread_ndcg@10": worst,
            "lift_exceeds_spread": min(t["lift/ndcg@10"] for t in table) > worst}


def _seed_table(summary: dict) -> str:
    cols = [k for k in summary["per_seed"][0] if k != "seed"]
    short = [c.replace("rank_grpo", "RG").replace("teacher", "teach").replace("popularity", "pop")
             .replace("/", " ") for c in cols]
    w = [max(16, len(c) + 2) for c in short]
    lines = [f"{'seed':>8s}" + "".join(f"{c:>{n}s}" for c, n in zip(short, w))]
    for row in summary["per_seed"]:
        lines.append(f"{row['seed']:8d}" + "".join(f"{row[c]:{n}.4f}" for c, n in zip(cols, w)))
    for what in ("mean", "spread"):
        lines.append(f"{what:>8s}" + "".join(f"{summary[what][c]:{n}.4f}"
                                             for c, n in zip(cols, w)))
    return "\n".join(lines)


def method_label(name: str, labels: dict[str, str]) -> str:
    """`rank_grpo@aligned` -> "Rank-GRPO (exp_inf) [aligned]"."""
    base, _, mode = name.partition("@")
    return labels.get(base, base) + (f" [{mode}]" if mode else "")


def save_plots(runs: list[dict], out: Path, labels: dict[str, str],
               suffix: str = "") -> list[str]:
    """rewards_per_rank{suffix}.png (training relevance per rank, first seed) and
    heldout_ndcg{suffix}.png (held-out NDCG@10 over RL steps, every seed); `labels` names
    the methods."""
    labels = {**labels, **{k: method_label(k, labels) for r in runs for k in r["metrics"]}}
    world = runs[0].get("world_name", "coherent")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    first = runs[0]
    names = list(first["relevance_per_rank"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = first["relevance_per_rank"][name]
        if rows:
            steps = [r[0] for r in rows]
            n = len(rows[0]) - 1
            cmap = plt.get_cmap("viridis")
            window = max(1, len(rows) // 15)
            for k in range(n):
                ys = [r[k + 1] for r in rows]
                sm = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1])
                      for i in range(len(ys))]
                ax.plot(steps, sm, color=cmap(k / max(1, n - 1)), lw=1.2,
                        label=f"rank {k + 1}" if k in (0, 4, 9, 19) else None)
        ax.set_title(f"{labels[name]}: training reward per rank (seed {first['seed']})")
        ax.set_xlabel("RL step")
        ax.set_ylabel(f"mean relevance at rank k (moving avg {window})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"SYNTHETIC world ({world}): per-rank rewards of the sampled lists",
                 fontsize=10)
    fig.tight_layout()
    p = out / f"rewards_per_rank{suffix}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = ("tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:red", "tab:brown")
    colors = {k: palette[i % len(palette)] for i, k in
              enumerate(k for k in runs[0]["curves"] if k != "sft")}
    for i, run in enumerate(runs):
        for name, pts in run["curves"].items():
            if name == "sft" or not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    color=colors.get(name, "tab:green"), alpha=1.0 if i == 0 else 0.45,
                    label=labels[name] if i == 0 else None)
        ax.axhline(run["metrics"]["teacher"]["ndcg@10"], color="grey", ls=":", lw=1,
                   label=labels["teacher"] if i == 0 else None)
        ax.axhline(run["metrics"]["popularity"]["ndcg@10"], color="grey", ls="--", lw=1,
                   label=labels["popularity"] if i == 0 else None)
    ax.set_xlabel("RL step (0 = the SFT model)")
    ax.set_ylabel("held-out NDCG@10")
    ax.set_title(f"SYNTHETIC world ({world}): held-out NDCG@10 over RL steps "
                 f"({len(runs)} seed{'s' if len(runs) > 1 else ''})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / f"heldout_ndcg{suffix}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))
    return paths


def compare_summary(runs: list[dict]) -> dict[str, dict]:
    """Per stage-2 method over seeds: NDCG@10 per seed and mean, mean signal statistics
    (SIGNAL_KEYS) and mean wall seconds of its RL run."""
    out: dict[str, dict] = {}
    for name in runs[0].get("signal", {}):
        nd = [r["metrics"][name]["ndcg@10"] for r in runs]
        rec = [r["metrics"][name]["recall@10"] for r in runs]
        row = {"ndcg@10": nd, "mean_ndcg@10": sum(nd) / len(nd),
               "mean_recall@10": sum(rec) / len(rec),
               "mean_run_seconds": sum(r["run_seconds"][name] for r in runs) / len(runs)}
        for k in SIGNAL_KEYS:
            vals = [r["signal"][name][k] for r in runs if k in r["signal"][name]]
            if vals:
                row[k] = sum(vals) / len(vals)
        out[name] = row
    return out


def _compare_table(summary: dict[str, dict], labels: dict[str, str]) -> str:
    lines = [f"{'method':34s}{'NDCG@10 per seed':>26s}{'mean':>8s}{'R@10':>8s}"
             f"{'0-std prompts':>15s}{'0-std cells':>13s}{'tok A!=0':>10s}{'s/run':>8s}"]
    for name, row in summary.items():
        per = " ".join(f"{v:.4f}" for v in row["ndcg@10"])
        lines.append(f"{method_label(name, labels):34s}{per:>26s}{row['mean_ndcg@10']:8.4f}"
                     f"{row['mean_recall@10']:8.4f}"
                     f"{row.get('frac_reward_zero_std', math.nan):15.3f}"
                     f"{row.get('frac_reward_zero_std_cells', math.nan):13.3f}"
                     f"{row.get('frac_tokens_nonzero_advantage', math.nan):10.3f}"
                     f"{row['mean_run_seconds']:8.0f}")
    return "\n".join(lines)


def save_compare_plot(by_world: dict[str, list[dict]], out: Path,
                      labels: dict[str, str]) -> str:
    """compare_ndcg.png: held-out NDCG@10 of every stage-2 method (and SFT) per world, one
    dot per seed and a bar at the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_world), figsize=(6.5 * len(by_world), 4.5),
                             squeeze=False, sharey=True)
    for ax, (world, runs) in zip(axes[0], by_world.items()):
        names = ["sft"] + list(runs[0].get("signal", {}))
        for i, name in enumerate(names):
            vals = [r["metrics"][name]["ndcg@10"] for r in runs]
            ax.bar(i, sum(vals) / len(vals), color="tab:blue" if i else "grey", alpha=0.5)
            ax.plot([i] * len(vals), vals, "k.", ms=6)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([method_label(n, labels) for n in names], rotation=25, ha="right",
                           fontsize=8)
        ax.set_title(f"SYNTHETIC world '{world}' ({len(runs)} seed"
                     f"{'s' if len(runs) > 1 else ''})", fontsize=10)
        ax.set_ylabel("held-out NDCG@10")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    p = out / "compare_ndcg.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return str(p)


def write_results(path: Path, results: dict) -> None:
    from .fileio import atomic_write_text

    with atomic_write_text(path) as f:
        json.dump(results, f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------- main

def load_demo_config(path: str, overrides=()):
    """A demo config: every section checked as usual, except that `model.tiny` needs no saved
    tokenizer (the demo builds its tokenizer in-process)."""
    from .config import SECTIONS, ConfigError, load_config, validate_section

    cfg = load_config(path, list(overrides), validate=False)
    for name in SECTIONS:
        validate_section(name, getattr(cfg, name))
    if not cfg.model.tiny:
        raise ConfigError(f"{path}: the demo trains a tiny model from scratch; set model.tiny")
    return cfg


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.seeds < 1:
        print("rankgrpo demo: --seeds must be >= 1", file=sys.stderr)
        return 2
    _quiet_threads()
    _silence()
    import torch

    from .config import ConfigError

    try:
        cfg = load_demo_config(args.config, args.overrides)
        rcfg = load_demo_config(args.redial_config)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rankgrpo demo: {e}", file=sys.stderr)
        return 2
    if args.quick:
        cfg, rcfg = _quick_config(cfg), _quick_config(rcfg)
    labels = {**LABELS, "rank_grpo": stage2_label(cfg.grpo)}
    modes = [m.strip() for m in args.segment_modes.split(",")] if args.segment_modes else None
    from .config import SEGMENT_MODES

    if modes and (not all(m in SEGMENT_MODES for m in modes) or len(set(modes)) != len(modes)):
        print(f"rankgrpo demo: --segment-modes: expected distinct values of "
              f"{sorted(SEGMENT_MODES)}, got {args.segment_modes!r}", file=sys.stderr)
        return 2
    worlds = ["coherent", "control"] if args.world == "both" else [args.world]

    def wlab(world: str) -> dict[str, str]:  # the control world's teacher is the global chart
        return {**labels, "teacher": "teacher (global draw)"} if world == "control" else labels
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    log("rankgrpo demo: part a is a SYNTHETIC world (labelled so everywhere); part b is "
        "real ReDial data.")
    log(TOKENIZER_NOTE)
    by_world: dict[str, list[dict]] = {}
    for world in worlds:
        runs = by_world.setdefault(world, [])
        for s in range(args.seed, args.seed + args.seeds):
            try:
                runs.append(run_synthetic(s, cfg, out, compare=args.compare, quick=args.quick,
                                          log=log, world_name=world, segment_modes=modes))
            except DemoInterrupted as e:
                print(f"rankgrpo demo: {e}; stopping (checkpoints are under {out})",
                      file=sys.stderr)
                return 130
            m = runs[-1]["metrics"]
            log(f"\nSYNTHETIC world {world!r}, seed {s}, held-out "
                f"({runs[-1]['world']['heldout_records']} conversations):\n"
                + _table([(method_label(k, wlab(world)), m[k]) for k in m]) + "\n")
    redial = None
    if not args.skip_redial:
        redial = run_redial(args.seed, rcfg, out, quick=args.quick, log=log,
                            max_turns=args.redial_turns, max_items=args.redial_items)
    plots = []
    for world, runs in by_world.items():
        plots += save_plots(runs, out, labels, "" if world == worlds[0] else f"_{world}")
    multi = args.compare or len(worlds) > 1 or bool(modes and len(modes) > 1)
    if multi:
        plots.append(save_compare_plot(by_world, out, labels))
    runs = by_world[worlds[0]]
    first = runs[0]
    results: dict[str, Any] = {**first["metrics"]}
    results["redial"] = redial
    results["seed"] = args.seed
    results["synthetic"] = {"world": first["world"], "vocab_size": first["vocab_size"],
                            "diagnostics": first["diagnostics"],
                            "parameters": first["parameters"], "curves": first["curves"],
                            "tokenizer": TOKENIZER_NOTE}
    if len(runs) > 1:
        results["seeds"] = seed_summary(runs)
        results["seeds"]["curves"] = {r["seed"]: r["curves"] for r in runs}
    results["worlds"] = {
        w: {"coherence": [r["world"]["coherence"] for r in rs],
            "teacher": rs[0]["world"]["config"]["teacher"],
            "per_seed": [{k: r[k] for k in ("seed", "metrics", "diagnostics", "signal",
                                            "run_seconds", "seconds")} for r in rs],
            "compare": compare_summary(rs),
            **({"seeds": seed_summary(rs)} if len(rs) > 1 else {})}
        for w, rs in by_world.items()}
    results["settings"] = {"world": args.world, "compare": bool(args.compare),
                           "segment_modes": modes or [cfg.grpo.segment_mode],
                           "seeds": list(range(args.seed, args.seed + args.seeds)),
                           "config": args.config, "overrides": list(args.overrides),
                           "grpo_max_steps": cfg.grpo.max_steps}
    results["labels"] = {**labels, **{k: method_label(k, labels) for rs in by_world.values()
                                      for k in rs[0]["metrics"]}}
    results["plots"] = plots
    results["quick"] = bool(args.quick)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    results["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    results["torch_threads"] = torch.get_num_threads()
    write_results(out / "demo_results.json", results)

    log("=" * 90)
    for world, rs in by_world.items():
        for r in rs:
            log(f"SYNTHETIC world {world!r} (labelled synthetic), seed {r['seed']}, held-out:\n"
                + _table([(method_label(k, wlab(world)), v)
                          for k, v in r["metrics"].items()]))
        if len(rs) > 1:
            summ = seed_summary(rs)
            log(f"\n{world!r}: {len(rs)} seeds, NDCG@10 / Recall@10 (RG = Rank-GRPO; lift = "
                "RG - SFT):\n" + _seed_table(summ))
            verdict = "exceeds" if summ["lift_exceeds_spread"] else "does NOT exceed"
            log(f"smallest lift {summ['min_lift_ndcg@10']:.4f} {verdict} the largest seed "
                f"spread {summ['largest_spread_ndcg@10']:.4f} (SFT or Rank-GRPO NDCG@10)")
        if multi:
            c = rs[0]["world"]["coherence"]
            log(f"\nworld {world!r}: stage-2 methods from the same SFT model (mean over "
                f"{len(rs)} seed{'s' if len(rs) > 1 else ''}; 0-std = share of prompts / "
                "(prompt, rank) cells whose rewards have zero spread; tok A!=0 = share of loss "
                "tokens with a non-zero advantage); teacher lists: items 2..N share item 1's "
                f"taste {c['same_taste_as_first']:.0%} (seed {rs[0]['seed']}):\n"
                + _compare_table(results["worlds"][world]["compare"], labels))
    if redial is not None:
        log(f"\nReDial (real data, {redial['train_records']} train / {redial['test_records']} "
            "test records; no lift claimed on CPU):\n" +
            _table([("popularity (SFT teacher)", redial["popularity"]), ("SFT", redial["sft"]),
                    (stage2_label(rcfg.grpo), redial["rank_grpo"])]))
    log(f"\nwrote {out / 'demo_results.json'} and {', '.join(plots)} "
        f"({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
