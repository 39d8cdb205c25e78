"""Support tables shared by the TRL and verl integrations.

Every loss-relevant option of the host library is one row: either the kernel keyword it maps
to, or the reason it is refused. Adding a loss variant to `rankgrpo_kernels` later is then a
change of one row (plus the keyword it passes), and the tests read these tables, so a row that
turns supported turns its test from "raises the named error" into a parity check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class UnsupportedOptionError(ValueError):
    """A host-library option (or value) that the fused kernels do not implement yet."""


@dataclass(frozen=True)
class Option:
    """One loss-relevant option of the host library.

    name: the option's name in the host library's config.
    meaning: what it does there (one line, our words).
    kernel: the `rankgrpo_kernels` keyword (or mechanism) it maps to, when supported.
    unsupported: why it is refused (None when supported); `active(cfg)` says when the refusal
        applies (e.g. only when beta != 0).
    raises: False for a row that documents a gap without an error of its own (another
        library's loss we do not replace, a numerical guard we do not apply).
    """

    name: str
    meaning: str
    kernel: str | None = None
    unsupported: str | None = None
    active: Callable[[Any], bool] | None = None
    raises: bool = True

    @property
    def supported(self) -> bool:
        return self.unsupported is None

    def check(self, cfg: Any) -> None:
        """Raise UnsupportedOptionError naming the option when it is set to what we refuse."""
        if (self.unsupported is not None and self.raises
                and (self.active is None or self.active(cfg))):
            raise UnsupportedOptionError(f"{self.name}: {self.unsupported}")


def check_all(options: tuple[Option, ...], cfg: Any) -> None:
    """Check every row; the first refused option raises."""
    for opt in options:
        opt.check(cfg)


def table_markdown(options: tuple[Option, ...]) -> str:
    """The table as Markdown rows (name | meaning | status), for docs/integrations.md."""
    lines = ["| option | meaning | status |", "|---|---|---|"]
    for o in options:
        if o.supported:
            status = f"supported: `{o.kernel}`"
        else:
            status = ("error: " if o.raises else "not in rankgrpo (no error): ") + o.unsupported
        lines.append(f"| `{o.name}` | {o.meaning} | {status} |")
    return "\n".join(lines)
