"""The loss contract in one place: option names, the `delta` range and the phase-1 protocol.

The trainer's config, the CLI and the tests import these enumerations instead of spelling the
options again, so a new option is validated and tested without further edits.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

# docs/math.md sections 7 and 7.1: every `loss_type` of rank_grpo_loss -> (its aggregation,
# its default surrogate). The aggregation (the weights u_t and the denominator D of section 7,
# `loss_normalizer`) is the name of a plain loss type, the one with that aggregation and the
# "clip" surrogate; the surrogates are those of `variants.SURROGATES`. "dapo" is bnpo: its
# global token count is the `normalizer` keyword (TRL's num_items_in_batch). A new loss type
# is one row here; the names below, the config and the tests follow.
LOSS_TYPE_TABLE: dict[str, tuple[str, str]] = {
    "bnpo": ("bnpo", "clip"),
    "grpo": ("grpo", "clip"),
    "dr_grpo": ("dr_grpo", "clip"),
    "rank": ("rank", "clip"),
    "dapo": ("bnpo", "clip"),
    "luspo": ("luspo", "clip"),
    "cispo": ("bnpo", "cispo"),
    "sapo": ("grpo", "sapo"),
    "vespo": ("bnpo", "vespo"),
}
# Every loss type rank_grpo_loss, loss_normalizer and the trainer's `grpo.loss_type` accept.
LOSS_TYPES = tuple(LOSS_TYPE_TABLE)
# The distinct aggregations, in table order: one denominator formula each, and each the plain
# loss type (clip surrogate) of its aggregation, so a test over them covers every
# `loss_normalizer` branch and every backend (the native stage implements the plain loss only).
AGGREGATIONS = tuple(dict.fromkeys(agg for agg, _ in LOSS_TYPE_TABLE.values()))
# docs/math.md section 6: which tokens share an importance ratio.
LEVELS = ("token", "sequence", "rank")
# Public `backend=` values; `backends.py` maps each to its phase-1 and phase-2 implementation.
BACKENDS = ("auto", "reference", "torch", "triton", "native")
# docs/math.md section 5: what one advantage value belongs to (a token, a rank, a row).
ADVANTAGES_PER = ("token", "rank", "row")

# `delta` (docs/math.md section 7) caps the ratio of the unclipped term: min(w, delta) A.
# It must exceed 1, the on-policy ratio: with delta <= 1 a token whose ratio has moved above
# delta has a constant first term, so positive advantages stop being learnt as soon as the
# policy moves at all (for delta < 1 even on-policy). Values in (1, 1 + epsilon_high] are
# well defined but only tighten the clip of positive advantages (for negative ones the clip
# already wins); the intended use, bounding the ratio of negative advantages, needs
# delta > 1 + epsilon_high (TRL's recommendation, from INTELLECT-2's two-sided clipping).
DELTA_MIN = 1.0


def check_delta(delta: float | None, name: str = "delta") -> float | None:
    """Validate `delta`: None (no cap) or a finite number > DELTA_MIN (= 1).

    Returns it as a float (or None). Raises ValueError naming `name` otherwise; the
    trainer's config calls this with its own key name.
    """
    if delta is None:
        return None
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise ValueError(f"{name} must be None or a number > {DELTA_MIN:g}, got {delta!r}")
    value = float(delta)
    if not (value > DELTA_MIN and value != float("inf")):
        raise ValueError(f"{name} must be None or a finite number > {DELTA_MIN:g} (an upper "
                         f"bound on the ratio w, whose on-policy value is 1), got {delta!r}")
    return value


@runtime_checkable
class Phase1Backend(Protocol):
    """What a phase-1 implementation (log-probs from hidden states, docs/math.md section 7,
    last paragraph) provides: a module with these two functions.

    `lse_state` is the per-row normaliser the forward saves for the backward. Its layout is
    the backend's own: `logprobs_torch` saves the log-sum-exp of the tempered logits, float32
    (float64 for float64 inputs) [N]; `logprobs_triton` saves float32 [2, N], the raw logit
    maximum m and log2 of the scaled sum-exp s, with lse = m / temperature + ln 2 * log2 s
    (float64 inputs fall back to the torch layout). Only the backend that made it reads it.
    """

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None, temperature: float, need_entropy: bool,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """hidden [N, H], weight [V, H], targets [N] long (negative = ignored), bias [V] or
        None -> (logp [N], lse_state, entropy [N] or None), logp 0 at ignored targets."""
        ...

    def backward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 bias: torch.Tensor | None, temperature: float, lse_state: torch.Tensor,
                 entropy: torch.Tensor | None, grad_logp: torch.Tensor,
                 grad_entropy: torch.Tensor | None, needs: tuple[bool, bool, bool],
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of sum(grad_logp * logp + grad_entropy * entropy) w.r.t. (hidden,
        weight, bias), each None where `needs` says it is not wanted, in the inputs' dtypes."""
        ...
