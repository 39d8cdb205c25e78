"""Rank-GRPO inside the trainers people already run (docs/integrations.md).

- `rankgrpo.integrations.trl`: `RankGRPOConfig`, `RankGRPOTrainer` (extra `rankgrpo[trl]`).
- `rankgrpo.integrations.verl`: policy losses registered in verl's registry and a per-rank
  catalog reward manager (extra `rankgrpo[verl]`).
- `catalog_reward_function`: the paper's catalog reward as a TRL-style reward function
  (no TRL import needed).

The TRL and verl modules are imported on first use, so this package imports without them.
"""

from __future__ import annotations

from ._support import Option, UnsupportedOptionError
from .rewards import catalog_reward_function

__all__ = ["catalog_reward_function", "Option", "UnsupportedOptionError"]
