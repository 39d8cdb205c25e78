"""The one micro-batch backward loop of both training stages (SFT and RL).

One optimizer step's rows are split into micro-batches; each gets a forward and a backward,
and the gradients add up (no averaging: every micro-batch's loss already carries the step's
GLOBAL denominator, docs/math.md section 7). Around each backward:

- DDP: gradients are all-reduced only after the last micro-batch (`no_sync` on the others),
  and the loss is multiplied by the process count because DDP averages gradients where the
  global loss needs their sum;
- DeepSpeed: its engine steps inside `backward` unless told the micro-batch is not the last
  of the step (accelerate's gradient-state flag, set here for every micro-batch);
- ZeRO-3: the LM head is gathered for the fused loss (`gathered_lm_head`) and stays gathered
  through the backward.

Metrics travel as SUMS (token counts, clip counts, ratio / KL / entropy sums, the loss) and
extremes (the ratio's min / max: `rankgrpo_kernels.SUM_REDUCTIONS` says how each kernel
sum combines; any other key adds up), accumulated on the device without a host sync per
micro-batch, then combined across processes by ONE collective per step (a gather of one
packed vector: sums add up, extremes take the min / max). Means are made afterwards by the
caller, e.g. with `rankgrpo_kernels.metrics_from_sums`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

from rankgrpo_kernels import SUM_REDUCTIONS

from .model import gathered_lm_head

MB = TypeVar("MB")
LossFn = Callable[[MB], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


def world_of(accelerator) -> tuple[int, int]:
    """(process index, process count); (0, 1) without an accelerator."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def deepspeed_boundary(accelerator, last: bool) -> None:
    """Under DeepSpeed, accelerate's backward also steps the engine unless told that this
    micro-batch is not the last of the step. NOT TESTED here (no DeepSpeed, no GPUs)."""
    if accelerator is None or "DEEPSPEED" not in str(accelerator.distributed_type):
        return
    accelerator.gradient_state._set_sync_gradients(last)


def _kind(key: str) -> str:
    return SUM_REDUCTIONS.get(key, "sum")


def _combine(total: dict[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
    """Add `new` into `total` in place (min / max for extremes), on the device, no sync."""
    for k, v in new.items():
        v = v.detach().to(torch.float64).reshape(())
        if k not in total:
            total[k] = v
        elif _kind(k) == "min":
            total[k] = torch.minimum(total[k], v)
        elif _kind(k) == "max":
            total[k] = torch.maximum(total[k], v)
        else:
            total[k] = total[k] + v


def reduce_sums(sums: Mapping[str, torch.Tensor], accelerator=None) -> dict[str, torch.Tensor]:
    """Combine per-process sums and extremes over all processes with one collective.

    Every process must pass the same keys. Returns 0-dim float64 CPU tensors (one host sync).
    """
    keys = sorted(sums)
    if not keys:
        return {}
    sign = {"min": 1.0, "max": -1.0, "sum": 1.0}
    packed = torch.stack([sums[k].detach().to(torch.float64).reshape(()) * sign[_kind(k)]
                          for k in keys])
    _, world = world_of(accelerator)
    if world > 1:
        rows = accelerator.gather(packed.to(accelerator.device).reshape(1, -1)).cpu()
        # Sums add up; extremes are all minima after the sign flip of the maxima.
        packed = torch.stack([rows[:, i].min() if _kind(k) != "sum" else rows[:, i].sum()
                              for i, k in enumerate(keys)])
    packed = packed.cpu()
    return {k: packed[i] * sign[_kind(k)] for i, k in enumerate(keys)}


def backward_micro_batches(model, micro_batches: Sequence[MB], loss_fn: LossFn, *,
                           accelerator=None) -> dict[str, torch.Tensor]:
    """Forward + backward of each micro-batch; returns the step's metric sums over all
    micro-batches and processes.

    Args:
        model: the (possibly DDP / FSDP / DeepSpeed-wrapped) model whose gradients accumulate.
        micro_batches: this process's micro-batches, in order.
        loss_fn: micro-batch -> (loss 0-dim tensor: its share of the step's loss, i.e. with
            the global denominator; sums: a dict of 0-dim tensors to add up over the step,
            the kernel's extremes by `SUM_REDUCTIONS`). Called inside the gathered-head
            context, so it may read the full LM head.
        accelerator: an `accelerate.Accelerator`, or None for a plain single process.
    Returns:
        0-dim float64 CPU tensors: "loss" (the step's loss, summed over micro-batches and
        processes) and every key of the sums, reduced as described.
    """
    _, world = world_of(accelerator)
    inner = accelerator.unwrap_model(model) if accelerator is not None else model
    total: dict[str, torch.Tensor] = {}
    for j, mb in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        sync = accelerator.no_sync(model) if (world > 1 and not last) \
            else contextlib.nullcontext()
        deepspeed_boundary(accelerator, last)
        with sync, gathered_lm_head(inner, accelerator):
            loss, sums = loss_fn(mb)
            scaled = loss * world  # DDP averages gradients; the global loss needs their sum
            if accelerator is not None:
                accelerator.backward(scaled)
            else:
                scaled.backward()
        _combine(total, {"loss": loss, **sums})
    return reduce_sums(total, accelerator)
