"""Stage 1 of ConvRec-R1: Remap-Reflect-Adjust (paper section 2.2.2 and App. A, Eq. 10-13;
docs/rra/README.md).

A teacher's zero-shot lists become catalog-grounded SFT demonstrations: Remap (Eq. 10)
scores every catalog item from the teacher's list and the conversation, Reflect (Eq. 11)
adds the teacher's ratings of the top candidates, Adjust (Eq. 12-13) fits a per-item affine
correction on the training conversations. `rankgrpo rra` runs it (`rankgrpo.rra.cli`).
"""

from .adjust import AdjustResult, adjust_objective, fit_adjust
from .reflect import Ratings, parse_ratings, reflect_scores
from .remap import exact_match_indicator, rank_weights, remap_scores

__all__ = ["AdjustResult", "Ratings", "adjust_objective", "exact_match_indicator",
           "fit_adjust", "parse_ratings", "rank_weights", "reflect_scores", "remap_scores"]
