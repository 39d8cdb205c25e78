"""Per-token advantages and length shaping (docs/math.md section 5): re-exported from
`rankgrpo_kernels`, which owns the rule (one implementation for the trainer, the README
quickstart and any other trainer). Kept so that `rankgrpo.shaping.<name>` imports still work.

Note: `token_advantages` applies length shaping only when `shaping=` is given (the trainer
passes its config's `LengthShaping`); before the rule moved into the kernel package the
default here was `LengthShaping()`.
"""

from rankgrpo_kernels import (
    LengthShaping,
    eos_mask_from_ids,
    items_from_segments,
    length_shaping,
    token_advantages,
)

__all__ = ["LengthShaping", "eos_mask_from_ids", "items_from_segments", "length_shaping",
           "token_advantages"]
