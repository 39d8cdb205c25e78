"""Tokens -> ranks (docs/math.md section 5): the newline table, the kernel's vectorised segment
ids against a slow per-token loop, decoding with offsets, and the aligned mode."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import PieceTokenizer, bpe_tokenizer

from rankgrpo.alignment import aligned_segment_ids, char_segments
from rankgrpo.parsing import parse_recommendations
from rankgrpo.tokens import decode_with_offsets, newline_counts

segment_ids_from_newlines = pytest.importorskip("rankgrpo_kernels").segment_ids_from_newlines


class CountingTokenizer(PieceTokenizer):
    def __init__(self, pieces=None):
        super().__init__(pieces)
        self.decoded = 0

    def decode(self, ids, skip_special_tokens=False):
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_newline_counts_literal_merged_and_special():
    tok = PieceTokenizer(PieceTokenizer.PIECES + ["<|sep|>\n"])
    tok.all_special_ids = [0, len(tok) - 1]  # a special token holding "\n" still counts 0
    nl = newline_counts(tok)
    assert nl.dtype == torch.long
    assert nl.tolist() == [0, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0]


def test_newline_counts_cached_copy_and_padding():
    tok = CountingTokenizer()
    a = newline_counts(tok)
    assert tok.decoded == len(tok)  # each id decoded exactly once
    a[:] = 99  # the caller's copy; the cache must not change
    b = newline_counts(tok)
    assert tok.decoded == len(tok) and b[2] == 2
    padded = newline_counts(tok, vocab_size=len(tok) + 5)
    assert padded.shape == (len(tok) + 5,) and padded[len(tok):].tolist() == [0] * 5
    with pytest.raises(ValueError, match="vocab_size"):
        newline_counts(tok, vocab_size=3)


def test_newline_counts_real_bpe():
    tok = bpe_tokenizer()
    nl = newline_counts(tok)
    assert nl.shape == (len(tok),)
    for i in range(len(tok)):
        expected = 0 if i in tok.all_special_ids else tok.decode([i]).count("\n")
        assert nl[i] == expected
    assert nl.max() == 2  # the corpus makes BPE merge "\n\n"
    assert nl[tok.eos_token_id] == 0


# ------------------------------------------------------------------ vectorised vs loop


def slow_segments(ids, mask, nl, n):
    """The released code's idea, one token at a time: seg = newlines before the token."""
    out, count = [], 0
    for i, m in zip(ids, mask):
        if m:
            out.append(min(count, n))
            count += nl[i]
        else:
            out.append(-1)
    return out


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_vectorised_segment_ids_equal_slow_loop(data):
    v = data.draw(st.integers(1, 40))
    nl = data.draw(st.lists(st.integers(0, 3), min_size=v, max_size=v))
    b = data.draw(st.integers(1, 4))
    t = data.draw(st.integers(1, 30))
    n = data.draw(st.integers(1, 6))
    ids = data.draw(st.lists(st.lists(st.integers(0, v - 1), min_size=t, max_size=t),
                             min_size=b, max_size=b))
    if data.draw(st.booleans()):  # completion masks: a prefix of ones
        lengths = data.draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
        mask = [[j < n_ for j in range(t)] for n_ in lengths]
    else:  # any mask
        mask = data.draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t),
                                  min_size=b, max_size=b))
    got = segment_ids_from_newlines(torch.tensor(ids), torch.tensor(mask),
                                    torch.tensor(nl), n)
    expected = [slow_segments(r, m, nl, n) for r, m in zip(ids, mask)]
    assert got.tolist() == expected
    one = segment_ids_from_newlines(torch.tensor(ids[0]), torch.tensor(mask[0]),
                                    torch.tensor(nl), n)
    assert one.tolist() == expected[0]


# ------------------------------------------------------------------ decoding with offsets


def test_decode_with_offsets_bpe_multibyte():
    tok = bpe_tokenizer()
    text = "Жизнь (2001)\n\nHeat (1995)\n千と千尋の神隠し (2001)"
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    out, spans = decode_with_offsets(tok, ids)
    assert out == tok.decode(ids, skip_special_tokens=True) == text
    assert len(spans) == len(ids)
    assert spans[-1] == (len(text), len(text))  # EOS: empty, at the end
    pos = 0
    for s, e in spans:  # contiguous, monotone, covering the text
        assert s == pos or s == e == pos
        pos = e
    assert pos == len(text)
    # "Ж" is two bytes the BPE never merged: the first byte token is empty, placed at "Ж"
    assert spans[0] == (0, 0) and spans[1] == (0, 1)


def test_decode_with_offsets_window_path():
    tok = PieceTokenizer()
    ids = tok.encode_pieces(["A", " (", "2001", ")\n", "é", ".\nC"]) + [0]
    text, spans = decode_with_offsets(tok, ids)
    assert text == "A (2001)\né.\nC"
    assert [text[s:e] for s, e in spans] == ["A", " (", "2001", ")\n", "é", ".\nC", ""]


