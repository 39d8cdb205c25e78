"""Aligned mode: segment ids that follow the parsed items, not raw newlines
(docs/math.md section 5).

The released code counts raw newlines for the token segments but parsed lines for the
reward ranks, so a blank line, a heading or a malformed line shifts every later token onto
the wrong rank's advantage. Here the completion is decoded once with character offsets
(`rankgrpo.tokens.decode_with_offsets`), parsed once (`rankgrpo.parsing.parse_lines`), and
each token takes the segment of the line its first character lies in. The parsed items
returned with the segment ids are the ones the reward must score, so rank k of the reward
and segment k of the tokens are the same item by construction.

Which segment a character belongs to (kernel convention: [0, N) items, N overflow, -1 pad):
- the k-th parsed line (0-based), including its terminating `\\n`: k, or N once k >= N;
- a non-blank line that does not parse (a heading, prose, `Title` without a year): N, the
  overflow bin, so its tokens get advantage 0 and the overflow penalty, like any text that
  is not one of the N items;
- blank lines and whitespace between lines: the line before them (the first line if they
  lead the text); a text with no non-blank line at all (an empty list) is all 0, as in the
  newline mode, so an empty answer is penalised once (short list), not as overflow.
A token takes the segment of its first character, which matches the newline rule (the token
that holds a newline belongs to the item it ends). A token that produces no character
(EOS and other special tokens at the end) takes the last character's segment ("EOS belongs
to the last item"); one that is part of a UTF-8 character split over several tokens takes
the segment of the character it helps form.
On well-formed output (one item per line, no blank or malformed lines) this gives exactly
the segment ids of `rankgrpo_kernels.segment_ids_from_newlines`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .parsing import parse_lines
from .tokens import decode_with_offsets


@dataclass
class AlignedRow:
    """One completion: its text, parsed items, and a segment id per given token."""

    text: str
    items: list[tuple[str, int]]
    segment_ids: list[int]

    @property
    def num_items(self) -> int:
        return len(self.items)


@dataclass
class AlignedBatch:
    """A batch in the aligned mode; feed `items` to the reward, `segment_ids` to the loss."""

    segment_ids: torch.Tensor  # [B, T] long
    texts: list[str]
    items: list[list[tuple[str, int]]]
    num_items: torch.Tensor  # [B] long, parsed items per row (for length shaping)


def char_segments(text: str, num_ranks: int) -> tuple[list[int], list[tuple[str, int]]]:
    """Segment id of every character of `text`, and the parsed items in order."""
    lines = parse_lines(text)
    owners: list[int | None] = [None] * len(text)
    items: list[tuple[str, int]] = []
    for line in lines:
        if line.title is not None:
            seg = min(len(items), num_ranks)
            items.append((line.title, line.year))
        else:
            seg = num_ranks
        owners[line.start:line.end] = [seg] * (line.end - line.start)
    first = next((o for o in owners if o is not None), 0)
    out: list[int] = []
    prev = first
    for o in owners:
        prev = prev if o is None else o
        out.append(prev)
    return out, items


def align_row(tokenizer: Any, ids: Sequence[int], num_ranks: int) -> AlignedRow:
    """Decode, parse and assign segments for one completion (its masked token ids only)."""
    text, spans = decode_with_offsets(tokenizer, ids)
    chars, items = char_segments(text, num_ranks)
    segs = []
    for start, end in spans:
        if not chars:
            segs.append(0)
        elif end > start or start < len(chars):
            segs.append(chars[start])
        else:  # empty span at the end of the text
            segs.append(chars[-1])
    return AlignedRow(text, items, segs)


def aligned_segment_ids(tokenizer: Any, token_ids: torch.Tensor, mask: torch.Tensor,
                        num_ranks: int) -> AlignedBatch:
    """Aligned-mode segment ids `[B, T]` (-1 where `mask` is 0) plus texts and parsed items.

    Args:
        tokenizer: the policy's tokenizer.
        token_ids: `[B, T]` (or `[T]`) completion ids.
        mask: same shape, 1 on the completion's tokens (up to and including EOS).
        num_ranks: N.
    """
    if token_ids.shape != mask.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected "
                         f"{tuple(token_ids.shape)} (the shape of token_ids)")
    squeeze = token_ids.dim() == 1
    ids2 = token_ids.reshape(1, -1) if squeeze else token_ids
    m2 = mask.reshape(1, -1).bool() if squeeze else mask.bool()
    seg = torch.full(ids2.shape, -1, dtype=torch.long)
    texts, items = [], []
    ids_cpu, m_cpu = ids2.cpu(), m2.cpu()
    for b in range(ids2.shape[0]):
        pos = torch.nonzero(m_cpu[b], as_tuple=False).flatten()
        row = align_row(tokenizer, ids_cpu[b, pos].tolist(), num_ranks)
        if len(pos):
            seg[b, pos] = torch.tensor(row.segment_ids, dtype=torch.long)
        texts.append(row.text)
        items.append(row.items)
    num_items = torch.tensor([len(i) for i in items], dtype=torch.long)
    seg = seg.to(token_ids.device)
    return AlignedBatch(seg.reshape(token_ids.shape) if squeeze else seg, texts, items,
                        num_items.to(token_ids.device))
