"""Rollouts: sample completions for prompts.

`Rollout` is the interface the trainer calls; `HFRollout` implements it with Hugging Face
`generate` (left padding, EOS and truncation handling, temperature / top_p / top_k). A vLLM
backend plugs in by implementing the same `generate` method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class RolloutOutput:
    """Completions for B prompts (prompt i -> row i), on the policy's device.

    prompt_ids / prompt_mask: [B, P], left padded.
    completion_ids: [B, C], right padded with the pad id after the first EOS.
    completion_mask: [B, C] bool, True up to and including the first EOS (all generated
        tokens when the completion was truncated).
    texts: the decoded completions (special tokens skipped; what the reward parses).
    truncated: [B] bool, no EOS within the length limit.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    truncated: torch.Tensor

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def to(self, device: torch.device | str) -> RolloutOutput:
        """The same completions with every tensor on `device` (texts unchanged)."""
        return RolloutOutput(self.prompt_ids.to(device), self.prompt_mask.to(device),
                             self.completion_ids.to(device),
                             self.completion_mask.to(device).bool(), self.texts,
                             self.truncated.to(device))

    def select(self, rows: slice | Sequence[int]) -> RolloutOutput:
        idx = rows if isinstance(rows, slice) else torch.as_tensor(list(rows), dtype=torch.long)
        texts = self.texts[rows] if isinstance(rows, slice) else [self.texts[i] for i in rows]
        return RolloutOutput(self.prompt_ids[idx], self.prompt_mask[idx],
                             self.completion_ids[idx], self.completion_mask[idx], texts,
                             self.truncated[idx])


@runtime_checkable
class Rollout(Protocol):
    """Anything that turns prompt token ids into completions."""

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 greedy: bool = False) -> RolloutOutput:
        """One completion per entry of `prompts` (repeat a prompt G times for a group)."""
        ...


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids and mask, left padded to the longest sequence."""
    if not sequences:
        raise ValueError("no prompts to pad")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def completion_mask(completion_ids: torch.Tensor,
                    eos_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, C] bool: up to and including the first EOS, truncated [B] bool)."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_ids),
                                                        device=completion_ids.device))
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS seen strictly before
    mask = before == 0
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def decode_completions(tokenizer, completion_ids: torch.Tensor,
                       mask: torch.Tensor) -> list[str]:
    rows = [ids[m].tolist() for ids, m in zip(completion_ids.cpu(), mask.cpu())]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


class HFRollout:
    """`Rollout` with Hugging Face `generate`.

    Args:
        model: the policy (unwrapped: not the DDP wrapper).
        tokenizer: its tokenizer.
        eos_ids: ids that end a completion (`model.generation_eos_ids`).
        batch_size: completions per `generate` call (None: all at once).
    Sampling uses the global torch RNG, so `torch.manual_seed` (and a restored RNG state on
    resume) reproduces it.
    """

    def __init__(self, model, tokenizer, eos_ids: Sequence[int], batch_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = [int(i) for i in eos_ids]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else self.eos_ids[0]
        self.batch_size = batch_size

    def _generation_config(self, max_new_tokens, temperature, top_p, top_k, greedy):
        from transformers import GenerationConfig

        kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=self.eos_ids,
                  pad_token_id=self.pad_id, num_beams=1, repetition_penalty=1.0,
                  use_cache=True, return_dict_in_generate=False)
        if greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:  # set every sampling knob: a checkpoint's generation_config must not leak in
            kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p),
                      top_k=int(top_k), min_p=None, typical_p=1.0)
        return GenerationConfig(**kw)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 greedy: bool = False) -> RolloutOutput:
        if len(prompts) == 0:
            raise ValueError("generate() got no prompts")
        device = next(self.model.parameters()).device
        gen_cfg = self._generation_config(max_new_tokens, temperature, top_p, top_k, greedy)
        step = self.batch_size or len(prompts)
        was_training = self.model.training
        self.model.eval()
        parts = []
        try:
            for start in range(0, len(prompts), step):
                chunk = prompts[start:start + step]
                ids, mask = left_pad(chunk, self.pad_id, device)
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          generation_config=gen_cfg)
                parts.append((ids, mask, out[:, ids.shape[1]:]))
        finally:
            self.model.train(was_training)
        p_width = max(p[0].shape[1] for p in parts)
        c_width = max(max(p[2].shape[1] for p in parts), 1)
        prompt_ids, prompt_mask, comp = [], [], []
        for ids, mask, c in parts:
            pad = p_width - ids.shape[1]
            prompt_ids.append(torch.nn.functional.pad(ids, (pad, 0), value=self.pad_id))
            prompt_mask.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
            comp.append(torch.nn.functional.pad(c, (0, c_width - c.shape[1]),
                                                value=self.pad_id))
        completion_ids = torch.cat(comp)
        cmask, truncated = completion_mask(completion_ids, self.eos_ids)
        if completion_ids.shape[1] == 0:  # pragma: no cover - generate always adds a token
            cmask = torch.zeros_like(completion_ids, dtype=torch.bool)
        completion_ids = torch.where(cmask, completion_ids,
                                     torch.full_like(completion_ids, self.pad_id))
        texts = decode_completions(self.tokenizer, completion_ids, cmask)
        return RolloutOutput(torch.cat(prompt_ids), torch.cat(prompt_mask), completion_ids,
                             cmask, texts, truncated)
