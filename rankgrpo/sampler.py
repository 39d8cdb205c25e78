"""A resumable, seeded order over a dataset: epoch e is a fixed permutation (seed + e), and
the position (epoch, index) is part of every checkpoint, so a resumed run sees exactly the
examples an uninterrupted run would have seen."""

from __future__ import annotations

import torch


class EpochSampler:
    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise ValueError("EpochSampler needs at least one example")
        self.size, self.seed, self.shuffle = size, int(seed), shuffle
        self.epoch, self.index = 0, 0
        self._perm: list[int] | None = None

    def _order(self) -> list[int]:
        if self._perm is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._perm = torch.randperm(self.size, generator=g).tolist()
            else:
                self._perm = list(range(self.size))
        return self._perm

    def take(self, n: int) -> list[int]:
        """The next n indices, crossing into the next epoch when this one runs out."""
        out: list[int] = []
        while len(out) < n:
            order = self._order()
            k = min(n - len(out), self.size - self.index)
            out += order[self.index:self.index + k]
            self.index += k
            if self.index == self.size:
                self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        return out

    @property
    def progress(self) -> float:
        """Epochs consumed, fractional."""
        return self.epoch + self.index / self.size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"checkpoint was taken on {state['size']} examples; this run has "
                             f"{self.size} (the data changed, so it cannot resume exactly)")
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        self._perm = None
