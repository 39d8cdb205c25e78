"""Remap (Eq. 10 of the paper, docs/rra/README.md).

The teacher's free-text list is grounded in the catalog by scoring every catalog item:

    s_remap[c] = sum_k p_k * (S[k, c] + I[k, c]) + lambda * s_context[c]

with `p_k = 1 / sqrt(k)` for the teacher's rank k = 1..K, `S` the cosine similarity between
the teacher's item texts and the catalog's item texts, `I` the exact-match indicator (the
project's catalog membership: exact title, exact integer year) and `s_context` the cosine
similarity between the conversation and each catalog item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def rank_weights(k: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`p_k = 1 / sqrt(k)` for ranks 1..k; shape [k]."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return torch.arange(1, k + 1, dtype=dtype).rsqrt()


def exact_match_indicator(items: Sequence[tuple[str, int]],
                          index: Mapping[tuple[str, int], int], num_items: int, *,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`I[k, c] = 1` when the teacher's k-th item is exactly catalog item c; shape [K, C].

    `index` maps `(title, int year)` to the catalog column (`catalog_index`); matching is the
    project's catalog membership: case-sensitive title, exact year.
    """
    ind = torch.zeros(len(items), num_items, dtype=dtype)
    for k, (title, year) in enumerate(items):
        c = index.get((str(title), int(year)))
        if c is not None:
            ind[k, c] = 1.0
    return ind


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` [m, d] with every row of `b` [n, d]: [m, n]."""
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    return a @ b.T


def remap_scores(teacher_emb: torch.Tensor, indicator: torch.Tensor,
                 context_emb: torch.Tensor, catalog_emb: torch.Tensor, *,
                 lam: float = 1.0) -> torch.Tensor:
    """Eq. 10 for one conversation.

    Args:
        teacher_emb: [K, d] embeddings of the teacher's K item texts (K may be 0).
        indicator: [K, C] exact-match indicator (`exact_match_indicator`).
        context_emb: [d] embedding of the conversation.
        catalog_emb: [C, d] embeddings of the catalog's item texts.
        lam: weight of the conversation-context term (the paper's lambda, 1).
    Returns:
        [C] float tensor `s_remap`.
    """
    num_k = teacher_emb.shape[0]
    if indicator.shape != (num_k, catalog_emb.shape[0]):
        raise ValueError(f"indicator has shape {tuple(indicator.shape)}, expected "
                         f"({num_k}, {catalog_emb.shape[0]})")
    context = cosine(context_emb.reshape(1, -1), catalog_emb)[0]
    if num_k == 0:
        return lam * context
    p = rank_weights(num_k, dtype=catalog_emb.dtype)
    sim = cosine(teacher_emb, catalog_emb)
    return p @ (sim + indicator.to(sim.dtype)) + lam * context
