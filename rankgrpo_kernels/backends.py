"""Which implementation runs each phase.

phase 1 (log-probs and their backward): "reference" | "torch" | "triton"
phase 2 (the segment stage):            "reference" | "torch" | "triton" | "native"
A public `backend=` names a whole pipeline; this module maps it to the two phases.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "native")


def triton_available() -> bool:
    """Triton kernels importable (and a CUDA device or the interpreter to run them)."""
    try:
        importlib.import_module("rankgrpo_kernels.logprobs_triton")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def native_available() -> bool:
    try:
        native = importlib.import_module("rankgrpo_kernels.native")
    except Exception:  # noqa: BLE001
        return False
    return bool(native.available())


def resolve(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def phase1_module(backend: str, device: torch.device) -> ModuleType | None:
    """The module with forward/backward for phase 1, or None for the reference (autograd)."""
    name = resolve(backend, device)
    if name == "reference":
        return None
    if name == "native":  # native replaces phase 2 only
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton) "
                               "and a CUDA device, or TRITON_INTERPRET=1 for CPU tensors")
        return importlib.import_module("rankgrpo_kernels.logprobs_triton")
    return importlib.import_module("rankgrpo_kernels.logprobs_torch")


def phase2_name(backend: str, device: torch.device) -> str:
    name = resolve(backend, device)
    if name == "native" and not native_available():
        raise RuntimeError(
            "backend='native' needs the optional C++/CUDA op library: build it with "
            "`cmake -S . -B build && cmake --build build` and set RANKGRPO_NATIVE_LIB to the "
            "built library (see README)")
    if name == "triton":
        try:
            importlib.import_module("rankgrpo_kernels.segment_triton")
        except Exception:  # noqa: BLE001 - no Triton segment kernel: the torch stage serves
            return "torch"
    return name
