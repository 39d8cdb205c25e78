"""Random but realistic loss inputs for parity tests (fresh values every run via `rng`)."""

from __future__ import annotations

import torch

from rankgrpo_kernels import segment_ids_from_newlines


def make_batch(rng: torch.Generator, *, B=4, T=13, H=16, V=37, num_ranks=3,
               dtype=torch.float64, off_policy=True, with_ref=True, bias=False,
               ratio_noise=0.08, pad=True):
    """Inputs for the fused loss: hidden [B,T,H], weight [V,H], targets, mask with ragged
    padding, segment ids from a random newline table (incl. overflow), per-rank advantages,
    eos_mask (True at the last masked token of rows that ended with EOS), old/ref log-probs
    as small perturbations of the true ones."""
    hidden = torch.randn(B, T, H, generator=rng, dtype=torch.float64)
    weight = torch.randn(V, H, generator=rng, dtype=torch.float64) / H ** 0.5 * 2
    b = torch.randn(V, generator=rng, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (B, T), generator=rng)
    lengths = torch.randint(1, T + 1, (B,), generator=rng) if pad else torch.full((B,), T)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    newline_table = (torch.rand(V, generator=rng) < 0.25).long()
    newline_table[torch.randint(0, V, (2,), generator=rng)] = 2  # merged "\n\n" tokens
    seg = segment_ids_from_newlines(targets, mask, newline_table, num_ranks)
    # Rows shorter than T ended with EOS at their last masked token; a full row may have been
    # truncated or may have ended exactly at T (a coin flip).
    ended = (lengths < T) | (torch.rand(B, generator=rng) < 0.5)
    eos_mask = (torch.arange(T).unsqueeze(0) == (lengths - 1).unsqueeze(1)) & ended.unsqueeze(1)
    adv = torch.randn(B, num_ranks, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        z = hidden @ weight.t() + (b if b is not None else 0)
        logp = torch.log_softmax(z, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = (logp + ratio_noise * torch.randn(B, T, generator=rng, dtype=torch.float64)
           if off_policy else None)
    ref = (logp + 0.3 * torch.randn(B, T, generator=rng, dtype=torch.float64)
           if with_ref else None)

    def cast(x):
        return None if x is None else x.to(dtype)

    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(b), targets=targets,
                mask=mask, segment_ids=seg, advantages=adv, old_logp=old, ref_logp=ref,
                eos_mask=eos_mask, num_ranks=num_ranks)


def run_fused(batch, backend, *, grads=True, **kw):
    """Loss, metrics and gradients (hidden, weight, bias) of the fused loss for a backend."""
    from rankgrpo_kernels import fused_linear_rank_grpo_loss

    leaves = {k: batch[k].detach().clone().requires_grad_(grads)
              for k in ("hidden", "weight", "bias") if batch[k] is not None}
    ref_logp = kw.pop("ref_logp", batch["ref_logp"])
    kw.setdefault("eos_mask", batch.get("eos_mask"))
    loss, metrics = fused_linear_rank_grpo_loss(
        leaves["hidden"], leaves["weight"], batch["targets"], batch["old_logp"],
        batch["advantages"], batch["segment_ids"], batch["mask"], bias=leaves.get("bias"),
        ref_logp=ref_logp, backend=backend, **kw)
    out = {"loss": loss.detach(), "metrics": metrics}
    if grads:
        loss.backward()
        out.update({f"d{k}": v.grad for k, v in leaves.items()})
    return out
