"""rankgrpo_kernels: fused log-prob and Rank-GRPO loss kernels (torch + triton only).

Public API (SPEC.md / DESIGN.md): linear_logprobs, segment_ids_from_newlines,
group_advantages, rank_grpo_loss, fused_linear_rank_grpo_loss, LinearRankGRPOLoss.
"""

from .backends import native_available, triton_available
from .linear_logprobs import linear_logprobs
from .loss import LinearRankGRPOLoss, fused_linear_rank_grpo_loss, rank_grpo_loss
from .segments import gather_rank_advantages, group_advantages, segment_ids_from_newlines

__all__ = [
    "linear_logprobs",
    "segment_ids_from_newlines",
    "group_advantages",
    "gather_rank_advantages",
    "rank_grpo_loss",
    "fused_linear_rank_grpo_loss",
    "LinearRankGRPOLoss",
    "triton_available",
    "native_available",
]
__version__ = "0.1.0"
