"""What a recorded number must name: machine, date, commit and package versions."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = ("torch", "triton", "liger-kernel", "cut-cross-entropy", "numpy", "matplotlib",
                 "rankgrpo")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict:
    commit = _run(["git", "rev-parse", "HEAD"])
    if commit:
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        return {"commit": commit, "dirty": bool(dirty), "source": "git"}
    env = os.environ.get("RANKGRPO_COMMIT")
    if env:
        return {"commit": env, "dirty": None, "source": "RANKGRPO_COMMIT"}
    return {"commit": "unknown", "dirty": None, "source": "no .git and no RANKGRPO_COMMIT"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu() -> dict:
    props = torch.cuda.get_device_properties(0)
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return {
        "card": props.name,
        "driver": smi.splitlines()[0].strip() if smi else None,
        "cuda_runtime": torch.version.cuda,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
    }


def environment(device: torch.device) -> dict:
    import rankgrpo_kernels as rk

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": "",
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "memory_gib": _mem_total_gib(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in DISTRIBUTIONS},
        "rankgrpo_kernels": {"version": rk.__version__,
                             "path": repo_relative(Path(rk.__file__).parent),
                             "triton_available": rk.triton_available(),
                             "native_available": rk.native_available()},
        "git": git_info(),
        "argv": [repo_relative(Path(a)) if Path(a).is_absolute() else a for a in sys.argv],
    }
    if device.type == "cuda":
        info.update(_gpu())
        info["machine"] = info["card"]
    else:
        info["machine"] = f"CPU, {cores} cores ({info['cpu']})"
    return info


def machine_free(text: str) -> str:
    """`text` (a traceback, an error message) with this machine's folders replaced: the
    checkout's root dropped (paths become checkout-relative), the Python environment's package
    and standard-library folders written `<site-packages>` and `<python>`."""
    folders = {str(REPO): ""}
    paths = sysconfig.get_paths()
    for key in ("purelib", "platlib"):
        folders[paths[key]] = "<site-packages>"
    for p in site.getsitepackages() + [site.getusersitepackages()]:
        folders.setdefault(p, "<site-packages>")
    folders.setdefault(paths["stdlib"], "<python>")
    for folder in sorted(folders, key=len, reverse=True):  # the most specific first
        text = text.replace(folder + os.sep, folders[folder] + "/" if folders[folder] else "")
    return text


def repo_relative(path: Path) -> str:
    """A path inside this checkout as relative to its root, one outside it as
    `<outside-checkout>/<name>`: a recorded run names no path of the machine it ran on."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return f"<outside-checkout>/{path.name}"
