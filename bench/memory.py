"""Peak memory of one call, beyond what was allocated before it.

CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus
`memory_allocated()` at the start. This counts live tensor bytes (what the algorithm holds),
not the caching allocator's reserve.

CPU: torch's CPU allocator is glibc malloc, which tracemalloc does not see, and torch has no
CPU peak counter. We use the kernel's own count: write "5" to /proc/self/clear_refs, which
resets the process's peak resident set (VmHWM) to its current resident set, run the call,
and read VmHWM from /proc/self/status; the growth over VmRSS at the start is the peak memory
the call touched. This sees every allocation (torch, BLAS workspaces, Python) and nothing that
was never written. Caveat: memory that malloc keeps after a free is reused without growing the
resident set, so a process that ran a large call before would under-count the next; the `cpu`
suite measures each contender in a fresh process with glibc's mmap threshold pinned
(MALLOC_MMAP_THRESHOLD_), so every large block is its own mapping, returned to the OS on free,
and the resident set follows live memory. Without clear_refs (not Linux, or not permitted),
the fallback is the growth of getrusage's ru_maxrss, which cannot be reset and is then only a
lower bound; the method used is reported with the number.
"""

from __future__ import annotations

import resource

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class CudaPeak:
    method = "torch.cuda.max_memory_allocated - memory_allocated before the call"

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def stop(self) -> int:
        return torch.cuda.max_memory_allocated() - self.base


class CpuPeak:
    def __init__(self):
        self.method = "VmHWM growth (clear_refs reset)"

    def start(self) -> None:
        self.hwm = _reset_hwm()
        if not self.hwm:
            self.method = "ru_maxrss growth (lower bound: peak could not be reset)"
        self.base = rss_bytes() or 0
        self.maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int | None:
        if self.hwm:
            return _status_kib("VmHWM") * 1024 - self.base
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, after - max(self.maxrss, self.base))


def tracker(device: torch.device):
    return CudaPeak() if device.type == "cuda" else CpuPeak()


MMAP_THRESHOLD = 128 * 1024  # bytes; blocks at least this large get their own mapping
_M_MMAP_THRESHOLD = -3       # glibc mallopt parameter number (malloc.h)


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold in this process (what MALLOC_MMAP_THRESHOLD_ does for a new
    one): every block of `threshold` bytes or more is its own mapping, returned to the OS when
    freed, so the resident set follows live memory for large tensors. Without it glibc raises
    the threshold after the first large free and later tensors reuse freed heap pages that the
    VmHWM method cannot see (the cause of negative "peak" numbers in in-process CPU runs).
    Returns False where this is not glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1)
    except (OSError, AttributeError):
        return False


def beyond_outputs(raw: int | None, out_bytes: int) -> tuple[int | None, str | None]:
    """Peak memory beyond the call's own outputs: (bytes, None), or (None, why) when the
    measured growth is smaller than the outputs themselves. That happens only on CPU, where
    outputs below the mmap threshold are carved from heap pages freed earlier in the process
    and the resident set does not grow: the method did not resolve the call, and a number
    (negative, or a clamp at 0) would be an invention."""
    if raw is None:
        return None, "no peak measurement on this device"
    if raw < out_bytes:
        return None, (f"below resolution: peak growth {raw} B < the call's own outputs "
                      f"{out_bytes} B (reused heap pages are invisible to VmHWM)")
    return raw - out_bytes, None