# ------------------------------------------------------------------ aligned mode


def test_char_segments_rules():
    # item, blank line, junk line, item beyond N, leading blank
    text = "\n1. A (2001)\n\nx\nB (1999)\nC (2000)"
    chars, items = char_segments(text, 2)
    assert items == [("A", 2001), ("B", 1999), ("C", 2000)]
    owner = dict(zip(range(len(text)), chars))
    assert owner[0] == 0                       # leading blank -> first line's segment
    assert owner[text.index("A")] == 0
    assert owner[text.index("\n\nx") + 1] == 0  # blank line joins the item before it
    assert owner[text.index("x")] == 2          # junk -> overflow bin N
    assert owner[text.index("B")] == 1
    assert owner[text.index("C")] == 2          # third item, N = 2 -> overflow
    assert char_segments("", 3) == ([], [])
    assert char_segments("no items\n", 3)[0] == [3] * 9
    assert char_segments(" \n\n", 3)[0] == [0] * 3  # an empty list, not overflow


def test_aligned_fixes_drift_on_malformed_output():
    tok = PieceTokenizer()
    pieces = ["1. ", "A", " (", "2001", ")\n", "\n", "x", "\n", "B", " (", "1999", ")", "<eos>"]
    ids = torch.tensor([tok.encode_pieces(pieces) + [1, 1]])  # two pad tokens after EOS
    mask = torch.tensor([[1] * len(pieces) + [0, 0]])
    out = aligned_segment_ids(tok, ids, mask, num_ranks=3)
    assert out.segment_ids.tolist() == [[0, 0, 0, 0, 0, 0, 3, 3, 1, 1, 1, 1, 1, -1, -1]]
    assert out.items == [[("A", 2001), ("B", 1999)]] and out.num_items.tolist() == [2]
    assert out.texts == ["1. A (2001)\n\nx\nB (1999)"]
    # the newline mode drifts: "B" lands on rank 3 (the overflow bin) instead of rank 1
    newline = segment_ids_from_newlines(ids, mask, newline_counts(tok), 3)
    assert newline.tolist() == [[0, 0, 0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3, -1, -1]]


TITLES = ["A", "B", "Heat", "é"]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_aligned_equals_newline_mode_on_well_formed_output(data):
    """One item per line, no blank or junk lines, no trailing newline: both modes agree
    (including the overflow bin when there are more than N items)."""
    tok = PieceTokenizer()
    nl = newline_counts(tok)
    b = data.draw(st.integers(1, 3))
    n = data.draw(st.integers(1, 5))
    rows = []
    for _ in range(b):
        k = data.draw(st.integers(0, 7))
        pieces = []
        for i in range(k):
            pieces += [data.draw(st.sampled_from(TITLES)), " (",
                       data.draw(st.sampled_from(["2001", "1999"]))]
            if i < k - 1:
                pieces += data.draw(st.sampled_from([[")\n"], [")", "\n"]]))
            else:
                pieces.append(")")
        if data.draw(st.booleans()):
            pieces.append("<eos>")
        rows.append(tok.encode_pieces(pieces))
    t = max(1, max(len(r) for r in rows))
    ids = torch.tensor([r + [4] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    out = aligned_segment_ids(tok, ids, mask, n)
    assert torch.equal(out.segment_ids, segment_ids_from_newlines(ids, mask, nl, n))
    for r, items in zip(rows, out.items):
        assert items == parse_recommendations(tok.decode(r, skip_special_tokens=True))


def test_aligned_real_bpe_tokens_follow_their_characters():
    tok = bpe_tokenizer()
    text = "Here you go:\nЖизнь (2001)\n\n2. **Heat (1995)**\nAmélie (2001)"
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    out = aligned_segment_ids(tok, torch.tensor(ids), torch.ones(len(ids)), num_ranks=20)
    assert out.segment_ids.dim() == 1
    assert out.items == [[("Жизнь", 2001), ("Heat", 1995), ("Amélie", 2001)]]
    _, spans = decode_with_offsets(tok, ids)
    chars, _ = char_segments(text, 20)
    for (s, _e), seg in zip(spans[:-1], out.segment_ids.tolist()[:-1]):
        assert seg == chars[min(s, len(text) - 1)]
    header = [seg for (s, e), seg in zip(spans, out.segment_ids.tolist()) if e <= 12]
    assert set(header) == {20}  # the heading is not an item: overflow bin
    assert out.segment_ids[-1] == 2  # EOS belongs to the last item


def test_aligned_shape_error():
    tok = PieceTokenizer()
    with pytest.raises(ValueError, match="mask"):
        aligned_segment_ids(tok, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4), 3)
