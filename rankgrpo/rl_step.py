"""One Rank-GRPO step, as separate units (docs/math.md sections 4-7):

    score_rollout         texts -> relevance -> rank rewards [B, N] (or the sequence DCG [B]),
                          token segment ids (newline or aligned mode), list diagnostics
    group_advantages_dp   rewards gathered across processes -> group advantages -> this
                          process's rows
    build_rl_batch        per-token advantages + length shaping, loss mask, old / reference
                          log-probs, and the GLOBAL loss normaliser
    accumulate_gradients  the fused loss on the last hidden states and the LM head, one
                          backward per micro-batch (gradients sum to the full-batch gradient)

Every formula of the loss is the kernel package's: per-token advantages
(`rankgrpo_kernels.token_advantages`, docs/math.md section 5), the denominator
(`loss_normalizer`, summed here over processes, section 7) and the metric means
(`metrics_from_sums`, section 9). The loss normaliser counts the whole optimizer step (all
micro-batches on all processes), and DDP's gradient averaging is undone by a factor of the
process count (`rankgrpo.backward`), so the gradient does not depend on how the step's
completions are split into micro-batches or processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from rankgrpo_kernels import (
    LengthShaping,
    eos_mask_from_ids,
    fused_linear_rank_grpo_loss,
    group_advantages,
    linear_logprobs,
    loss_normalizer,
    metrics_from_sums,
    segment_ids_from_newlines,
    token_advantages,
)

from .alignment import aligned_segment_ids
from .backward import backward_micro_batches, world_of
from .config import GRPOConfig
from .metrics import aggregate_diagnostics, list_diagnostics
from .model import (
    call_through_wrapper,
    gathered_lm_head,
    is_fsdp2_module,
    last_hidden_states,
    lm_head_params,
)
from .rewards import relevance_matrix, rewards_from_relevance, sequence_dcg
from .rollout import RolloutOutput

# ----------------------------------------------------------------------------- rewards

@dataclass
class Scored:
    """Rewards and token segments of one process's completions."""

    relevance: torch.Tensor  # [B, N] float32 0/1
    rewards: torch.Tensor  # [B, N] rank rewards, or [B] sequence DCG
    segment_ids: torch.Tensor  # [B, C] long, kernel convention
    num_items: torch.Tensor | None  # [B] parsed items (aligned mode), else None
    diagnostics: list[dict]  # metrics.list_diagnostics per completion


def score_rollout(rollout: RolloutOutput, records: Sequence[Mapping[str, Any]], *, catalog,
                  tokenizer, newline_table: torch.Tensor, cfg: GRPOConfig, num_ranks: int,
                  year_tolerance: int = 2) -> Scored:
    """Relevance and rewards of each completion against its record (`records[i]` for row i)."""
    if len(records) != len(rollout):
        raise ValueError(f"{len(rollout)} completions but {len(records)} records")
    ids, mask = rollout.completion_ids, rollout.completion_mask
    if cfg.segment_mode == "aligned":
        aligned = aligned_segment_ids(tokenizer, ids, mask, num_ranks)
        generations: Sequence[Any] = aligned.items
        seg, num_items = aligned.segment_ids, aligned.num_items
    else:
        generations = rollout.texts
        seg = segment_ids_from_newlines(ids, mask, newline_table.to(ids.device), num_ranks)
        num_items = None
    rel = relevance_matrix(generations, records, catalog, num_ranks,
                           year_tolerance=year_tolerance)
    rewards = rewards_from_relevance(rel, cfg.reward_kind, cfg.reward_gamma)
    diags = [list_diagnostics(t, rec["seen_titles"], catalog, num_ranks)
             for t, rec in zip(rollout.texts, records)]
    return Scored(rel, rewards, seg, num_items, diags)


def gather_rows(x: torch.Tensor, accelerator) -> torch.Tensor:
    """Concatenate a per-process tensor over processes (rank order); identity alone."""
    rank, world = world_of(accelerator)
    if world == 1:
        return x
    return accelerator.gather(x.to(accelerator.device).contiguous()).to(x.device)


def group_advantages_dp(rewards: torch.Tensor, cfg: GRPOConfig,
                        accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(this process's advantages, all rewards). Rows are global in rank order, a group is
    num_generations consecutive rows and may span processes, so rewards are gathered first
    (docs/math.md section 4)."""
    rank, world = world_of(accelerator)
    everything = gather_rows(rewards, accelerator)
    adv = group_advantages(everything, cfg.num_generations, scale=cfg.scale_rewards)
    b = rewards.shape[0]
    return adv[rank * b:(rank + 1) * b], everything


# ----------------------------------------------------------------------------- the batch

@dataclass
class RLBatch:
    """One process's completions of a step, ready for the loss (all tensors [B, ...])."""

    input_ids: torch.Tensor  # [B, P + C] prompt (left padded) + completion
    attention_mask: torch.Tensor  # [B, P + C]
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C] bool, the tokens that enter the loss
    segment_ids: torch.Tensor  # [B, C]
    advantages: torch.Tensor  # [B, C] float32, per token, shaping included
    normalizer: torch.Tensor  # 0-dim float64, the loss denominator of the whole step
    old_logp: torch.Tensor | None = None  # [B, C] when num_iterations > 1
    ref_logp: torch.Tensor | None = None  # [B, C] when beta > 0

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.completion_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor],
                        device: torch.device | str = "cpu") -> RLBatch:
        return cls(**{k: v.to(device) for k, v in state.items()})


