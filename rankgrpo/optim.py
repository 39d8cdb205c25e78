"""AdamW and the learning-rate schedules both stages use."""

from __future__ import annotations

import math

import torch


def make_optimizer(model, cfg) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (betas from the config; paper: 0.9, 0.99)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1,
                                                                  cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def warmup_steps(cfg, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(math.ceil(cfg.warmup_ratio *
                                                                       total_steps))


def lr_factor(step: int, cfg, total_steps: int) -> float:
    """Multiplier of learning_rate after `step` optimizer steps."""
    warm = warmup_steps(cfg, total_steps)
    kind = cfg.lr_scheduler_type
    if warm and step < warm and kind != "constant":
        return step / warm  # as transformers' schedules: 0 at step 0
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    if kind == "multistep":
        return cfg.lr_gamma ** sum(step >= m for m in cfg.lr_milestones)
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def make_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, total_steps))
