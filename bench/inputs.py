"""Realistic benchmark inputs: T tokens as completions of `completion_len` tokens, each a list
of `num_ranks` items separated by newline tokens, as a Rank-GRPO rollout looks.

Per completion row: 85-100% of the row is completion (mask 1, up to and including EOS), the
rest padding (mask 0, the pad id as target, as TRL passes it). Most rows hold exactly
`num_ranks` items; about one in five runs past them into the shared overflow bin and one in
ten stops short. Segment ids come from the package's own `segment_ids_from_newlines`, rank
rewards are 0/1 draws turned into group advantages by `group_advantages` (groups of up to 8
rows), and old log-probs are the true log-probs plus noise, so ratios sit near 1 and some
clip. Hidden states and the LM head are random with logits of standard deviation ~2.5.
Every contender gets the same tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import rankgrpo_kernels as rk

PAD_ID, NEWLINE_ID, EOS_ID = 0, 1, 2
LOGIT_STD = 2.5


@dataclass
class Inputs:
    hidden: torch.Tensor        # [B, L, H], leaf, requires grad
    weight: torch.Tensor        # [V, H], leaf, requires grad
    targets: torch.Tensor       # [B, L] long, valid ids everywhere (pad id on padding)
    mask: torch.Tensor          # [B, L] bool
    mask_int: torch.Tensor      # [B, L] int64, the same mask as liger/TRL take it
    segment_ids: torch.Tensor   # [B, L] long, -1 on padding, num_ranks = overflow bin
    eos_mask: torch.Tensor      # [B, L] bool, True at each row's EOS (every row ends with one)
    adv_rank: torch.Tensor      # [B, num_ranks] float32
    adv_row: torch.Tensor       # [B] float32
    old_logp: torch.Tensor      # [B, L] float32
    num_ranks: int

    @property
    def tokens(self) -> int:
        return self.targets.numel()

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    def grad_bytes(self) -> int:
        """Bytes of the outputs a training step keeps: dhidden and dW (input dtype)."""
        return (self.hidden.numel() + self.weight.numel()) * self.hidden.element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.hidden, self.weight, self.targets, self.mask, self.mask_int, self.segment_ids,
            self.eos_mask, self.adv_rank, self.adv_row, self.old_logp))


def rows_for(tokens: int, completion_len: int) -> tuple[int, int]:
    """(rows B, row length L) with B * L == tokens."""
    length = min(completion_len, tokens)
    if tokens % length:
        raise ValueError(f"tokens={tokens} is not a multiple of completion_len={length}")
    return tokens // length, length


def _row_layout(length: int, num_ranks: int, vocab: int, g: torch.Generator):
    """Targets and mask of one completion row (CPU)."""
    used = int(torch.randint(int(0.85 * length), length + 1, (1,), generator=g))
    kind = float(torch.rand((), generator=g))
    if kind < 0.2:          # runs past the list: overflow tokens
        items = num_ranks + int(torch.randint(1, 3, (1,), generator=g))
    elif kind < 0.3:        # stops short
        items = max(1, num_ranks - int(torch.randint(1, 4, (1,), generator=g)))
    else:
        items = num_ranks
    items = min(items, max(1, used // 2))
    targets = torch.randint(3, vocab, (length,), generator=g)
    cuts = torch.randperm(used - 2, generator=g)[: items - 1] + 1  # newline positions
    targets[cuts] = NEWLINE_ID
    targets[used - 1] = EOS_ID
    targets[used:] = PAD_ID
    mask = torch.arange(length) < used
    return targets, mask


def make_inputs(tokens: int, hidden_size: int, vocab: int, *, dtype: torch.dtype,
                device: torch.device | str, completion_len: int = 1024, num_ranks: int = 20,
                seed: int = 0,
                logp_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                | None = None) -> Inputs:
    """One input set. `logp_fn(hidden, weight, targets) -> logp [B, L]` computes the true
    log-probs from which old_logp is drawn (default: the package's torch backend)."""
    if vocab <= 3:
        raise ValueError(f"vocab must be > 3 (ids 0-2 are pad, newline, eos), got {vocab}")
    device = torch.device(device)
    b, length = rows_for(tokens, completion_len)
    if length < 2 * num_ranks:
        raise ValueError(f"completion_len={length} is too short for {num_ranks} ranks")
    g = torch.Generator().manual_seed(seed)
    rows = [_row_layout(length, num_ranks, vocab, g) for _ in range(b)]
    targets = torch.stack([r[0] for r in rows])
    mask = torch.stack([r[1] for r in rows])
    newline_counts = torch.zeros(vocab, dtype=torch.long)
    newline_counts[NEWLINE_ID] = 1
    seg = rk.segment_ids_from_newlines(targets, mask, newline_counts, num_ranks)

    rank_rewards = (torch.rand(b, num_ranks, generator=g) < 0.3).float()
    discount = 1.0 / torch.log2(torch.arange(num_ranks) + 2.0)
    row_rewards = (rank_rewards * discount).sum(1)
    group = math.gcd(b, 8)
    adv_rank = rk.group_advantages(rank_rewards, group)
    adv_row = rk.group_advantages(row_rewards, group)

    # Large tensors are drawn on the device (a 7B head is 545M numbers).
    gd = torch.Generator(device=device).manual_seed(seed + 1)
    hidden = torch.randn(b, length, hidden_size, generator=gd, device=device, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=gd, device=device, dtype=dtype)
    weight.mul_(LOGIT_STD / math.sqrt(hidden_size))
    targets = targets.to(device)
    with torch.no_grad():
        if logp_fn is None:
            logp = rk.linear_logprobs(hidden, weight, targets, backend="torch", validate=False)
        else:
            logp = logp_fn(hidden, weight, targets)
        noise = 0.05 * torch.randn(b, length, generator=g) + 0.03 * torch.randn(b, 1, generator=g)
        old_logp = (logp.float() + noise.to(device)).contiguous()
    return Inputs(
        hidden=hidden.requires_grad_(True), weight=weight.requires_grad_(True),
        targets=targets, mask=mask.to(device), mask_int=mask.long().to(device),
        segment_ids=seg.to(device), eos_mask=((targets == EOS_ID) & mask.to(device)),
        adv_rank=adv_rank.to(device), adv_row=adv_row.to(device),
        old_logp=old_logp, num_ranks=num_ranks)