def shaping_of(cfg: GRPOConfig) -> LengthShaping:
    return LengthShaping(cfg.overflow_penalty, cfg.short_eos_penalty, cfg.exact_eos_bonus)


def token_level_advantages(advantages: torch.Tensor, scored: Scored, rollout: RolloutOutput,
                           eos_ids: Sequence[int], cfg: GRPOConfig,
                           num_ranks: int) -> torch.Tensor:
    """Per-token advantages [B, C] float32 by `rankgrpo_kernels.token_advantages`
    (docs/math.md section 5): per rank, A[i, seg] on item tokens and 0 on overflow, EOS and
    padding; per row (a sequence reward), A[i] on every completion token; then the length
    shaping of the config."""
    ids, mask = rollout.completion_ids, rollout.completion_mask
    seg = scored.segment_ids.to(ids.device)
    eos = eos_mask_from_ids(ids, mask, list(eos_ids))
    num_items = None if scored.num_items is None else scored.num_items.to(ids.device)
    return token_advantages(advantages.to(ids.device), seg, mask, eos, num_items=num_items,
                            shaping=shaping_of(cfg), num_ranks=num_ranks)


def global_normalizer(mask: torch.Tensor, segment_ids: torch.Tensor, cfg: GRPOConfig,
                      num_ranks: int, accelerator=None) -> torch.Tensor:
    """The loss denominator over the whole step: `rankgrpo_kernels.loss_normalizer` of this
    process's rows, summed over processes, then clamped to >= 1 (docs/math.md section 7).
    0-dim float64."""
    total = loss_normalizer(mask, segment_ids, cfg.loss_type, num_segments=num_ranks + 1,
                            max_completion_length=cfg.max_completion_length)
    if accelerator is not None and accelerator.num_processes > 1:
        total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
    return total.clamp(min=1.0).to(torch.float64)


def build_rl_batch(rollout: RolloutOutput, scored: Scored, advantages: torch.Tensor, *,
                   eos_ids: Sequence[int], cfg: GRPOConfig, num_ranks: int,
                   accelerator=None) -> RLBatch:
    """Assemble the loss inputs (old / reference log-probs are added by `add_logprobs`)."""
    mask = rollout.completion_mask.bool()
    adv_tok = token_level_advantages(advantages, scored, rollout, eos_ids, cfg, num_ranks)
    loss_mask = mask & ~rollout.truncated.unsqueeze(1) if cfg.mask_truncated_completions \
        else mask
    seg = scored.segment_ids.to(mask.device)
    normalizer = global_normalizer(loss_mask, seg, cfg, num_ranks, accelerator)
    return RLBatch(
        input_ids=torch.cat([rollout.prompt_ids, rollout.completion_ids], 1),
        attention_mask=torch.cat([rollout.prompt_mask.long(), mask.long()], 1),
        completion_ids=rollout.completion_ids, completion_mask=loss_mask,
        segment_ids=torch.where(loss_mask, seg, -1), advantages=adv_tok,
        normalizer=normalizer)


# ----------------------------------------------------------------------------- forward

@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    start: int  # hidden[:, start:start + C] predicts the completion tokens
    rows: slice
    width: int  # completion columns kept


def micro_batches(batch: RLBatch, size: int) -> list[MicroBatch]:
    """Row slices of `size`, each trimmed to its own longest prompt and completion."""
    out = []
    p = batch.prompt_width
    att = batch.attention_mask.bool()
    for r0 in range(0, len(batch), size):
        rows = slice(r0, min(r0 + size, len(batch)))
        a = att[rows]
        comp = a[:, p:]
        width = int(comp.any(0).nonzero().max()) + 1 if bool(comp.any()) else 1
        used = a[:, :p].any(0).nonzero()
        first = int(used.min()) if len(used) else p - 1
        first = min(first, p - 1)  # keep at least one prompt column
        out.append(MicroBatch(batch.input_ids[rows, first:p + width],
                              batch.attention_mask[rows, first:p + width], p - first - 1, rows,
                              width))
    return out


