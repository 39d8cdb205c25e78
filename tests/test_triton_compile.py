"""Every Triton phase-1 kernel compiles for sm_90 and sm_80 without a GPU, without spills.

Runs `python -m tools.compile_report --json` once in a subprocess (the kernels must
be real @triton.jit functions, not the interpreter's) and checks its results; `pytest -s`
prints the table (registers, spill bytes, shared memory per kernel and configuration).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env.pop("RANKGRPO_TRITON_CONFIG", None)  # the default configurations
    proc = subprocess.run(
        [sys.executable, "-m", "tools.compile_report", "--json", "--jobs", "2"],
        env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"compile_report printed nothing:\n{proc.stderr[-3000:]}"
    from tools.compile_report import Result, _row
    print()
    for r in rows:
        print(_row(Result(**{k: v for k, v in r.items() if k != "ok"})))
    return rows


def test_every_kernel_compiles(report):
    kernels = {r["kernel"] for r in report}
    assert kernels == {"lse_partial_kernel", "lse_combine_kernel", "dlogits_kernel",
                       "dweight_kernel", "dhidden_kernel"}
    assert {r["arch"] for r in report} == {80, 90}
    bad = [f"sm{r['arch']} {r['dtype']} {r['kernel']} {r['variant']}: {r['error']}"
           for r in report if not r["ok"]]
    assert not bad, "\n".join(bad)


def test_no_spills_and_shared_memory_fits(report):
    spills = [f"sm{r['arch']} {r['dtype']} {r['kernel']} {r['variant']} {r['config']}: "
              f"{r['spill_stores']}/{r['spill_loads']} bytes"
              for r in report if r["spill_stores"] != 0 or r["spill_loads"] != 0]
    assert not spills, "spilling kernels:\n" + "\n".join(spills)
    for r in report:
        assert 0 < r["registers"] <= 255
        assert 0 <= r["shared"] <= (232448 if r["arch"] == 90 else 166912)
