"""The paper's catalog reward as a TRL-style reward function (docs/math.md, rewards).

TRL calls a reward function as `f(prompts=..., completions=..., completion_ids=..., **columns)`
where every extra dataset column arrives as a list, one entry per completion. The function
built here parses each completion into `(title, year)` items, scores them against the row's
ground truth and the catalog (`rankgrpo.rewards.rank_relevance`) and returns, per completion,
the list of N per-rank rewards (`rankgrpo.rewards.rank_rewards`: exp_inf, log or exp_gamma),
or the sequence DCG as one float with kind="sequence_dcg". `RankGRPOTrainer` at the rank
level takes the per-rank lists; a plain TRL trainer needs kind="sequence_dcg".
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any

from rankgrpo.rewards import REWARD_KINDS, rank_relevance, rank_rewards, sequence_dcg


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))  # conversational: the assistant turn
    raise TypeError(f"completion must be a string or a list of chat messages, got "
                    f"{type(completion).__name__}")


def catalog_reward_function(catalog: Container | None, *, num_ranks: int = 20,
                            kind: str = "exp_inf", gamma: float | None = None,
                            year_tolerance: int = 2,
                            groundtruth_column: str = "groundtruth_with_release_year",
                            seen_column: str = "seen_titles") -> Callable[..., list]:
    """A TRL reward function scoring recommendation lists against a catalog.

    Args:
        catalog: a `rankgrpo.catalog.Catalog` (or any container of `(title, year)`); None
            skips the catalog check.
        num_ranks: N. kind: one of `rankgrpo.rewards.REWARD_KINDS`: "exp_inf", "log",
            "exp_gamma" (needs gamma > 1) or "sequence_dcg".
        groundtruth_column / seen_column: dataset columns holding `[[title, year], ...]` and
            the titles already mentioned, per prompt.
    Returns:
        f(prompts, completions, **columns) -> list (one entry per completion) of N floats,
        or of floats for kind="sequence_dcg". Its `__name__` is "catalog_<kind>" (TRL logs it).
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"kind must be one of {list(REWARD_KINDS)}, got {kind!r}")
    if kind == "exp_gamma" and (gamma is None or not gamma > 1):
        raise ValueError(f"kind='exp_gamma' needs gamma > 1, got {gamma!r}")
    if not (isinstance(num_ranks, int) and num_ranks >= 1):
        raise ValueError(f"num_ranks must be an int >= 1, got {num_ranks!r}")

    def reward(prompts=None, completions=None, **columns) -> list:
        if completions is None:
            raise ValueError("the catalog reward needs completions=")
        for col in (groundtruth_column, seen_column):
            if col not in columns:
                raise KeyError(f"the catalog reward needs the dataset column {col!r}; columns "
                               f"present: {sorted(k for k in columns if not k.startswith('log'))}")
        out = []
        for comp, gt, seen in zip(completions, columns[groundtruth_column],
                                  columns[seen_column], strict=True):
            rel = rank_relevance(_text(comp), gt, seen or [], catalog, num_ranks,
                                 year_tolerance=year_tolerance)
            if kind == "sequence_dcg":
                out.append(sequence_dcg(rel))
            else:
                out.append(rank_rewards(rel, kind, gamma))
        return out

    reward.__name__ = f"catalog_{kind}"
    reward.__qualname__ = reward.__name__
    return reward
