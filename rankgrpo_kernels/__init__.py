"""rankgrpo_kernels: fused log-prob and Rank-GRPO loss kernels (torch + triton only).

The package owns the whole loss contract of docs/math.md sections 5-9: per-token advantages
(`token_advantages`, with an explicit `eos_mask`), the loss and its denominator
(`rank_grpo_loss`, `fused_linear_rank_grpo_loss`, `loss_normalizer`), the metrics
(`metrics_from_sums`) and the option names (LOSS_TYPES from LOSS_TYPE_TABLE, its AGGREGATIONS,
LEVELS, BACKENDS, ADVANTAGES_PER).
A trainer calls these instead of restating any formula.
"""

from .backends import native_available, triton_available
from .contract import (
    ADVANTAGES_PER,
    AGGREGATIONS,
    BACKENDS,
    DELTA_MIN,
    LEVELS,
    LOSS_TYPE_TABLE,
    LOSS_TYPES,
    Phase1Backend,
    check_delta,
)
from .linear_logprobs import linear_logprobs
from .loss import (
    LinearRankGRPOLoss,
    fused_linear_rank_grpo_loss,
    loss_normalizer,
    rank_grpo_loss,
)
from .segment_stage import SUM_KEYS, SUM_REDUCTIONS, metrics_from_sums, reduce_sums
from .segments import (
    LengthShaping,
    eos_mask_from_ids,
    gather_rank_advantages,
    group_advantages,
    items_from_segments,
    length_shaping,
    segment_ids_from_newlines,
    token_advantages,
)

__all__ = [
    # phase 1
    "linear_logprobs",
    # tokens -> ranks, advantages (docs/math.md sections 4-5)
    "segment_ids_from_newlines",
    "group_advantages",
    "gather_rank_advantages",
    "eos_mask_from_ids",
    "items_from_segments",
    "length_shaping",
    "LengthShaping",
    "token_advantages",
    # the loss (sections 6-7)
    "rank_grpo_loss",
    "fused_linear_rank_grpo_loss",
    "LinearRankGRPOLoss",
    "loss_normalizer",
    "check_delta",
    "DELTA_MIN",
    # metrics (section 9)
    "metrics_from_sums",
    "reduce_sums",
    "SUM_KEYS",
    "SUM_REDUCTIONS",
    # option names, backends
    "LOSS_TYPES",
    "LOSS_TYPE_TABLE",
    "AGGREGATIONS",
    "LEVELS",
    "BACKENDS",
    "ADVANTAGES_PER",
    "Phase1Backend",
    "triton_available",
    "native_available",
]
__version__ = "0.1.0"
