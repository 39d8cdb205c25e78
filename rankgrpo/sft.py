"""Stage 1: supervised fine-tuning on catalog-grounded demonstrations.

Completion-only loss (the prompt's tokens are not trained unless completion_only_loss is
off) through the same fused log-prob kernel the RL loss uses: CE = -logp from
`rankgrpo_kernels.linear_logprobs` on the last hidden states and the LM head, never the
model's logits. The loss is the mean over every completion token of the optimizer step (all
micro-batches, all processes), so it does not depend on how the step is split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rankgrpo_kernels import linear_logprobs

from .backward import backward_micro_batches
from .checkpoint import load_weights, resolve_resume
from .config import EvalConfig, SFTConfig, validate_section
from .encoding import SFTExample, encode_prompts, encode_sft
from .model import (
    call_through_wrapper,
    generation_eos_ids,
    last_hidden_states,
    lm_head_params,
)
from .optim import make_optimizer, make_scheduler
from .run_log import RunLogger, peak_memory_gib
from .runtime import (
    TrainerState,
    TrainResult,
    make_accelerator,
    make_saver,
    optimizer_step,
    preflight_resume,
    resume_or_seed,
    steps_for,
    train_loop,
)
from .sampler import EpochSampler

PROGRESS = {"loss": "loss", "tok/s": "tokens_per_second"}


def collate(examples: Sequence[SFTExample], pad_id: int, completion_only: bool,
            device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [b, L], attention_mask [b, L], loss mask [b, L-1] over the targets
    input_ids[:, 1:]) with right padding."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    loss = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        att[i, :n] = 1
        loss[i, (e.prompt_length if completion_only else 1):n] = True
    return ids.to(device), att.to(device), loss[:, 1:].to(device)


def _step_loss(model, inner, ids, att, lmask, normalizer, cfg, accelerator) -> torch.Tensor:
    """One micro-batch's share of the step's loss, 0-dim float64: -sum of logp over its loss
    tokens / `normalizer` (the loss tokens of the whole step, all micro-batches and
    processes)."""

    def fn():
        h = last_hidden_states(inner, ids, att)[:, :-1]
        if cfg.bf16 and h.dtype != torch.bfloat16:
            h = h.to(torch.bfloat16)
        w, b = lm_head_params(inner)
        w = w.to(h.dtype)
        b = None if b is None else b.to(h.dtype)
        targets = torch.where(lmask, ids[:, 1:], -100)
        logp = linear_logprobs(h, w, targets, bias=b, backend=cfg.kernel_backend)
        return -(logp.double() * lmask).sum() / normalizer

    with accelerator.autocast():
        return call_through_wrapper(model, inner, fn)


def sft_train(model, tokenizer, train_records: Sequence[Mapping[str, Any]],
              config: SFTConfig, *, catalog=None, num_ranks: int = 20,
              eval_records: Sequence[Mapping[str, Any]] | None = None,
              eval_config: EvalConfig | None = None, accelerator=None,
              resume: str | bool | None = None,
              callbacks: Sequence[Callable[[dict], None]] = (),
              save_final: bool = True, allow_config_change: bool = False) -> TrainResult:
    """Fine-tune `model` to produce each record's `completion` (then EOS) after its prompt.

    Arguments mirror `rankgrpo.train.grpo_train`; `catalog` is needed only for the held-out
    evaluation (`eval_records`, every config.eval_steps steps and at the end).
    """
    cfg = config
    validate_section("sft", cfg)
    acc = accelerator if accelerator is not None else make_accelerator(cfg)
    rank, world = acc.process_index, acc.num_processes
    eos_id = generation_eos_ids(model, tokenizer)[0]
    examples, skipped = encode_sft(tokenizer, train_records, cfg.max_length, eos_id,
                                   long_prompts=cfg.long_prompts)
    ecfg = eval_config or EvalConfig()
    if eval_records is not None:
        encode_prompts(tokenizer, eval_records, ecfg.max_prompt_length,
                       long_prompts=ecfg.long_prompts, what="evaluation")
    per_process = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    per_step = per_process * world
    total_steps = steps_for(len(examples), per_step, cfg)
    out_dir = Path(cfg.output_dir)
    ckpt = resolve_resume(resume, out_dir)
    resumed_step = preflight_resume(ckpt, cfg, allow_config_change)
    if ckpt is not None:
        load_weights(model, ckpt)
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    inner = acc.unwrap_model(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    state = TrainerState("sft", EpochSampler(len(examples), cfg.seed), dict(vars(cfg)))
    logger = RunLogger(out_dir, report_to=cfg.report_to, main=acc.is_main_process,
                       total_steps=total_steps, initial_step=resumed_step,
                       disable_tqdm=cfg.disable_tqdm, desc="sft", postfix_keys=PROGRESS)
    resume_or_seed(ckpt, cfg, optimizer, scheduler, state, acc, allow_config_change, logger)
    sampler = state.sampler
    if skipped:
        logger.write(f"skipped {len(skipped)} SFT records longer than max_length="
                     f"{cfg.max_length}")

    def train_step(step: int) -> dict:
        """Optimizer step number `step` on the sampler's next batch; returns its metrics."""
        t0 = time.perf_counter()
        idx = sampler.take(per_step)[rank * per_process:(rank + 1) * per_process]
        mbs = [collate([examples[i] for i in idx[s:s + cfg.per_device_train_batch_size]],
                       pad_id, cfg.completion_only_loss, acc.device)
               for s in range(0, len(idx), cfg.per_device_train_batch_size)]
        count = sum(m[2].sum() for m in mbs).double().reshape(1)
        if world > 1:
            count = acc.reduce(count.to(acc.device), reduction="sum").cpu()
        normalizer = float(count.clamp(min=1))

        def loss_fn(mb):
            ids, att, lmask = mb
            loss = _step_loss(model, inner, ids, att, lmask, normalizer, cfg, acc)
            return loss, {"num_tokens": att.sum()}

        # the loss and the step's tokens (prompt + completion), summed over processes
        sums = backward_micro_batches(model, mbs, loss_fn, accelerator=acc)
        loss_sum, n_tok = float(sums["loss"]), float(sums["num_tokens"])
        t1 = time.perf_counter()
        skipped_before = state.skipped_steps
        grad_norm, lr = optimizer_step(model, optimizer, scheduler, cfg, acc, step=step,
                                       loss=loss_sum, state=state)
        t2 = time.perf_counter()
        state.num_tokens += int(n_tok)
        return {"step": step, "epoch": sampler.progress, "loss": loss_sum,
                "learning_rate": lr, "grad_norm": grad_norm,
                "num_loss_tokens": float(count), "num_tokens": state.num_tokens,
                "nonfinite_skipped": float(state.skipped_steps - skipped_before),
                "tokens_per_second": n_tok / max(t2 - t0, 1e-9),
                "time/loss": t1 - t0, "time/optimizer": t2 - t1, **peak_memory_gib()}

    save = make_saver(state, out_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                      tokenizer=tokenizer, accelerator=acc,
                      save_total_limit=cfg.save_total_limit)
    return train_loop(model, tokenizer, cfg, acc, logger, train_step, save, state=state,
                      total_steps=total_steps, checkpoint=ckpt, eval_records=eval_records,
                      catalog=catalog, eval_config=ecfg, num_ranks=num_ranks,
                      callbacks=callbacks, save_final=save_final)
