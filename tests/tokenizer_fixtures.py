"""Offline tokenizers for the token tests (no downloads).

`PieceTokenizer`: a toy tokenizer whose ids decode to fixed strings, including merged
pieces such as ")\\n" and "\\n\\n" that real BPE vocabularies have; fast to build, so the
hypothesis tests can draw thousands of streams. `bpe_tokenizer()`: a real byte-level BPE
(Hugging Face `tokenizers`) trained in-process, wrapped by transformers, for the paths that
real tokenizers take (streaming decode, multi-byte characters split over tokens).
"""

from __future__ import annotations

import functools


class PieceTokenizer:
    """ids -> fixed text pieces; id 0 is the special EOS token."""

    EOS = 0
    PIECES = ["<eos>", "\n", "\n\n", ")\n", "A", "B", " (", "2001", "1999", ")", "x",
              "\n\n\n", "é", " ", "Heat", ".\nC", "-", "1. ", "**"]

    def __init__(self, pieces: list[str] | None = None):
        self.pieces = list(pieces or self.PIECES)
        self.all_special_ids = [self.EOS]

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join("" if (skip_special_tokens and i in self.all_special_ids)
                       else self.pieces[i] for i in ids)

    def encode_pieces(self, pieces: list[str]) -> list[int]:
        return [self.pieces.index(p) for p in pieces]


@functools.lru_cache(maxsize=1)
def bpe_tokenizer():
    """A byte-level BPE with "<eos>" (id 0) and "<pad>" (id 1), trained on movie lists."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = (["Inception (2010)\nHeat (1995)\n\n\nAmélie (2001)\n1. **Alien (1979)**\n"] * 60
              + ["Léon: The Professional (1994)\nSpirited Away (2001)\n千と千尋の神隠し (2001)\n"]
              * 40 + ["\n\n"] * 200)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
