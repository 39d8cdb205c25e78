"""Pieces both training loops share: the accelerator, the optimizer step, periodic
evaluation, resuming, the loop itself (`train_loop`: logging, evaluation, checkpoints,
Ctrl-C, the final save) and the result object."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import GracefulInterrupt, load_checkpoint, seed_everything
from .model import save_pretrained
from .run_log import RunLogger


@dataclass
class TrainResult:
    """What `sft_train` / `grpo_train` return.

    model: the trained (unwrapped) model; step: optimizer steps done; history: one dict of
    metrics per step (this run's steps; see metrics.jsonl for a resumed run's earlier ones);
    eval_history: one dict per held-out evaluation ({"step", "recall@5", "ndcg@5", ...});
    final_dir: the saved HF folder (None when not saved); interrupted: stopped by Ctrl-C.
    """

    model: Any
    step: int
    history: list[dict] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    final_dir: Path | None = None
    checkpoint_dir: Path | None = None
    interrupted: bool = False
    seconds: float = 0.0


def make_accelerator(cfg):
    """An Accelerator for this process (bf16 autocast when cfg.bf16). Under `accelerate
    launch` its environment decides DDP / FSDP / DeepSpeed."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision="bf16" if cfg.bf16 else "no",
                       cpu=not torch.cuda.is_available())


def steps_for(num_items: int, items_per_step: int, cfg, steps_per_batch: int = 1) -> int:
    """Optimizer steps: max_steps, or enough batches for num_train_epochs."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * num_items / items_per_step)) * steps_per_batch


def optimizer_step(model, optimizer, scheduler, cfg, accelerator) -> tuple[float, float]:
    """Clip, step, schedule, zero; returns (grad_norm before clipping, lr used)."""
    lr = optimizer.param_groups[0]["lr"]
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    if accelerator is not None:
        norm = accelerator.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    norm = float(norm) if norm is not None else float("nan")
    return norm, lr


def sync_flag(flag: bool, accelerator) -> bool:
    """True on every process when it is True on any (a Ctrl-C seen by one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def run_eval(model, tokenizer, records, catalog, eval_config, num_ranks, accelerator,
             step: int, logger, callbacks: Sequence[Callable[[dict], None]] = ()) -> dict:
    from .evaluate import evaluate

    t0 = time.perf_counter()
    m = evaluate(model, tokenizer, records, catalog, config=eval_config, num_ranks=num_ranks,
                 accelerator=accelerator)
    rec = {"step": step, **m, "time/eval": time.perf_counter() - t0}
    logger.log({"step": step, **{f"eval/{k}": v for k, v in rec.items() if k != "step"}})
    keys = [k for k in ("recall@10", "ndcg@10", "ndcg@20") if k in m]
    logger.write(f"[eval step {step}] " + " ".join(f"{k}={m[k]:.4f}" for k in keys))
    for cb in callbacks:
        cb({"event": "eval", **rec})
    return rec


def _read_history(path: Path, step: int) -> tuple[list[dict], list[dict]]:
    """The step and evaluation records up to `step` in a run's metrics.jsonl (the history of
    the run a resumed one continues)."""
    hist, evals = [], []
    if not path.exists():
        return hist, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) > step:
            continue
        if any(k.startswith("eval/") for k in rec):
            evals.append({"step": rec["step"], **{k[5:]: v for k, v in rec.items()
                                                  if k.startswith("eval/")}})
        else:
            hist.append(rec)
    return hist, evals


def resume_or_seed(checkpoint: Path | None, cfg, optimizer, scheduler, sampler, accelerator
                   ) -> tuple[dict, dict | None]:
    """Resume from `checkpoint` (the optimizer, the scheduler, this process's RNG and the
    sampler's data position), or seed a fresh run with cfg.seed + rank. Returns
    (trainer_state, extra) as `load_checkpoint`; a fresh run's is ({"step": 0}, None)."""
    if checkpoint is None:
        seed_everything(cfg.seed + accelerator.process_index)
        return {"step": 0}, None
    state, extra = load_checkpoint(checkpoint, optimizer=optimizer, scheduler=scheduler,
                                   accelerator=accelerator)
    sampler.load_state_dict(state["sampler"])
    return state, extra


STOP_MESSAGE = "stopped by Ctrl-C after step {step}; resume with --resume"


def train_loop(model, tokenizer, cfg, accelerator, logger: RunLogger,
               train_step: Callable[[int], dict], save: Callable[[int], Path], *, step: int,
               total_steps: int, checkpoint: Path | None, eval_records, catalog, eval_config,
               num_ranks: int, callbacks: Sequence[Callable[[dict], None]], save_final: bool,
               stop_message: str = STOP_MESSAGE) -> TrainResult:
    """Both stages' loop: optimizer steps step+1 .. total_steps, then the end of the run.

    train_step(n) does optimizer step n and returns its metrics; save(n) writes checkpoint-n.
    Around them: each step's metrics go to the history (after those of the run resumed from
    `checkpoint`, if any), the log (every cfg.logging_steps steps and the last), the progress
    bar and the callbacks; `eval_records` (None: none) are evaluated on start when
    cfg.eval_on_start, every cfg.eval_steps steps and at the end; a checkpoint is saved
    every cfg.save_steps steps, at the last one and on Ctrl-C, which then stops the run
    (logged with `stop_message`); the model goes to <output_dir>/final when save_final and
    not stopped.
    """
    out_dir = Path(cfg.output_dir)
    history, evals = [], []
    if checkpoint is not None:
        history, evals = _read_history(out_dir / "metrics.jsonl", step)

    def evaluate(at: int) -> None:
        evals.append(run_eval(model, tokenizer, eval_records, catalog, eval_config, num_ranks,
                              accelerator, at, logger, callbacks))

    interrupted, last_ckpt = False, checkpoint
    t_run = time.perf_counter()
    try:
        with GracefulInterrupt() as interrupt:
            if eval_records is not None and cfg.eval_on_start and step == 0:
                evaluate(step)
            while step < total_steps:
                rec = train_step(step + 1)
                step += 1
                history.append(rec)
                if step % cfg.logging_steps == 0 or step == total_steps:
                    logger.log(rec)
                logger.progress(rec)
                for cb in callbacks:
                    cb({"event": "step", **rec})
                if eval_records is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
                    evaluate(step)
                stop = sync_flag(interrupt.requested, accelerator)
                if (cfg.save_steps and step % cfg.save_steps == 0) or stop or \
                        step == total_steps:
                    last_ckpt = save(step)
                if stop:
                    interrupted = True
                    logger.write(stop_message.format(step=step, checkpoint=last_ckpt))
                    break
        if not interrupted and eval_records is not None and (
                not cfg.eval_steps or step % cfg.eval_steps != 0):
            evaluate(step)
    finally:
        logger.close()
    final_dir = None
    if save_final and not interrupted:
        final_dir = out_dir / "final"
        save_pretrained(model, tokenizer, final_dir, accelerator)
    return TrainResult(model=accelerator.unwrap_model(model), step=step, history=history,
                       eval_history=evals, output_dir=out_dir, final_dir=final_dir,
                       checkpoint_dir=last_ckpt, interrupted=interrupted,
                       seconds=time.perf_counter() - t_run)
