"""Relevance and rank-level rewards (docs/math.md sections 2-3).

Public names other programs call: `parse_recommendations`, `rank_relevance`, `rank_rewards`,
`sequence_dcg` (and `dcg_terms`, the one DCG formula that the rewards, the trainer's rollout
metrics and the evaluation metrics share); batch helpers `relevance_matrix`,
`rewards_from_relevance` and `reward_matrix` return torch tensors for the trainer.
`REWARD_KINDS` is the one list of reward kinds (the config validates against it). Length
shaping and per-token advantages (section 5) live in `rankgrpo_kernels` and the aligned
token-to-item mapping in `rankgrpo.alignment`; both are re-exported here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Any

import torch

from rankgrpo_kernels import LengthShaping, eos_mask_from_ids, length_shaping, token_advantages

from .alignment import AlignedBatch, aligned_segment_ids
from .parsing import parse_recommendations

__all__ = [
    "parse_recommendations", "rank_relevance", "rank_rewards", "sequence_dcg", "dcg_terms",
    "relevance_matrix", "rewards_from_relevance", "reward_matrix", "REWARD_KINDS",
    "RANK_REWARD_KINDS", "year_offsets",
    "LengthShaping", "length_shaping", "eos_mask_from_ids", "token_advantages",
    "AlignedBatch", "aligned_segment_ids",
]

# Per-rank rewards [N] per completion (Rank-GRPO) ...
RANK_REWARD_KINDS = ("exp_inf", "log", "exp_gamma")
# ... plus the one sequence reward of vanilla GRPO / GSPO (a scalar per completion).
REWARD_KINDS = RANK_REWARD_KINDS + ("sequence_dcg",)
_WS = re.compile(r"\s+")


def normalize_title(title: str) -> str:
    """Ground-truth matching key: whitespace collapsed, casefolded (rule 3 of section 2)."""
    return _WS.sub(" ", title.strip()).casefold()


def year_offsets(tolerance: int = 2) -> list[int]:
    """The order in which years are tried: 0, +1, -1, +2, -2, ... up to `tolerance`."""
    out = [0]
    for d in range(1, tolerance + 1):
        out += [d, -d]
    return out


def _gt_year(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def rank_relevance(recs: Sequence[tuple[str, int]] | str,
                   groundtruth: Iterable[Sequence[Any]],
                   seen_titles: Iterable[str],
                   catalog: Container | None,
                   num_ranks: int = 20,
                   *, year_tolerance: int = 2) -> list[int]:
    """Binary relevance of the first `num_ranks` items, zero-padded to `num_ranks`.

    `rel_k = 1` only if the title is not in `seen_titles` (exact string), `(title, year)` is
    in `catalog` exactly, and the casefolded, whitespace-collapsed title equals an unused
    ground-truth title whose year is within `year_tolerance` (tried in the order 0, +1, -1,
    +2, -2). A matched ground-truth entry is consumed (multiset), so repeats score 0.

    Args:
        recs: parsed `(title, year)` items, or the raw generated text (parsed here).
        groundtruth: `[[title, "year"], ...]` as in the records (int years accepted); entries
            whose year is not an integer can never match.
        seen_titles: titles mentioned earlier in the conversation.
        catalog: any container of `(title, int year)`; None skips the catalog check.
        num_ranks: N, the list length.
    """
    if isinstance(recs, str):
        recs = parse_recommendations(recs)
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    seen = set(seen_titles)
    # normalised title -> year -> remaining count: the ground truth as a multiset.
    remaining: dict[str, dict[int, int]] = {}
    for entry in groundtruth:
        if len(entry) != 2:
            raise ValueError(f"ground-truth entry {entry!r} is not a [title, year] pair")
        year = _gt_year(entry[1])
        if year is None:
            continue
        bucket = remaining.setdefault(normalize_title(str(entry[0])), {})
        bucket[year] = bucket.get(year, 0) + 1
    offsets = year_offsets(year_tolerance)
    rel = [0] * num_ranks
    for k, (title, raw_year) in enumerate(recs[:num_ranks]):
        year = _gt_year(raw_year)
        if year is None or title in seen:
            continue
        if catalog is not None and (title, year) not in catalog:
            continue
        bucket = remaining.get(normalize_title(title))
        if not bucket:
            continue
        for d in offsets:
            if bucket.get(year + d, 0) > 0:
                bucket[year + d] -= 1
                rel[k] = 1
                break
    return rel


def rank_rewards(relevance: Sequence[float], kind: str = "exp_inf",
                 gamma: float | None = None) -> list[float]:
    """Rank-level rewards `r_k` from relevance `rel_1..rel_N` (docs/math.md section 3).

    - "exp_inf": `r_k = rel_k` (the limit Gamma -> inf; the paper's main method);
    - "log": causal DCG, `r_k = sum_{j=k..N} rel_j / log2(j + 1)`, j the absolute rank;
    - "exp_gamma": `r_k = sum_{j=k..N} rel_j / gamma^(j - k)`, any `gamma > 1` (inf allowed).
    """
    if kind not in RANK_REWARD_KINDS:
        hint = " ('sequence_dcg' is one reward per completion: use sequence_dcg)" \
            if kind == "sequence_dcg" else ""
        raise ValueError(f"kind must be one of {RANK_REWARD_KINDS}, got {kind!r}{hint}")
    rel = [float(r) for r in relevance]
    if kind == "exp_inf":
        return rel
    out = [0.0] * len(rel)
    acc = 0.0
    if kind == "log":  # the suffix sums of the DCG terms
        for k, term in reversed(list(enumerate(dcg_terms(rel)))):
            acc += term
            out[k] = acc
        return out
    if gamma is None or not gamma > 1:
        raise ValueError(f"kind='exp_gamma' needs gamma > 1, got {gamma!r}")
    for k in range(len(rel) - 1, -1, -1):  # r_k = rel_k + r_{k+1} / gamma
        acc = rel[k] + acc / gamma
        out[k] = acc
    return out


def dcg_terms(relevance: Sequence[float]) -> list[float]:
    """`rel_j / log2(j + 1)` for the 1-based ranks j = 1..len: the terms of every DCG here
    (the sequence reward, the causal "log" rank reward, NDCG in rollouts and evaluation)."""
    return [float(r) / math.log2(j + 2) for j, r in enumerate(relevance)]


def sequence_dcg(relevance: Sequence[float]) -> float:
    """`DCG@N = sum_j rel_j / log2(j + 1)`: the one sequence reward of vanilla GRPO
    (reward kind "sequence_dcg"), also the DCG of the NDCG metrics."""
    return float(sum(dcg_terms(relevance)))


def relevance_matrix(generations: Sequence[Sequence[tuple[str, int]] | str],
                     records: Sequence[Mapping[str, Any]],
                     catalog: Container | None, num_ranks: int = 20,
                     *, year_tolerance: int = 2) -> torch.Tensor:
    """`[B, N]` float32 relevance of each generation against its record (same order)."""
    if len(generations) != len(records):
        raise ValueError(f"{len(generations)} generations but {len(records)} records")
    rows = [rank_relevance(g, r["groundtruth_with_release_year"], r["seen_titles"], catalog,
                           num_ranks, year_tolerance=year_tolerance)
            for g, r in zip(generations, records)]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), num_ranks)


def rewards_from_relevance(relevance: torch.Tensor, kind: str = "exp_inf",
                           gamma: float | None = None) -> torch.Tensor:
    """Float32 rewards from a `[B, N]` relevance matrix: `[B, N]` rank rewards for a kind of
    `RANK_REWARD_KINDS` (as `rank_rewards`), or `[B]` for `kind="sequence_dcg"` (the vanilla
    GRPO baseline)."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"kind must be one of {REWARD_KINDS}, got {kind!r}")
    if relevance.dim() != 2:
        raise ValueError(f"relevance must be [B, N], got shape {tuple(relevance.shape)}")
    rows = relevance.tolist()
    if kind == "sequence_dcg":
        return torch.tensor([sequence_dcg(r) for r in rows], dtype=torch.float32)
    return torch.tensor([rank_rewards(r, kind, gamma) for r in rows],
                        dtype=torch.float32).reshape(relevance.shape)


def reward_matrix(generations: Sequence[Sequence[tuple[str, int]] | str],
                  records: Sequence[Mapping[str, Any]],
                  catalog: Container | None, num_ranks: int = 20,
                  kind: str = "exp_inf", gamma: float | None = None,
                  *, year_tolerance: int = 2) -> torch.Tensor:
    """`rewards_from_relevance` of `relevance_matrix`: rank rewards `[B, N]`, or `[B]`
    sequence DCG for `kind="sequence_dcg"`."""
    rel = relevance_matrix(generations, records, catalog, num_ranks,
                           year_tolerance=year_tolerance)
    return rewards_from_relevance(rel, kind, gamma)
