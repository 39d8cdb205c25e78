"""Segment ids and advantages: the tokens -> ranks mapping of SPEC sections 4-6.

One mechanism for all three levels: every masked token gets a segment id, and a level is
only a choice of ids (token: its own position; sequence: 0; rank: the item it belongs to).
"""

from __future__ import annotations

import torch

from ._validate import check_choice, check_tensor

LEVELS = ("token", "sequence", "rank")


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
    """Group-relative advantages, per rank or per sequence (SPEC section 4).

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