def _head(inner, dtype: torch.dtype):
    w, b = lm_head_params(inner)
    if w.dtype != dtype:
        w = w.to(dtype)
    if b is not None and b.dtype != dtype:
        b = b.to(dtype)
    return w, b


def _hidden(inner, mb: MicroBatch, compute_dtype: torch.dtype | None) -> torch.Tensor:
    h = last_hidden_states(inner, mb.input_ids, mb.attention_mask)
    h = h[:, mb.start:mb.start + mb.width]
    return h.to(compute_dtype) if compute_dtype is not None and h.dtype != compute_dtype else h


def compute_dtype_of(cfg) -> torch.dtype | None:
    return torch.bfloat16 if getattr(cfg, "bf16", False) else None


def _autocast(accelerator):
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()


@torch.no_grad()
def sequence_logprobs(model, batch: RLBatch, *, micro_batch_size: int, temperature: float,
                      backend: str = "auto", compute_dtype: torch.dtype | None = None,
                      accelerator=None) -> torch.Tensor:
    """[B, C] fp32 log-probs of the completion tokens (0 off the mask), no gradient: the old
    policy (num_iterations > 1) or the frozen reference."""
    inner = accelerator.unwrap_model(model) if accelerator is not None else model
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32,
                      device=batch.completion_ids.device)
    # FSDP (1 or 2): the root unit's parameters are whole only inside its forward
    through = is_fsdp2_module(inner) or type(model).__name__ == "FullyShardedDataParallel"
    for mb in micro_batches(batch, micro_batch_size):
        def logprobs(mb=mb):
            h = _hidden(inner, mb, compute_dtype)
            w, b = _head(inner, h.dtype)
            targets = batch.completion_ids[mb.rows, :mb.width]
            return linear_logprobs(h, w, targets, bias=b, temperature=temperature,
                                   backend=backend)

        with _autocast(accelerator), gathered_lm_head(inner, accelerator):
            lp = call_through_wrapper(model, inner, logprobs) if through else logprobs()
        m = batch.completion_mask[mb.rows, :mb.width]
        out[mb.rows, :mb.width] = torch.where(m, lp.float(), 0.0).to(out.device)
    return out


def add_logprobs(batch: RLBatch, model, ref_model, cfg: GRPOConfig, accelerator=None) -> RLBatch:
    """Old log-probs when num_iterations > 1; reference log-probs when beta > 0."""
    kw = dict(micro_batch_size=cfg.per_device_train_batch_size, temperature=cfg.temperature,
              backend=cfg.kernel_backend, compute_dtype=compute_dtype_of(cfg),
              accelerator=accelerator)
    if cfg.num_iterations > 1:
        batch.old_logp = sequence_logprobs(model, batch, **kw)
    if cfg.beta > 0:
        if ref_model is None:
            raise ValueError("beta > 0 needs a reference model")
        batch.ref_logp = sequence_logprobs(ref_model, batch, **kw)
    return batch


# ----------------------------------------------------------------------------- the loss

