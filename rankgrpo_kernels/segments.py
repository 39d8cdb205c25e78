"""Segment ids and advantages: the tokens -> ranks mapping of docs/math.md sections 4-6.

One mechanism for all three levels: every masked token gets a segment id, and a level is
only a choice of ids (token: its own position; sequence: 0; rank: the item it belongs to).
The per-token advantage rule (gather, EOS, overflow, length shaping; docs/math.md section 5)
lives here too, once: the loss and the trainer both call `token_advantages`.

Conventions: `segment_ids[b, t]` is in [0, N) for a token of item k, N for the single
overflow bin, -1 for padding; `mask` is 1 up to and including the first EOS; `eos_mask` is
True at the EOS token of each row that ended with one (truncated rows have none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._validate import check_choice, check_tensor
from .contract import LEVELS

__all__ = ["LEVELS", "LengthShaping", "eos_mask_from_ids", "gather_rank_advantages",
           "group_advantages", "items_from_segments", "length_shaping", "level_segment_ids",
           "segment_ids_from_newlines", "token_advantages"]


def segment_ids_from_newlines(token_ids: torch.Tensor, mask: torch.Tensor,
                              newline_counts: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Rank of each completion token, from the number of newlines before it.

    seg[t] = sum_{s<t} nl[s] over masked tokens (exclusive prefix sum), so a token holding
    a newline belongs to the item it ends and EOS to the last item. Ids >= num_ranks share
    one overflow bin, num_ranks; unmasked tokens get -1. O(T) on device, no decode.

    Args:
        token_ids: [B, T] or [T] integer ids.
        mask: same shape, bool or 0/1 (1 up to and including the first EOS).
        newline_counts: [V] integer, the number of "\\n" in each decoded vocabulary id.
        num_ranks: N, the list length.
    Returns: long tensor of token_ids' shape.
    """
    check_tensor("token_ids", token_ids, ndims=(1, 2))
    check_tensor("newline_counts", newline_counts, ndims=(1,))
    if tuple(mask.shape) != tuple(token_ids.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(token_ids.shape)}")
    if not (isinstance(num_ranks, int) and num_ranks >= 1):
        raise ValueError(f"num_ranks must be an int >= 1, got {num_ranks!r}")
    m = mask.bool()
    ids = token_ids.long().clamp(0, newline_counts.shape[0] - 1)
    nl = torch.where(m, newline_counts.to(token_ids.device).long()[ids], 0)
    seg = (torch.cumsum(nl, dim=-1) - nl).clamp(max=num_ranks)
    return torch.where(m, seg, -1)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages, per rank or per sequence (docs/math.md section 4).

    A[i, k] = (r[i, k] - mean_g r[., k]) / (std_g r[., k] + eps), std unbiased over the
    `group_size` consecutive rows of one prompt. A rank where all rows of a group agree gets
    exactly 0 (also for group_size 1). scale: "group" (default), "batch" (std over the whole
    batch per column) or "none" (no division).

    Args: rewards [B] or [B, N] float, B a multiple of group_size. Returns the same shape.
    """
    check_tensor("rewards", rewards, ndims=(1, 2))
    check_choice("scale", scale, ("group", "batch", "none"))
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"rewards has {rewards.shape[0]} rows, not a multiple of "
                         f"group_size={group_size}")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    g = r.reshape(-1, group_size, *r.shape[1:])
    mean = g.mean(1, keepdim=True)
    centred = g - mean
    same = g.amax(1, keepdim=True) == g.amin(1, keepdim=True)
    if scale == "group":
        std = g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = centred / (std + eps)
    elif scale == "batch":
        std = r.std(0, keepdim=True) if r.shape[0] > 1 else torch.zeros_like(r[:1])
        adv = centred / (std.unsqueeze(1) + eps)
    else:
        adv = centred
    adv = torch.where(same, torch.zeros_like(adv), adv)
    return adv.reshape(r.shape)


def gather_rank_advantages(advantages: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Per-rank advantages [B, N] -> per-token [B, T] through segment ids; the overflow bin
    (id >= N) and padding (-1) get 0."""
    n = advantages.shape[1]
    valid = (segment_ids >= 0) & (segment_ids < n)
    adv = advantages.gather(1, segment_ids.clamp(0, n - 1).long())
    return torch.where(valid, adv, torch.zeros_like(adv))


