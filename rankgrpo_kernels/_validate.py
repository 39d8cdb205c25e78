"""Argument checks shared by the public functions.

Every error names the argument, what it got and what was expected, so a caller inside a
large trainer can find the bad tensor without a debugger.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: object, *, dtypes=None, ndims=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {x.dtype}, expected one of: {want}")
    if ndims is not None and x.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, got shape "
                         f"{tuple(x.shape)}")
    return x


def check_finite(name: str, x: torch.Tensor | None, where: torch.Tensor | None = None) -> None:
    """NaN/inf in an input poisons the whole loss; say which input carried it.

    `where` restricts the check to positions that are used (e.g. masked tokens), so padding
    may hold anything. Costs one host sync; callers skip it with validate=False.
    """
    if x is None:
        return
    bad = ~torch.isfinite(x)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} contains NaN or inf (first at index {idx})")


def check_same_shape(name: str, x: torch.Tensor | None, ref_name: str, ref: torch.Tensor) -> None:
    if x is not None and tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} "
                         f"(the shape of {ref_name})")


def check_nonneg(name: str, value: float | None) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {sorted(choices)}")
