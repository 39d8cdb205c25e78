"""Token-level helpers: the per-tokenizer newline table and decoding with character offsets.

`newline_counts(tokenizer)` is the table that `rankgrpo_kernels.segment_ids_from_newlines`
gathers from: `nl[v]` = number of `\\n` in the decoded vocabulary id v (docs/math.md section 5).
`decode_with_offsets` decodes a completion once and says which characters each token
produced; the aligned mode (`rankgrpo.alignment`) uses it to map parsed items to tokens.

A "tokenizer" here is anything with `decode(ids, skip_special_tokens=...)` and `__len__`
(Hugging Face tokenizers qualify); `batch_decode`, `all_special_ids` and
`added_tokens_decoder` are used when present.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STRONG_CACHE: dict[int, tuple[Any, dict]] = {}  # for tokenizers that cannot be weak-referenced


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i, tok in decoder.items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def _cache_for(tokenizer: Any) -> dict:
    try:
        return _CACHE.setdefault(tokenizer, {})
    except TypeError:
        entry = _STRONG_CACHE.setdefault(id(tokenizer), (tokenizer, {}))
        return entry[1]


def newline_counts(tokenizer: Any, vocab_size: int | None = None) -> torch.Tensor:
    """`LongTensor[V]`: how many `\\n` each vocabulary id decodes to.

    Each id is decoded once, on its own; a merged token such as `\\n\\n` or `)\\n\\n` counts
    every newline it holds; special tokens (EOS, pad, chat markers) count 0. The result is
    cached per tokenizer (and vocabulary length), and a fresh copy is returned each call.

    Args:
        tokenizer: a Hugging Face tokenizer (or anything with `decode` and `__len__`).
        vocab_size: length of the table; use the model's embedding rows when they exceed
            `len(tokenizer)` (padded vocabularies). Ids past the tokenizer's count 0.
    """
    n = len(tokenizer)
    size = n if vocab_size is None else int(vocab_size)
    if size < n:
        raise ValueError(f"vocab_size={size} is smaller than the tokenizer's {n} ids")
    cache = _cache_for(tokenizer)
    key = (n, size)
    if key not in cache:
        ids = [[i] for i in range(n)]
        if hasattr(tokenizer, "batch_decode"):
            texts = tokenizer.batch_decode(ids, skip_special_tokens=False)
        else:
            texts = [tokenizer.decode(i, skip_special_tokens=False) for i in ids]
        counts = torch.zeros(size, dtype=torch.long)
        counts[:n] = torch.tensor([t.count("\n") for t in texts], dtype=torch.long)
        special = [i for i in _special_ids(tokenizer) if 0 <= i < n]
        if special:
            counts[special] = 0
        cache[key] = counts
    return cache[key].clone()


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _stream_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str | None] | None:
    """Per-token text pieces from the Rust streaming decoder, if this tokenizer has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream
        stream = DecodeStream(skip_special_tokens=True)
        return [stream.step(backend, int(i)) for i in ids]
    except Exception:  # an older tokenizers, or a decoder the stream does not support
        return None


def _window_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str | None]:
    """Per-token text pieces by re-decoding a short window (prefix/read offsets).

    Decoding `ids[prefix:t+1]` and subtracting `ids[prefix:read]` keeps the context that
    SentencePiece needs for leading spaces, and waits (None) while a token ends inside a
    UTF-8 character (the decode then ends with U+FFFD).
    """
    pieces: list[str | None] = []
    prefix = read = 0
    for t in range(len(ids)):
        before = _decode(tokenizer, ids[prefix:read])
        now = _decode(tokenizer, ids[prefix:t + 1])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before):])
            prefix, read = read, t + 1
        else:
            pieces.append(None)
    return pieces


def _spans_from_pieces(pieces: list[str | None]) -> list[tuple[int, int]]:
    """Character spans from pieces. A token that produced no text yet (part of a UTF-8
    character) gets the empty span where the text it completes starts; trailing tokens with
    no text (EOS, other specials) get the empty span at the end."""
    spans: list[tuple[int, int]] = []
    pending: list[int] = []
    pos = 0
    for piece in pieces:
        if not piece:
            pending.append(len(spans))
            spans.append((pos, pos))
            continue
        for p in pending:
            spans[p] = (pos, pos)
        pending = []
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return spans


def _prefix_spans(tokenizer: Any, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Exact but O(T^2) fallback: token t ends where `decode(ids[:t+1])` ends (monotone)."""
    spans = []
    end = 0
    for t in range(len(ids)):
        new_end = min(len(text), max(end, len(_decode(tokenizer, ids[:t + 1]))))
        spans.append((end, new_end))
        end = new_end
    return spans


def decode_with_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode `ids` (special tokens skipped) and give each token its `(start, end)` span.

    The text is exactly `tokenizer.decode(ids, skip_special_tokens=True)`, the string the
    reward parses. Spans come from incremental decoding (the tokenizers streaming decoder,
    else a short re-decode window); if the pieces do not join to that text, the exact
    prefix-decode fallback is used. Tokens that produce no characters get empty spans.
    """
    ids = [int(i) for i in ids]
    text = _decode(tokenizer, ids)
    pieces = _stream_pieces(tokenizer, ids)
    if pieces is not None and "".join(p for p in pieces if p) == text:
        return text, _spans_from_pieces(pieces)
    pieces = _window_pieces(tokenizer, ids)
    if "".join(p for p in pieces if p) == text:
        return text, _spans_from_pieces(pieces)
    return text, _prefix_spans(tokenizer, ids, text)
