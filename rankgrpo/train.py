"""Stage 2: the Rank-GRPO training loop (also vanilla GRPO and GSPO, by configuration).

Read top to bottom, one optimizer step is:
    prompts (seeded, resumable order) -> rollout (G completions per prompt)
    -> score_rollout / group_advantages_dp / build_rl_batch / add_logprobs   (rl_step.py)
    -> accumulate_gradients (fused loss on hidden states + LM head, per micro-batch)
    -> clip, AdamW, scheduler                                  (all of it: train_step below)
    -> log, evaluate, checkpoint, Ctrl-C             (runtime.train_loop, shared with SFT)
With num_iterations > 1 a rollout batch serves that many optimizer steps. Everything a
checkpoint needs besides weights, optimizer, scheduler and RNG is in one `RLTrainerState`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_weights, resolve_resume
from .config import ConfigError, EvalConfig, GRPOConfig, validate_section
from .encoding import encode_prompts
from .model import frozen_copy, generation_eos_ids, lm_head_params
from .optim import make_optimizer, make_scheduler
from .rl_step import (
    RLBatch,
    accumulate_gradients,
    add_logprobs,
    build_rl_batch,
    group_advantages_dp,
    rollout_metrics,
    score_rollout,
)
from .rollout import HFRollout, Rollout
from .run_log import RunLogger, peak_memory_gib
from .runtime import (
    NonFiniteError,
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
from .tokens import newline_counts

PROGRESS = {"reward": "reward", "ndcg": "rollout/ndcg@20", "tok/s": "tokens_per_second"}
STOP_MESSAGE = ("stopped by {signal} after step {step}; resume with --resume "
                "(checkpoint {checkpoint})")


@dataclass
class _Round:
    """A scored rollout batch and how many optimizer steps it has served."""

    batch: RLBatch
    metrics: dict
    iteration: int = 0


@dataclass
class RLTrainerState(TrainerState):
    """`TrainerState` plus the rollout round being iterated on (num_iterations > 1): its
    metrics and iteration go to trainer_state.json, its batch to extra_rank{r}.pt."""

    pending: _Round | None = None
    num_iterations: int = 1

    def _open_round(self) -> _Round | None:
        p = self.pending
        return p if p is not None and p.iteration < self.num_iterations else None

    def state_dict(self) -> dict:
        out = super().state_dict()
        if (p := self._open_round()) is not None:
            out["pending_metrics"], out["pending_iteration"] = p.metrics, p.iteration
        return out

    def extra_state(self) -> dict | None:
        p = self._open_round()
        return None if p is None else {"batch": p.batch.state_dict()}

    def load_state_dict(self, state: dict, extra: dict | None = None, device=None) -> None:
        super().load_state_dict(state, extra, device)
        self.pending = None
        if extra is not None and "batch" in extra:
            self.pending = _Round(RLBatch.from_state_dict(extra["batch"], device),
                                  state["pending_metrics"], int(state["pending_iteration"]))


def grpo_train(model, tokenizer, train_records: Sequence[Mapping[str, Any]], catalog,
               config: GRPOConfig, *, num_ranks: int = 20, year_tolerance: int = 2,
               eval_records: Sequence[Mapping[str, Any]] | None = None,
               eval_config: EvalConfig | None = None, ref_model=None,
               rollout: Rollout | None = None, accelerator=None,
               resume: str | bool | None = None,
               callbacks: Sequence[Callable[[dict], None]] = (),
               save_final: bool = True, allow_config_change: bool = False) -> TrainResult:
    """Train `model` with Rank-GRPO on `train_records` (docs/math.md section 12 records).

    Args:
        model, tokenizer: the policy (e.g. the SFT result) and its tokenizer.
        train_records: records with prompt / seen_titles / groundtruth_with_release_year.
        catalog: a `rankgrpo.catalog.Catalog` (or any container of (title, year)).
        config: GRPOConfig (loss, rewards, batch, schedule, logging, checkpoints).
        num_ranks, year_tolerance: N and the year window of the reward (data section).
        eval_records, eval_config: held-out records, evaluated every config.eval_steps
            steps (and at the end) with greedy decoding.
        ref_model: the frozen reference for the KL (default: a frozen copy of `model` as
            passed in, made before any resumed weights are loaded).
        rollout: a `Rollout` (default: HF generate on the policy).
        accelerator: an `accelerate.Accelerator` (default: one made from the config).
        resume: None, True/"auto" (latest checkpoint in config.output_dir) or a folder.
        callbacks: called with every step's metrics dict ({"event": "step", ...}) and every
            evaluation ({"event": "eval", ...}).
        save_final: save the trained model to `<output_dir>/final` (HF format).
        allow_config_change: resume although `config` differs from the checkpoint's in keys
            that break an exact resume (they are applied; see runtime.check_resume_config).
    Everything that can be checked without compute is checked first: config values, batch
    divisibility, an empty dataset, prompts over max_prompt_length, the resume config.
    A non-finite loss or gradient norm raises `runtime.NonFiniteError` naming the step
    (or skips the step, up to config.skip_nonfinite_steps times).
    """
    cfg = config
    validate_section("grpo", cfg)
    acc = accelerator if accelerator is not None else make_accelerator(cfg)
    rank, world = acc.process_index, acc.num_processes
    per_process = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if (per_process * world) % cfg.num_generations:
        raise ConfigError(
            f"per_device_train_batch_size ({cfg.per_device_train_batch_size}) x "
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) x processes "
            f"({world}) = {per_process * world} completions per step is not a multiple of "
            f"num_generations ({cfg.num_generations})")
    prompts_per_step = per_process * world // cfg.num_generations
    enc = encode_prompts(tokenizer, train_records, cfg.max_prompt_length,
                         long_prompts=cfg.long_prompts, what="training")
    ecfg = eval_config or EvalConfig()
    if eval_records is not None:
        encode_prompts(tokenizer, eval_records, ecfg.max_prompt_length,
                       long_prompts=ecfg.long_prompts, what="evaluation")
    total_steps = steps_for(len(enc), prompts_per_step, cfg, cfg.num_iterations)
    out_dir = Path(cfg.output_dir)
    ckpt = resolve_resume(resume, out_dir)
    resumed_step = preflight_resume(ckpt, cfg, allow_config_change)

    # models
    if cfg.beta > 0 and ref_model is None:
        ref_model = frozen_copy(model)
    if ckpt is not None:
        load_weights(model, ckpt)
    eos_ids = generation_eos_ids(model, tokenizer)
    vocab_rows = lm_head_params(model)[0].shape[0]
    newline_table = newline_counts(tokenizer, vocab_size=max(vocab_rows, len(tokenizer)))
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    if ref_model is not None:
        ref_model = ref_model.to(acc.device)
    inner = acc.unwrap_model(model)
    engine = rollout if rollout is not None else HFRollout(
        inner, tokenizer, eos_ids, batch_size=cfg.generation_batch_size)

    # state
    state = RLTrainerState("grpo", EpochSampler(len(enc), cfg.seed), dict(vars(cfg)),
                           num_iterations=cfg.num_iterations)
    logger = RunLogger(out_dir, report_to=cfg.report_to, main=acc.is_main_process,
                       total_steps=total_steps, initial_step=resumed_step,
                       disable_tqdm=cfg.disable_tqdm, desc="rank-grpo", postfix_keys=PROGRESS)
    resume_or_seed(ckpt, cfg, optimizer, scheduler, state, acc, allow_config_change, logger)
    sampler = state.sampler
    if ckpt is not None:
        logger.write(f"resumed from {ckpt} at step {state.step}/{total_steps}")

    def new_round() -> _Round:
        t0 = time.perf_counter()
        idx = sampler.take(prompts_per_step)
        rows = range(rank * per_process, (rank + 1) * per_process)
        which = [idx[r // cfg.num_generations] for r in rows]
        with acc.autocast():
            out = engine.generate([enc.prompt_ids[i] for i in which],
                                  max_new_tokens=cfg.max_completion_length,
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  top_k=cfg.top_k).to(acc.device)  # any Rollout's output
        t1 = time.perf_counter()
        recs = [enc.records[i] for i in which]
        scored = score_rollout(out, recs, catalog=catalog, tokenizer=tokenizer,
                               newline_table=newline_table, cfg=cfg, num_ranks=num_ranks,
                               year_tolerance=year_tolerance)
        adv, all_rewards = group_advantages_dp(scored.rewards, cfg, acc)
        batch = build_rl_batch(out, scored, adv, eos_ids=eos_ids, cfg=cfg,
                               num_ranks=num_ranks, accelerator=acc)
        metrics = rollout_metrics(scored, out, all_rewards, recs, cfg, num_ranks, acc)
        t2 = time.perf_counter()
        batch = add_logprobs(batch, model, ref_model, cfg, acc)
        t3 = time.perf_counter()
        metrics.update({"time/generation": t1 - t0, "time/reward": t2 - t1,
                        "time/logprobs": t3 - t2})
        return _Round(batch, metrics)

    def train_step(step: int) -> dict:
        """Optimizer step number `step` (a new rollout round when the last one has served
        num_iterations steps); returns its metrics."""
        snapshot = state.snapshot()
        stepped = False
        skipped_before = state.skipped_steps
        try:
            t0 = time.perf_counter()
            timings = {}
            if state.pending is None or state.pending.iteration >= cfg.num_iterations:
                state.pending = new_round()
                timings = {k: v for k, v in state.pending.metrics.items()
                           if k.startswith("time/")}
            t1 = time.perf_counter()
            loss_metrics = accumulate_gradients(model, state.pending.batch, cfg, num_ranks,
                                                accelerator=acc)
            t2 = time.perf_counter()
            stepped = True
            grad_norm, lr = optimizer_step(model, optimizer, scheduler, cfg, acc, step=step,
                                           loss=float(loss_metrics.get("loss", 0.0)),
                                           state=state)
            t3 = time.perf_counter()
        except NonFiniteError:
            raise  # nothing was applied: the last checkpoint is the last good state
        except Exception:
            if not stepped and world == 1 and step > 1:
                _emergency_save(save, step, snapshot, logger)
            raise
        state.pending.iteration += 1
        b = state.pending.batch
        step_tokens = float(b.attention_mask.sum())
        if world > 1:
            step_tokens = float(acc.reduce(torch.tensor([step_tokens], device=acc.device),
                                           reduction="sum").item())
        state.num_tokens += int(step_tokens)
        return {"step": step, "epoch": sampler.progress, "learning_rate": lr,
                "grad_norm": grad_norm, **loss_metrics,
                **{k: v for k, v in state.pending.metrics.items() if not k.startswith("time/")},
                **timings, "time/loss": t2 - t1, "time/optimizer": t3 - t2,
                "time/step": t3 - t0, "num_tokens": state.num_tokens,
                "nonfinite_skipped": float(state.skipped_steps - skipped_before),
                "tokens_per_second": step_tokens / max(t3 - t0, 1e-9), **peak_memory_gib()}

    save = make_saver(state, out_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                      tokenizer=tokenizer, accelerator=acc,
                      save_total_limit=cfg.save_total_limit)
    return train_loop(model, tokenizer, cfg, acc, logger, train_step, save, state=state,
                      total_steps=total_steps, checkpoint=ckpt, eval_records=eval_records,
                      catalog=catalog, eval_config=ecfg, num_ranks=num_ranks,
                      callbacks=callbacks, save_final=save_final, stop_message=STOP_MESSAGE)


def _emergency_save(save, step, snapshot, logger) -> None:
    """After an error in step `step` before its optimizer update: the weights are those of
    step - 1, so save them with the trainer state and RNG of this step's start
    (`TrainerState.snapshot`)."""
    try:
        path = save(step - 1, snapshot)
        logger.write(f"error during step {step}: saved {path} (resume with --resume)")
    except Exception as e:  # noqa: BLE001 - never hide the original error
        logger.write(f"error during step {step}; the emergency checkpoint failed too: {e}")
