"""Public phase 1: per-token log-probs from hidden states and the LM head, no [T, V] logits.

The phase-1 implementation (a `contract.Phase1Backend`) is picked by `backends.phase1_module`.
"""

from __future__ import annotations

import torch

from . import backends
from ._validate import FLOAT_DTYPES, check_finite, check_tensor
from .contract import Phase1Backend
from .logprobs_reference import logprobs as reference_logprobs


class _LinearLogprobs(torch.autograd.Function):
    """Autograd wrapper around a phase-1 module's forward/backward pair."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, impl: Phase1Backend,
                need_entropy):
        logp, lse_state, entropy = impl.forward(hidden, weight, targets, bias, temperature,
                                                need_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse_state, entropy)
        ctx.temperature, ctx.impl = temperature, impl
        # An unused entropy output then arrives as None and its gradient path is skipped.
        ctx.set_materialize_grads(False)
        if entropy is None:
            entropy = torch.zeros_like(logp)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse_state, entropy = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2])
        if grad_logp is None:
            grad_logp = torch.zeros(targets.shape, dtype=lse_state.dtype,
                                    device=lse_state.device)
        if grad_entropy is not None and entropy is None:
            grad_entropy = None  # entropy was not computed: its output is a constant zero
        dh, dw, db = ctx.impl.backward(hidden, weight, targets, bias, ctx.temperature,
                                       lse_state, entropy, grad_logp.contiguous(),
                                       grad_entropy, needs)
        return dh, dw, db, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False,
                    backend: str = "auto", validate: bool = True):
    """log softmax(hidden @ weight^T + bias) / temperature) at `targets`, never materialising
    the [tokens, vocab] logits (except backend="reference").

    Args:
        hidden: [B, T, H] or [T, H], fp32/fp16/bf16/fp64, already aligned with targets.
        weight: [V, H], the LM head (same dtype as hidden).
        targets: [B, T] or [T] integer token ids in [0, V), or `ignore_index`. The hidden
            rows of ignored targets may hold anything (NaN, inf): they are replaced by 0
            before the matmul, so they reach neither a result nor a gradient (their gradient
            is 0).
        bias: optional [V].
    Returns:
        logp [B, T] or [T] in fp32 (fp64 for fp64 inputs), 0 where the target is ignored;
        with return_entropy, also the entropy of the tempered softmax per token, same shape.
    Differentiable w.r.t. hidden, weight and bias; the backward recomputes logit tiles.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndims=(2, 3))
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndims=(2,))
    check_tensor("targets", targets, dtypes=(torch.int64, torch.int32), ndims=(1, 2))
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [V, {hidden.shape[-1]}]"
                         f" to match hidden's last dim")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected "
                         f"{tuple(hidden.shape[:-1])} (hidden's leading dims)")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndims=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [{weight.shape[0]}]")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    vocab = weight.shape[0]
    t = targets.reshape(-1).long()
    ignored = t == ignore_index
    if validate:
        bad = ~ignored & ((t < 0) | (t >= vocab))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
                             f"got {int(t[i])} at flat index {i}")
        check_finite("hidden", hidden, ~ignored.reshape(targets.shape).unsqueeze(-1))
        check_finite("weight", weight)
        check_finite("bias", bias)
    t = torch.where(ignored, torch.full_like(t, -1), t)
    # Rows of ignored tokens (padding) may hold NaN/inf; 0 * NaN would still reach the dot
    # products of the GEMMs, so the rows are zeroed here, once, for every backend (one copy
    # of hidden; the kernels stay unaware of it).
    h = torch.where(ignored.unsqueeze(1), 0, hidden.reshape(-1, hidden.shape[-1]))
    impl = backends.phase1_module(backend, hidden.device)
    if impl is None:
        logp, entropy = reference_logprobs(h, weight, t, bias, float(temperature), return_entropy)
    else:
        h = h.contiguous()
        w = weight.contiguous()
        if torch.is_grad_enabled() and any(
                x is not None and x.requires_grad for x in (hidden, weight, bias)):
            logp, entropy = _LinearLogprobs.apply(h, w, bias, t, float(temperature), impl,
                                                  return_entropy)
        else:
            logp, _, entropy = impl.forward(h, w, t, bias, float(temperature), return_entropy)
    logp = logp.reshape(targets.shape)
    if not return_entropy:
        return logp
    entropy = torch.where(ignored.reshape(targets.shape), torch.zeros_like(logp),
                          entropy.reshape(targets.shape))
    return logp, entropy
