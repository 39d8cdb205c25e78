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
