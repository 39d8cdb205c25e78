"""A tiny tokenizer and model, built in-process, for the CPU demo and the tests.

Tokenizer (a deliberate design choice, stated by the demo): word level, with every catalog item
`Title (Year)` as ONE added token, `\\n` as its own token, and the words and punctuation of
the prompts as plain vocabulary entries that carry their leading space (" movie"), so that
`decode(encode(text)) == text` for any text made of known words. A 20-item list is then 40
tokens (20 items, 19 newlines, EOS), which keeps generation and the loss cheap on 2 CPU cores.
The vocabulary is built from the texts it must encode; unknown words map to `<unk>`.

Model: a small Qwen2 decoder from a config (`rankgrpo.model.build_tiny_model`), random init,
tied embeddings. Nothing is downloaded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

PAD, EOS, UNK = "<pad>", "<|endoftext|>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
# One user turn, then the assistant turn; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + EOS +
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

# A piece is an optional single space plus a word, a single punctuation mark, or a run of
# whitespace other than a newline (newlines are their own added token).
_PIECE = r" ?[A-Za-z0-9_']+| ?[^\sA-Za-z0-9_']|[^\S\n]+"


def build_tokenizer(items: Iterable[str], texts: Iterable[str] = (), words: Iterable[str] = (),
                    *, phrases: Iterable[str] = (), min_count: int = 1,
                    model_max_length: int = 1024):
    """A `PreTrainedTokenizerFast` with each string of `items` as one token.

    Args:
        items: item strings, e.g. "Alien (1979)"; each becomes one (non-special) added token.
        phrases: longer fixed strings that also become one token each, e.g. the paper's
            instruction that starts every prompt (`prompt_prefix`).
        texts: texts whose words and punctuation make the vocabulary (e.g. training prompts).
        words: extra words (each added with and without a leading space).
        min_count: keep only pieces of `texts` seen at least this often (others are `<unk>`).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    items = list(dict.fromkeys(items))
    phrases = [p for p in dict.fromkeys(phrases) if p not in items]
    specials = [PAD, EOS, UNK, USER, ASSISTANT]

    def make(vocab: dict[str, int]):
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in specials])
        tok.add_tokens([AddedToken("\n", normalized=False)] +
                       [AddedToken(t, normalized=False) for t in phrases + items])
        return tok

    # Count the pieces between item mentions: encode with an empty vocabulary, so every
    # piece that is not an added token comes back as <unk> with its offsets.
    probe = make({UNK: 0})
    unk = probe.token_to_id(UNK)
    counts: Counter[str] = Counter()
    texts = list(texts)
    for text, enc in zip(texts, probe.encode_batch(texts, add_special_tokens=False)):
        counts.update(text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk)
    pieces = {p: None for p, c in sorted(counts.items()) if c >= min_count}
    for w in words:
        pieces[w] = None
        pieces[" " + w] = None
    for c in ".,?!:;'\"()-":
        pieces[c] = None
        pieces[" " + c] = None
    pieces[" "] = None
    vocab = {tok: i for i, tok in enumerate(specials)}
    for p in sorted(pieces):
        vocab.setdefault(p, len(vocab))
    tok = make(vocab)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        padding_side="left", model_max_length=model_max_length,
        additional_special_tokens=[USER, ASSISTANT])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def prompt_prefix(num_ranks: int = 20) -> str:
    """The fixed instruction that starts every prompt of the paper (docs/math.md section 1),
    up to and including "Here is the conversation: "; one token in the demo's tokenizers."""
    from .prompts import PROMPT_PREFIX

    return PROMPT_PREFIX.format(num_ranks=num_ranks)


def tiny_model(tokenizer, *, seed: int = 0, **overrides):
    """A randomly initialised tiny Qwen2 sized for `tokenizer` (fp32, tied embeddings), built
    by `rankgrpo.model.build_tiny_model`; `overrides` are Qwen2Config keywords
    (hidden_size, num_hidden_layers, ...). Its generation config knows the pad and EOS ids."""
    from .model import build_tiny_model

    overrides = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "bos_token_id": tokenizer.eos_token_id, "max_position_embeddings": 512,
                 **overrides}
    model = build_tiny_model(len(tokenizer), seed=seed, **overrides)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.eos_token_id
    return model
