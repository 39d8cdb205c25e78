"""Why the accelerate FSDP config (rankgrpo/configs/accelerate-fsdp.yaml) has no CPU test.

The DDP path runs on 2 CPU processes over gloo (tests/test_trainer_invariance.py). FSDP
cannot, with this torch and accelerate, for three independent reasons, each pinned here so
that the day one of them goes away this test fails and a real 2-process FSDP test (gradients
equal to one process's, a sharded checkpoint resuming exactly) replaces it:

1. `FullyShardedDataParallelPlugin` with the config's `fsdp_sync_module_states: true`
   raises at construction: "There are currently no available devices found".
2. torch's FSDP1 (the config's `fsdp_version: 1`) refuses CPU: "FSDP needs a non-CPU
   accelerator device" (even on a gloo process group).
3. accelerate switches to FSDP only for accelerator device types (MULTI_GPU, NPU, XPU, ...):
   with `ACCELERATE_USE_FSDP=true` on CPU it silently makes a MULTI_CPU (DDP) Accelerator
   (accelerate/state.py); this one is recorded in the report, as it needs 2 processes.
(torch's FSDP2 `fully_shard` does run on gloo, but the config and accelerate's CPU path do
not reach it.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import os, sys, yaml, torch
cfg = yaml.safe_load(open(sys.argv[1]))["fsdp_config"]
assert cfg["fsdp_version"] == 1 and cfg["fsdp_sync_module_states"] is True
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
from accelerate.utils import FullyShardedDataParallelPlugin
try:
    FullyShardedDataParallelPlugin(sync_module_states=True)
    print("plugin: ok")
except RuntimeError as e:
    print("plugin:", e)
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
try:
    FSDP(torch.nn.Linear(4, 4), use_orig_params=True)
    print("fsdp1: ok")
except RuntimeError as e:
    print("fsdp1:", e)
torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_config_cannot_run_on_cpu_and_why():
    cfg_path = ROOT / "rankgrpo" / "configs" / "accelerate-fsdp.yaml"
    assert yaml.safe_load(cfg_path.read_text())["distributed_type"] == "FSDP"
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is visible: these CPU limits do not apply")
    r = subprocess.run([sys.executable, "-c", PROBE, str(cfg_path), str(_free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(x.split(": ", 1) for x in r.stdout.splitlines() if ": " in x)
    assert "no available devices" in lines["plugin"], r.stdout
    assert "needs a non-CPU accelerator device" in lines["fsdp1"], r.stdout
