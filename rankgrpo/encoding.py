"""Records -> token ids: chat-templated prompts and SFT examples, with length checks that
run before any compute.

The prompt is the record's chat messages (`rankgrpo.records.prompt_messages`, one user turn,
no system message) with the tokenizer's chat template and its generation prompt; a tokenizer
without a chat template gets the prompt text as is. An SFT example is that prompt followed by
the completion's tokens and the EOS token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .records import prompt_messages, prompt_text


class DataError(ValueError):
    """Unusable training data (empty, or too long for the configured limits)."""


def encode_prompt(tokenizer, record: Mapping[str, Any]) -> list[int]:
    """Token ids of the record's prompt with the chat template's generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt_messages(record), add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # BatchEncoding in v5
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt_text(record), add_special_tokens=True).input_ids]


def encode_completion(tokenizer, completion: str, eos_id: int) -> list[int]:
    """Completion ids followed by EOS (the id that ends a generated list)."""
    ids = tokenizer(completion, add_special_tokens=False).input_ids
    return [int(i) for i in ids] + [int(eos_id)]


@dataclass
class EncodedPrompts:
    """Prompt ids of the records kept, and what was dropped."""

    records: list[Mapping[str, Any]]
    prompt_ids: list[list[int]]
    skipped: list[tuple[int, int]] = field(default_factory=list)  # (record index, length)

    def __len__(self) -> int:
        return len(self.records)


def encode_prompts(tokenizer, records: Sequence[Mapping[str, Any]], max_prompt_length: int, *,
                   long_prompts: str = "error", what: str = "training") -> EncodedPrompts:
    """Encode every prompt; a prompt longer than `max_prompt_length` raises DataError naming
    the record (or, with long_prompts="skip", is dropped and listed in `skipped`)."""
    if len(records) == 0:
        raise DataError(f"the {what} dataset is empty: no records to use")
    kept, ids, skipped = [], [], []
    for i, rec in enumerate(records):
        p = encode_prompt(tokenizer, rec)
        if len(p) > max_prompt_length:
            if long_prompts == "error":
                raise DataError(
                    f"{what} record {i}: the prompt is {len(p)} tokens, longer than "
                    f"max_prompt_length={max_prompt_length}; raise the limit or set "
                    "long_prompts=skip to drop such records")
            skipped.append((i, len(p)))
            continue
        kept.append(rec)
        ids.append(p)
    if not kept:
        raise DataError(f"all {len(records)} {what} records are longer than "
                        f"max_prompt_length={max_prompt_length}")
    return EncodedPrompts(kept, ids, skipped)


@dataclass
class SFTExample:
    input_ids: list[int]
    prompt_length: int  # loss on tokens [prompt_length:] (all with completion_only_loss off)


def encode_sft(tokenizer, records: Sequence[Mapping[str, Any]], max_length: int, eos_id: int,
               *, long_prompts: str = "error") -> tuple[list[SFTExample], list[tuple[int, int]]]:
    """Prompt + completion + EOS per record; too long -> DataError (or skipped)."""
    if len(records) == 0:
        raise DataError("the SFT training dataset is empty: no records to use")
    out, skipped = [], []
    for i, rec in enumerate(records):
        if not isinstance(rec.get("completion"), str) or not rec["completion"].strip():
            raise DataError(f"SFT record {i} has no 'completion' text to imitate")
        p = encode_prompt(tokenizer, rec)
        c = encode_completion(tokenizer, rec["completion"], eos_id)
        if len(p) + len(c) > max_length:
            if long_prompts == "error":
                raise DataError(f"SFT record {i}: prompt {len(p)} + completion {len(c)} tokens "
                                f"> max_length={max_length}; raise the limit or set "
                                "long_prompts=skip")
            skipped.append((i, len(p) + len(c)))
            continue
        out.append(SFTExample(p + c, len(p)))
    if not out:
        raise DataError(f"all {len(records)} SFT records exceed max_length={max_length}")
    return out, skipped
