"""The optional C++/CUDA op library: phase 2 (the segment stage) for backend="native".

Build it from the repository root, with the Python that has torch on PATH (or
`-DPYTHON_EXECUTABLE=...`):

    cmake -S . -B build && cmake --build build      # -> build/librankgrpo_native.so

The library is looked up in this order:
  1. the environment variable RANKGRPO_NATIVE_LIB (a path to the built .so);
  2. build/librankgrpo_native.so beside the rankgrpo_kernels/ folder (a source checkout).
It registers `torch.ops.rankgrpo.segment_stage`, with a CPU (C++) kernel always and a CUDA
kernel when it was built with one (`cuda_compiled()`). Nothing else in the package needs it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .segment_stage import ClipParams

ENV_VAR = "RANKGRPO_NATIVE_LIB"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "build" / "librankgrpo_native.so"
BUILD_HINT = ("build it with `cmake -S . -B build && cmake --build build` in the repository "
              f"root and set {ENV_VAR} to the built library (default: {DEFAULT_PATH})")

_state: dict = {}


def library_path() -> Path:
    """Where the library is looked for: $RANKGRPO_NATIVE_LIB, else the default build path."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_PATH


def _load() -> bool:
    if "ok" in _state:
        return _state["ok"]
    path = library_path()
    ok, error = False, None
    if hasattr(torch.ops, "rankgrpo") and hasattr(torch.ops.rankgrpo, "segment_stage"):
        ok = True  # already registered (loaded by the caller or an earlier import)
    elif not path.is_file():
        error = f"{path} does not exist"
    else:
        try:
            torch.ops.load_library(str(path))
            ok = hasattr(torch.ops.rankgrpo, "segment_stage")
            error = None if ok else f"{path} does not register rankgrpo::segment_stage"
        except (OSError, RuntimeError) as exc:  # wrong torch ABI, missing symbols, ...
            error = f"loading {path} failed: {exc}"
    _state.update(ok=ok, error=error)
    return ok


def available() -> bool:
    """True when the op library is built and loads (it is loaded on the first call)."""
    return _load()


def load_error() -> str | None:
    """Why `available()` is False (None when it is True)."""
    _load()
    return _state["error"]


def cuda_compiled() -> bool:
    """True when the loaded library holds the CUDA kernel."""
    return available() and bool(torch.ops.rankgrpo.cuda_compiled())


def segment_stage(logp, old_logp, ref_logp, adv, key, num_keys, c, mask, params: ClipParams):
    """`segment_stage.torch_stage`'s contract in the native library: (loss, g, stats).

    [B, T] inputs; float32 or float64 (all floating inputs are cast to logp's dtype).
    """
    if not available():
        raise RuntimeError(f"the native op library is not available ({load_error()}): "
                           f"{BUILD_HINT}")
    if logp.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"native segment stage takes float32 or float64, got {logp.dtype}")
    dtype = logp.dtype

    def prep(x):
        return None if x is None else x.detach().to(dtype).contiguous()

    args = (prep(logp), prep(old_logp), prep(ref_logp), prep(adv),
            key.detach().long().contiguous(), int(num_keys), prep(c),
            mask.detach().bool().contiguous())
    delta = math.inf if params.delta is None else float(params.delta)
    scalars = (float(params.epsilon_low), float(params.epsilon_high), delta, float(params.beta))
    if logp.device.type == "cuda":
        if not cuda_compiled():
            raise RuntimeError("the native op library was built without its CUDA kernel: "
                               "rebuild on a machine with nvcc and a CUDA torch "
                               "(cmake -DRANKGRPO_CUDA=ON ...)")
        with torch.cuda.device(logp.device):
            stream = torch.cuda.current_stream(logp.device).cuda_stream
            return torch.ops.rankgrpo.segment_stage(*args, *scalars, stream)
    return torch.ops.rankgrpo.segment_stage(*args, *scalars, 0)
