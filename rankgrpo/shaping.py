"""Per-token advantages and length shaping (SPEC section 5), vectorised over `[B, T]`.

Conventions shared with `rankgrpo_kernels`: `segment_ids[b, t]` is in `[0, N)` for a token
of item k, `N` for the single overflow bin, `-1` for padding; `mask` is 1 up to and
including the first EOS. No Python loop over tokens or rows: every function here is a few
tensor ops, so it runs on the device that holds the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LengthShaping:
    """Values of the length shaping (defaults: the released code).

    overflow_penalty: added to every masked token whose segment id is >= N.
    short_eos_penalty: added to the EOS token when the list ended with EOS with < N items.
    exact_eos_bonus: added to the EOS token when it has exactly N items, no overflow token
        and ended with EOS (in the code, not in the paper).
    Truncated completions (no EOS) get neither EOS term. Set all three to 0 to disable.
    """

    overflow_penalty: float = -0.1
    short_eos_penalty: float = -0.1
    exact_eos_bonus: float = 0.1


def eos_mask_from_ids(token_ids: torch.Tensor, mask: torch.Tensor,
                      eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """Bool `[B, T]`, True only at the first masked EOS of each row (none if truncated)."""
    ids = torch.as_tensor(list(eos_token_id) if isinstance(eos_token_id, Sequence)
                          else [eos_token_id], device=token_ids.device)
    is_eos = torch.isin(token_ids.long(), ids.long()) & mask.bool()
    return is_eos & (torch.cumsum(is_eos.long(), dim=-1) == 1)


def _check(segment_ids: torch.Tensor, mask: torch.Tensor, eos_mask: torch.Tensor) -> None:
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {tuple(segment_ids.shape)}")
    for name, t in (("mask", mask), ("eos_mask", eos_mask)):
        if t.shape != segment_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected "
                             f"{tuple(segment_ids.shape)} (the shape of segment_ids)")


def items_from_segments(segment_ids: torch.Tensor, eos_mask: torch.Tensor,
                        num_ranks: int) -> torch.Tensor:
    """Items per row in newline mode: the EOS token's segment id + 1 (capped at N + 1).

    Rows without EOS get the number of segments seen (max id + 1). In the aligned mode pass
    the parsed item count instead (`AlignedBatch.num_items`).
    """
    seg = segment_ids.long()
    at_eos = torch.where(eos_mask.bool(), seg, -1).amax(dim=-1)
    last = seg.amax(dim=-1)
    ended = eos_mask.bool().any(dim=-1)
    return (torch.where(ended, at_eos, last) + 1).clamp(min=0, max=num_ranks + 1)


def length_shaping(segment_ids: torch.Tensor, mask: torch.Tensor, eos_mask: torch.Tensor,
                   num_ranks: int, *, num_items: torch.Tensor | None = None,
                   config: LengthShaping = LengthShaping()) -> torch.Tensor:
    """Float32 `[B, T]` additions to the per-token advantages.

    Args:
        segment_ids: `[B, T]` long, kernel convention (N = overflow bin, -1 padding).
        mask: `[B, T]` completion mask.
        eos_mask: `[B, T]` bool, True at the EOS token (see `eos_mask_from_ids`).
        num_ranks: N.
        num_items: `[B]` items in each list; default `items_from_segments` (newline mode).
        config: the three shaping values.
    """
    _check(segment_ids, mask, eos_mask)
    m = mask.bool()
    eos = eos_mask.bool() & m
    seg = segment_ids.long()
    overflow = m & (seg >= num_ranks)
    if num_items is None:
        num_items = items_from_segments(seg, eos, num_ranks)
    num_items = num_items.to(seg.device).long().reshape(-1, 1)
    ended = eos.any(dim=-1, keepdim=True)
    no_overflow = ~overflow.any(dim=-1, keepdim=True)
    short = eos & ended & (num_items < num_ranks)
    exact = eos & ended & (num_items == num_ranks) & no_overflow
    out = overflow.float() * config.overflow_penalty
    out = out + short.float() * config.short_eos_penalty
    return out + exact.float() * config.exact_eos_bonus


def token_advantages(rank_advantages: torch.Tensor, segment_ids: torch.Tensor,
                     mask: torch.Tensor, eos_mask: torch.Tensor, *,
                     num_items: torch.Tensor | None = None,
                     shaping: LengthShaping | None = LengthShaping()) -> torch.Tensor:
    """Per-token advantages `[B, T]`: `A[b, seg]` for item tokens, 0 for overflow, EOS and
    padding, plus `length_shaping` (pass `shaping=None` to leave it out).

    `rank_advantages` is `[B, N]` (from `rankgrpo_kernels.group_advantages`).
    """
    _check(segment_ids, mask, eos_mask)
    n = rank_advantages.shape[1]
    seg = segment_ids.long()
    m = mask.bool()
    valid = m & (seg >= 0) & (seg < n) & ~eos_mask.bool()
    adv = rank_advantages.float().gather(1, seg.clamp(0, n - 1))
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    if shaping is not None:
        adv = adv + length_shaping(seg, m, eos_mask, n, num_items=num_items, config=shaping)
    return adv