def level_segment_ids(level: str, segment_ids: torch.Tensor | None,
                      shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Segment id per token for a ratio level: token -> t, sequence -> 0, rank -> given."""
    check_choice("level", level, LEVELS)
    b, t = shape
    if level == "token":
        return torch.arange(t, device=device).expand(b, t)
    if level == "sequence":
        return torch.zeros(b, t, dtype=torch.long, device=device)
    if segment_ids is None:
        raise ValueError("level='rank' needs segment_ids ([B, T] long, -1 on padding)")
    return segment_ids.long()


# ----------------------------------------------------------------- per-token advantages

@dataclass(frozen=True)
class LengthShaping:
    """Values of the length shaping, docs/math.md section 5 (defaults: the released code).

    overflow_penalty: added to every masked token whose segment id is >= N.
    short_eos_penalty: added to the EOS token when the list ended with EOS with < N items.
    exact_eos_bonus: added to the EOS token when it has exactly N items, no overflow token
        and ended with EOS (in the released code, not in the paper).
    Truncated completions (no EOS) get neither EOS term. Set all three to 0 to disable.
    """

    overflow_penalty: float = -0.1
    short_eos_penalty: float = -0.1
    exact_eos_bonus: float = 0.1


def eos_mask_from_ids(token_ids: torch.Tensor, mask: torch.Tensor,
                      eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """Bool [B, T] (or [T]), True only at the first masked EOS of each row (none if the row
    was truncated). `eos_token_id`: one id or several (any of them ends a completion)."""
    check_tensor("token_ids", token_ids, ndims=(1, 2))
    if tuple(mask.shape) != tuple(token_ids.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected "
                         f"{tuple(token_ids.shape)} (the shape of token_ids)")
    ids = torch.as_tensor(list(eos_token_id) if isinstance(eos_token_id, Sequence)
                          else [eos_token_id], device=token_ids.device)
    is_eos = torch.isin(token_ids.long(), ids.long()) & mask.bool()
    return is_eos & (torch.cumsum(is_eos.long(), dim=-1) == 1)


def _check_bt(segment_ids: torch.Tensor, **others: torch.Tensor | None) -> None:
    check_tensor("segment_ids", segment_ids, dtypes=(torch.int64, torch.int32, torch.int16),
                 ndims=(2,))
    for name, x in others.items():
        if x is not None and tuple(x.shape) != tuple(segment_ids.shape):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected "
                             f"{tuple(segment_ids.shape)} (the shape of segment_ids)")


def _eos(eos_mask: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """eos_mask restricted to the mask; None (no row ended with EOS) -> all False."""
    if eos_mask is None:
        return torch.zeros_like(mask)
    return eos_mask.bool() & mask


def items_from_segments(segment_ids: torch.Tensor, eos_mask: torch.Tensor | None,
                        num_ranks: int) -> torch.Tensor:
    """Items per row in newline mode, long [B]: the EOS token's segment id + 1, capped at
    N + 1 (docs/math.md section 5). Rows without EOS get the number of segments seen (max
    id + 1; 0 for an empty row). In the aligned mode pass the parsed item count instead."""
    _check_bt(segment_ids, eos_mask=eos_mask)
    seg = segment_ids.long()
    eos = _eos(eos_mask, seg >= 0)
    if seg.shape[1] == 0:
        return torch.zeros(seg.shape[0], dtype=torch.long, device=seg.device)
    at_eos = torch.where(eos, seg, -1).amax(dim=-1)
    last = seg.amax(dim=-1)
    ended = eos.any(dim=-1)
    return (torch.where(ended, at_eos, last) + 1).clamp(min=0, max=num_ranks + 1)


def length_shaping(segment_ids: torch.Tensor, mask: torch.Tensor,
                   eos_mask: torch.Tensor | None, num_ranks: int, *,
                   num_items: torch.Tensor | None = None,
                   config: LengthShaping = LengthShaping(),
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] additions (float32, or `dtype`) to the per-token advantages (docs/math.md
    section 5).

    Args:
        segment_ids: [B, T] integer, kernel convention (N = overflow bin, -1 padding).
        mask: [B, T] bool or 0/1 completion mask.
        eos_mask: [B, T] bool, True at the EOS token (`eos_mask_from_ids`); None: no row
            ended with EOS.
        num_ranks: N.
        num_items: [B] items in each list; default `items_from_segments` (newline mode).
        config: the three shaping values.
    """
    _check_bt(segment_ids, mask=mask, eos_mask=eos_mask)
    m = mask.bool()
    eos = _eos(eos_mask, m)
    seg = segment_ids.long()
    overflow = m & (seg >= num_ranks)
    if num_items is None:
        num_items = items_from_segments(seg, eos, num_ranks)
    elif tuple(num_items.shape) != (seg.shape[0],):
        raise ValueError(f"num_items has shape {tuple(num_items.shape)}, expected "
                         f"[{seg.shape[0]}] (one count per row)")
    num_items = num_items.to(seg.device).long().reshape(-1, 1)
    ended = eos.any(dim=-1, keepdim=True)
    no_overflow = ~overflow.any(dim=-1, keepdim=True)
    short = eos & ended & (num_items < num_ranks)
    exact = eos & ended & (num_items == num_ranks) & no_overflow
    out = overflow.to(dtype) * config.overflow_penalty
    out = out + short.to(dtype) * config.short_eos_penalty
    return out + exact.to(dtype) * config.exact_eos_bonus


def token_advantages(advantages: torch.Tensor, segment_ids: torch.Tensor, mask: torch.Tensor,
                     eos_mask: torch.Tensor | None, *, num_items: torch.Tensor | None = None,
                     shaping: LengthShaping | None = None,
                     num_ranks: int | None = None) -> torch.Tensor:
    """Per-token advantages [B, T], the rule of docs/math.md section 5.

    Per rank (`advantages` [B, N]): item tokens (0 <= seg < N) get A[b, seg]; overflow
    tokens, the EOS token and padding get 0. Per row (`advantages` [B], a sequence reward):
    every masked token gets A[b], the EOS token included (the whole completion earned it);
    padding gets 0. Then, when `shaping` is given, `length_shaping` is added on masked tokens.

    Args:
        advantages: float [B, N] per rank or [B] per row.
        segment_ids: [B, T] integer, kernel convention (0..N-1 items, N overflow, -1 padding).
        mask: [B, T] bool or 0/1 completion mask (up to and including the EOS).
        eos_mask: [B, T] bool, True at the EOS token of each row that ended with EOS (see
            `eos_mask_from_ids`); None means no row ended (all truncated). It is the only way
            to tell the EOS token from a token of the last item.
        num_items: [B] items per row for the shaping; default: newline mode
            (`items_from_segments`).
        shaping: `LengthShaping` values, or None (default) for no shaping.
        num_ranks: N; needed only for per-row advantages with shaping (per rank it is
            advantages.shape[1]).
    Returns:
        float32 [B, T] (float64 when `advantages` is float64), 0 off the mask. No host sync.
    """
    _check_bt(segment_ids, mask=mask, eos_mask=eos_mask)
    check_tensor("advantages", advantages, ndims=(1, 2))
    b = segment_ids.shape[0]
    if advantages.shape[0] != b:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [{b}, N] "
                         f"per rank or [{b}] per row (B = segment_ids.shape[0])")
    dtype = torch.float64 if advantages.dtype == torch.float64 else torch.float32
    seg = segment_ids.long()
    m = mask.bool()
    a = advantages.to(device=seg.device, dtype=dtype)
    if advantages.dim() == 2:
        n = a.shape[1]
        if num_ranks is not None and num_ranks != n:
            raise ValueError(f"num_ranks={num_ranks} but advantages has {n} ranks per row")
        valid = m & (seg >= 0) & (seg < n) & ~_eos(eos_mask, m)
        if n == 0:  # no ranks: every token is overflow (gather needs a column)
            adv = torch.zeros(seg.shape, dtype=dtype, device=seg.device)
        else:
            adv = a.gather(1, seg.clamp(0, n - 1))
            adv = torch.where(valid, adv, torch.zeros_like(adv))
    else:
        n = num_ranks
        adv = torch.where(m, a.unsqueeze(1).expand(seg.shape), 0)
    if shaping is not None:
        if n is None:
            raise ValueError("token_advantages: per-row advantages with `shaping` need "
                             "num_ranks=N (which ids are overflow, how many items are exact)")
        adv = adv + length_shaping(seg, m, eos_mask, n, num_items=num_items, config=shaping,
                                   dtype=dtype)
    return adv
