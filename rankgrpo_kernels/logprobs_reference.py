"""Phase 1, the oracle: materialised [N, V] logits and plain autograd.

Used by tests (in float64) and as the "TRL-style" contender in bench/. Never use it for
training at real vocabulary sizes: it allocates N x V logits and their gradient.
"""

from __future__ import annotations

import torch


def logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             bias: torch.Tensor | None, temperature: float,
             need_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V, H], targets [N] long (negative = ignored) -> logp [N]
    (and entropy [N]) in float32, or float64 for float64 inputs; differentiable."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z = z + bias.to(acc)
    z = z / temperature
    logsm = torch.log_softmax(z, dim=-1)
    valid = targets >= 0
    logp = logsm.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    entropy = -(logsm.exp() * logsm).sum(-1) if need_entropy else None
    return logp, entropy
