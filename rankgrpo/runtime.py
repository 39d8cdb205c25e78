"""Pieces both training loops share: the accelerator, the optimizer step, periodic
evaluation and the result object."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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
