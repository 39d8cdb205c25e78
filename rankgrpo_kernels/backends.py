"""Which implementation runs each phase.

phase 1 (log-probs and their backward, a `contract.Phase1Backend`): "reference" | "torch" |
    "triton"
phase 2 (the segment stage, `segment_stage.torch_stage`'s contract): "reference" | "torch" |
    "native"

A public `backend=` (one of BACKENDS) names a whole pipeline; this module maps it to the two
phases:

| backend     | phase 1                               | phase 2                               |
|-------------|---------------------------------------|---------------------------------------|
| "reference" | reference (materialised logits)      | reference (autograd of the expression)|
| "torch"     | torch (chunked)                       | torch (closed form)                   |
| "triton"    | triton                                | torch (there is no Triton stage)      |
| "native"    | triton on CUDA, else torch            | native (C++/CUDA op library)          |
| "auto"      | triton on CUDA, else torch            | native on CUDA when its library is    |
|             |                                       | built with the CUDA kernel, else torch|
"""

from __future__ import annotations

import importlib

import torch

from .contract import BACKENDS, Phase1Backend

__all__ = ["BACKENDS", "native_available", "native_cuda_available", "phase1_module",
           "phase1_name", "phase2_name", "resolve", "triton_available"]


def triton_available() -> bool:
    """Triton kernels importable (and a CUDA device or the interpreter to run them)."""
    try:
        importlib.import_module("rankgrpo_kernels.logprobs_triton")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def native_available() -> bool:
    """The native op library is built and loads (its CPU kernel at least)."""
    try:
        native = importlib.import_module("rankgrpo_kernels.native")
    except Exception:  # noqa: BLE001
        return False
    return bool(native.available())


def native_cuda_available() -> bool:
    """The native op library loads and holds its CUDA kernel (parity-tested on an H200)."""
    if not native_available():
        return False
    return bool(importlib.import_module("rankgrpo_kernels.native").cuda_compiled())


def resolve(backend: str, device: torch.device) -> str:
    """Check `backend` and map "auto" to the phase-1 pipeline for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def phase1_name(backend: str, device: torch.device) -> str:
    """"reference" | "torch" | "triton": who computes the log-probs."""
    name = resolve(backend, device)
    if name == "native":  # native replaces phase 2 only
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    return name


def phase1_module(backend: str, device: torch.device) -> Phase1Backend | None:
    """The module with forward/backward for phase 1, or None for the reference (autograd)."""
    name = phase1_name(backend, device)
    if name == "reference":
        return None
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton) "
                               "and a CUDA device, or TRITON_INTERPRET=1 for CPU tensors")
        return importlib.import_module("rankgrpo_kernels.logprobs_triton")
    return importlib.import_module("rankgrpo_kernels.logprobs_torch")


def phase2_name(backend: str, device: torch.device) -> str:
    """"reference" | "torch" | "native": who runs the segment stage."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    if backend == "auto":
        return "native" if device.type == "cuda" and native_cuda_available() else "torch"
    if backend == "native" and not native_available():
        raise RuntimeError(
            "backend='native' needs the optional C++/CUDA op library: build it with "
            "`cmake -S . -B build && cmake --build build` and set RANKGRPO_NATIVE_LIB to the "
            "built library (see README)")
    return "torch" if backend == "triton" else backend