def micro_batch_loss(model, mb: MicroBatch, batch: RLBatch, cfg: GRPOConfig, num_ranks: int,
                     accelerator=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metric sums) of one micro-batch: the loss is its share of the step's loss (the
    denominator is the global normaliser); the sums are the kernel's raw sums
    (`return_sums=True`: token and clip counts, ratio / KL / entropy sums, ratio extremes)."""
    inner = accelerator.unwrap_model(model) if accelerator is not None else model
    rows, w_ = mb.rows, mb.width

    def sl(x):
        return None if x is None else x[rows, :w_]

    def loss_fn():
        h = _hidden(inner, mb, compute_dtype_of(cfg))
        w, b = _head(inner, h.dtype)
        return fused_linear_rank_grpo_loss(
            h, w, sl(batch.completion_ids), sl(batch.old_logp), sl(batch.advantages),
            sl(batch.segment_ids), sl(batch.completion_mask), bias=b,
            temperature=cfg.temperature, backend=cfg.kernel_backend, ref_logp=sl(batch.ref_logp),
            beta=cfg.beta, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
            delta=cfg.delta, level=cfg.importance_sampling_level, loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_length, normalizer=batch.normalizer,
            num_segments=num_ranks + 1, advantages_per="token", return_sums=True)

    with _autocast(accelerator):
        return call_through_wrapper(model, inner, loss_fn)


def accumulate_gradients(model, batch: RLBatch, cfg: GRPOConfig, num_ranks: int, *,
                         accelerator=None) -> dict[str, float]:
    """Backward of the step's loss over micro-batches of per_device_train_batch_size rows
    (`rankgrpo.backward.backward_micro_batches`). Gradients add up across micro-batches (no
    averaging); under DDP the all-reduce average is compensated, so the result is the
    gradient of the global loss. Returns the loss metrics of the whole step (all
    micro-batches and processes): the loss, the means of `metrics_from_sums`,
    num_loss_tokens and frac_tokens_nonzero_advantage."""

    def loss_fn(mb: MicroBatch):
        loss, sums = micro_batch_loss(model, mb, batch, cfg, num_ranks, accelerator)
        m = batch.completion_mask[mb.rows, :mb.width]
        nonzero = (m & (batch.advantages[mb.rows, :mb.width] != 0)).sum()
        return loss, {**sums, "nonzero_advantage_tokens": nonzero}

    sums = backward_micro_batches(model, micro_batches(batch, cfg.per_device_train_batch_size),
                                  loss_fn, accelerator=accelerator)
    tokens = float(sums["num_tokens"])
    out = {"loss": float(sums["loss"])}
    out.update({k: float(v) for k, v in metrics_from_sums(sums).items() if k != "num_tokens"})
    out["num_loss_tokens"] = tokens
    out["frac_tokens_nonzero_advantage"] = float(sums["nonzero_advantage_tokens"]) / tokens \
        if tokens else 0.0
    return out


# ----------------------------------------------------------------------------- metrics

def reward_spread_metrics(rewards: torch.Tensor, num_generations: int) -> dict[str, float]:
    """How much of a step's rewards carry no group-relative signal (docs/math.md section 9).

    rewards: [B, N] rank rewards or [B] sequence rewards, B = prompts x num_generations in
    prompt-major order. A "cell" is one prompt's rewards at one rank (per-sequence rewards:
    one cell per prompt); it has zero spread when all G completions got the same value.

    frac_reward_zero_std: share of prompts all of whose cells have zero spread (the prompt
        teaches nothing, every advantage 0 before shaping; TRL's per-prompt meaning and the
        released Rank-GRPO code's).
    frac_reward_zero_std_cells: share of (prompt, rank) cells with zero spread.
    """
    g = num_generations
    grouped = rewards.reshape(-1, g, *rewards.shape[1:])
    flat = (grouped.amax(1) == grouped.amin(1)).reshape(grouped.shape[0], -1)
    if flat.numel() == 0:
        return {"frac_reward_zero_std": 0.0, "frac_reward_zero_std_cells": 0.0}
    return {"frac_reward_zero_std": float(flat.all(1).float().mean()),
            "frac_reward_zero_std_cells": float(flat.float().mean())}


def rollout_metrics(scored: Scored, rollout: RolloutOutput, all_rewards: torch.Tensor,
                    records: Sequence[Mapping[str, Any]], cfg: GRPOConfig, num_ranks: int,
                    accelerator=None) -> dict[str, float]:
    """Reward, per-rank reward and relevance, NDCG of the samples, lengths and list
    diagnostics over all processes (docs/math.md section 9; names as TRL where it has them)."""
    rel = gather_rows(scored.relevance, accelerator)
    lengths = gather_rows(rollout.completion_mask.sum(1).float(), accelerator)
    truncated = gather_rows(rollout.truncated.float(), accelerator)
    n_gt = gather_rows(torch.tensor([float(len(r["groundtruth_with_release_year"]))
                                     for r in records]), accelerator)
    out: dict[str, float] = {}
    r = all_rewards.float()
    out["reward"] = float(r.mean())
    out["reward_std"] = float(r.std()) if r.numel() > 1 else 0.0
    if r.dim() == 2:
        for k in range(r.shape[1]):
            out[f"rewards/rank_{k + 1}/mean"] = float(r[:, k].mean())
            out[f"rewards/rank_{k + 1}/std"] = float(r[:, k].std()) if r.shape[0] > 1 else 0.0
    out.update(reward_spread_metrics(r, cfg.num_generations))
    for k in range(rel.shape[1]):
        out[f"relevance/rank_{k + 1}"] = float(rel[:, k].mean())
    dcg = [sequence_dcg(row) for row in rel.tolist()]
    idcg = [sequence_dcg([1] * min(int(n), rel.shape[1])) for n in n_gt.tolist()]
    out["rollout/hits"] = float(rel.sum(1).mean())
    out["rollout/dcg"] = sum(dcg) / len(dcg)
    out[f"rollout/ndcg@{rel.shape[1]}"] = sum(d / i if i > 0 else 0.0
                                              for d, i in zip(dcg, idcg)) / len(dcg)
    out["completions/mean_length"] = float(lengths.mean())
    out["completions/min_length"] = float(lengths.min())
    out["completions/max_length"] = float(lengths.max())
    out["completions/clipped_ratio"] = float(truncated.mean())
    term = lengths[truncated == 0]
    out["completions/mean_terminated_length"] = float(term.mean()) if len(term) else 0.0
    diags = scored.diagnostics
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        diags = gather_object(diags)
    for k, v in aggregate_diagnostics(diags, num_ranks).items():
        out[f"rollout/{k}"] = float(v)
    return out
