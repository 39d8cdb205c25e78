"""Ratings by constrained greedy decoding: a local teacher that cannot keep the rating format
on its own (SmolLM2-135M answers the rating prompt with chatter, docs/rra/README.md) still
rates every candidate.

The answer is written for the model, one line per candidate: the decoder is fed
`title (year)####` (the format of Eq. 11's answer) and then picks the rating greedily among the
token sequences of {-2, ..., 2} only (a trie over their tokens), so the rating is the model's
most likely allowed continuation, conditioned on the prompt and on the lines before it, exactly
what free greedy decoding would have produced had it kept the format. One prompt pass, then one
short pass per candidate, reusing the key/value cache.

`expected` ratings (`rate_decoding=expected`) keep the whole restricted distribution instead of
its argmax: `r = sum_v v P(v)` over v in {-2, ..., 2}, a fractional rating in [-2, 2]. A small
teacher whose argmax is the same rating for every candidate (SmolLM2-135M answers 1) still
orders the candidates by how likely it finds each rating; this departs from the paper's integer
ratings and is reported as such.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .reflect import RATINGS


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    rating: int | None = None


def rating_trie(encode: Callable[[str], list[int]],
                ratings: Sequence[int] = RATINGS) -> _Node:
    """The token trie of the rating strings (`encode("-2")` etc.); they must be prefix-free so
    that the end of a rating is known without reading further."""
    root = _Node()
    for r in ratings:
        ids = list(encode(str(r)))
        if not ids:
            raise ValueError(f"rating {r}: the tokenizer encodes {str(r)!r} to no token")
        node = root
        for t in ids:
            if node.rating is not None:
                raise ValueError(f"rating {r}: its tokens {ids} continue the tokens of rating "
                                 f"{node.rating}; constrained rating needs prefix-free tokens")
            node = node.children.setdefault(int(t), _Node())
        if node.rating is not None or node.children:
            raise ValueError(f"rating {r}: its tokens {ids} are a prefix of another rating's")
        node.rating = r
    return root


@functools.cache
def _cache_keywords(model_class: type) -> tuple[str, dict[str, int]]:
    # transformers >= 5.2x names the key/value cache `cache` (in and out); earlier versions
    # `past_key_values`; `logits_to_keep` (only the last position's logits) is newer than 4.44
    params = inspect.signature(model_class.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return name, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _forward(model, ids: list[int], past):
    name, extra = _cache_keywords(type(model))
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True,
                **{name: past}, **extra)
    return out.logits[0, -1].float(), getattr(out, name)


def _rating_probs(model, node: _Node, logits: torch.Tensor, past) -> dict[int, float]:
    """P(rating) under the model restricted to the trie below `node` (a softmax over the
    allowed tokens at each step); each explored token is cropped from the cache again (a
    negative `crop` removes tokens in every transformers version that has `crop`)."""
    allowed = list(node.children)
    p = torch.softmax(logits[allowed], dim=0).tolist()
    out: dict[int, float] = {}
    for t, pt in zip(allowed, p):
        child = node.children[t]
        if child.rating is not None:
            out[child.rating] = pt
            continue
        sub_logits, past = _forward(model, [t], past)
        for r, q in _rating_probs(model, child, sub_logits, past).items():
            out[r] = pt * q
        past.crop(-1)
    return out


@torch.no_grad()
def rate_constrained(model, prompt_ids: Sequence[int], segments: Sequence[Sequence[int]],
                     trie: _Node, *, expected: bool = False
                     ) -> tuple[list[float], list[list[int]]]:
    """Ratings, one per segment: the greedy one (an int in {-2..2}) or, with `expected`, the
    mean rating under the model's distribution restricted to {-2..2} (a float in [-2, 2]).
    Either way the greedy rating is what the next lines see.

    Args:
        model: a causal LM with a key/value cache (`cache` / `past_key_values`).
        prompt_ids: the chat-formatted rating prompt, ending where the answer begins.
        segments: per candidate, the tokens fed before its rating (`title (year)####`, after a
            newline from the second candidate on).
    Returns:
        (ratings, the greedy rating tokens per candidate).
    """
    logits, past = _forward(model, list(prompt_ids), None)
    pending: list[int] = []  # the last chosen token, not fed yet
    ratings, chosen_all = [], []
    for seg in segments:
        logits, past = _forward(model, pending + list(seg), past)
        if expected:
            probs = _rating_probs(model, trie, logits, past)
            mean = sum(r * q for r, q in probs.items()) / sum(probs.values())
        node, chosen = trie, []
        while True:
            allowed = list(node.children)
            best = allowed[int(torch.argmax(logits[allowed]))]
            chosen.append(best)
            node = node.children[best]
            if node.rating is not None:
                break
            logits, past = _forward(model, [best], past)
        pending = [chosen[-1]]
        ratings.append(round(mean, 4) if expected else node.rating)
        chosen_all.append(chosen)
    return ratings, chosen_all


def candidate_segments(encode: Callable[[str], list[int]],
                       candidates: Sequence[tuple[str, int]]) -> list[list[int]]:
    """The tokens fed before each rating: `title (year)####`, newline-separated."""
    return [list(encode(("\n" if i else "") + f"{t} ({y})####"))
            for i, (t, y) in enumerate(candidates)]


def answer_text(candidates: Sequence[tuple[str, int]], ratings: Sequence[float]) -> str:
    """The answer as the rating parser reads it (`title (year)####rating` lines)."""
    return "\n".join(f"{t} ({y})####{r}" for (t, y), r in zip(candidates, ratings))
