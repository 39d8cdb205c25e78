"""The benchmark suite must never rot: run `smoke` in-process on CPU (seconds) and check that
every contender is reported (measured or skipped with a reason) and every output is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import report, runner  # noqa: E402
from bench.flops import model_flops  # noqa: E402
from bench.suites import SUITES, customise, parse_shapes  # noqa: E402
from bench.timing import summarize  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_smoke")
    res = runner.run(SUITES["smoke"], out, log=lambda *a: None)
    return res, out


def test_smoke_writes_every_output(smoke):
    res, out = smoke
    for name in ("results.json", "table.md", "time_vs_T.png", "memory_vs_T.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["suite"] == "smoke"
    env = on_disk["env"]
    for key in ("date", "machine", "git", "versions"):
        assert env[key], key
    assert env["versions"]["torch"]


def test_smoke_reports_every_contender(smoke):
    res, _ = smoke
    suite = SUITES["smoke"]
    assert [c["tokens"] for c in res["configs"]] == sorted(suite.tokens)
    for cfg in res["configs"]:
        assert list(cfg["cells"]) == list(suite.contenders)  # none silently dropped
        for name, cell in cfg["cells"].items():
            assert cell["status"] in ("ok", "skipped"), (name, cell)
            if cell["status"] == "skipped":
                assert cell["reason"], name
        # the CPU-capable ones really ran
        for name in ("torch", "reference"):
            step = cfg["cells"][name]["step"]
            assert step["total_ms"]["median"] > 0
            assert step["tflops"] > 0
            assert cfg["cells"][name]["logp"]["total_ms"]["median"] > 0
        assert cfg["cells"]["triton"]["status"] == "skipped"  # no CUDA here
        assert cfg["matmul"]["tflops"] > 0
        seg = cfg["segment"]["rows"]
        assert seg["torch"]["status"] == "ok" and seg["reference"]["status"] == "ok"


def test_smoke_liger_runs_on_cpu(smoke):
    pytest.importorskip("liger_kernel")
    res, _ = smoke
    for cfg in res["configs"]:
        assert cfg["cells"]["liger-token"]["status"] == "ok"
        assert cfg["cells"]["liger-seq"]["status"] == "ok"


def test_tables_render(smoke):
    res, out = smoke
    table = (out / "table.md").read_text()
    assert "| torch | rank |" in table and "skipped" in table
    short = report.short_table(res)
    assert "reference" in short.splitlines()[2] or "reference" in short


def test_helpers():
    f = model_flops(8192, 896, 151936)
    assert f["step"] == 4 * f["logp"] == 8.0 * 8192 * 896 * 151936
    s = summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["n"] == 5
    assert parse_shapes("qwen2.5-7b,64x1000") == ("qwen2.5-7b", "64x1000")
    with pytest.raises(ValueError, match="unknown shape"):
        parse_shapes("gpt-9")
    assert customise(SUITES["smoke"], tokens=(64,), budget_s=None).tokens == (64,)
