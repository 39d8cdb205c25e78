"""The benchmark suite must never rot: run `smoke` in-process on CPU (seconds) and check that
every contender is reported (measured or skipped with a reason) and every output is written."""

from __future__ import annotations

import json
import os
import subprocess
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
        assert cfg["cells"]["liger-triton-token"]["status"] == "skipped"  # Triton kernel
        compiled = cfg["cells"]["compile-chunked+seg"]
        assert compiled["status"] == "skipped" and "--compile-cpu" in compiled["reason"]
        for name, cell in cfg["cells"].items():  # never a negative peak: a number or None
            for phase in ("step", "logp"):
                peak = (cell.get(phase) or {}).get("peak_extra_bytes")
                assert peak is None or peak >= 0, (name, phase, peak)
                if peak is None and cell.get(phase, {}).get("status", "ok") == "ok" \
                        and cell["status"] == "ok":
                    assert cell[phase].get("memory_note"), (name, phase)
        assert cfg["matmul"]["tflops"] > 0
        seg = cfg["segment"]["rows"]
        assert seg["torch"]["status"] == "ok" and seg["reference"]["status"] == "ok"


def test_smoke_trl_chunked_runs_on_cpu(smoke):
    pytest.importorskip("trl.kernels.chunked_logprob")
    res, _ = smoke
    for cfg in res["configs"]:
        cell = cfg["cells"]["trl-chunked+seg"]
        assert cell["status"] == "ok", cell
        assert cell["step"]["total_ms"]["median"] > 0


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


def test_no_matplotlib_writes_tables_and_says_so(tmp_path):
    """Without matplotlib the run still writes results.json and table.md, draws no PNG, says
    so in the log and in table.md, and exits 0 (it used to crash after the whole run)."""
    code = ("import sys; sys.modules['matplotlib'] = None; from bench.__main__ import main; "
            f"sys.exit(0 if main(['--suite', 'smoke', '--contenders', 'torch', '--tokens', "
            f"'128', '--out', {str(tmp_path)!r}]) else 1)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "results.json").stat().st_size > 0
    assert not list(tmp_path.glob("*.png"))
    assert "plots skipped: matplotlib is not installed" in proc.stdout
    assert "plots skipped" in (tmp_path / "table.md").read_text()
    assert "(no plots)" in proc.stdout


def test_results_never_record_an_absolute_path(tmp_path):
    res = {"suite": "smoke", "env": {"argv": ["bench/__main__.py", "--out", "/srv/x/out"]}}
    with pytest.raises(ValueError, match=r"results\.env\.argv\[2\].*absolute path"):
        report.check_no_absolute_paths(res)
    with pytest.raises(ValueError, match="absolute path"):
        report.write({**res, "settings": {"targets": False}, "configs": []}, tmp_path,
                     plots=False)
    assert not (tmp_path / "results.json").exists()  # refused before anything was written
    # Not paths: prose, commands and URLs with slashes pass.
    report.check_no_absolute_paths({"note": "fp32 / bf16", "reason": "see /proc/self/status",
                                    "url": "https://example.org/a"})
    from bench.env import repo_relative
    assert repo_relative(REPO / "bench" / "runner.py") == "bench/runner.py"
    assert repo_relative(Path("/somewhere/else/out")) == "<outside-checkout>/out"


def test_failure_tracebacks_name_no_folder_of_this_machine():
    import torch

    def fails_in_torch():
        torch.ones(2, requires_grad=True).backward()  # raises inside torch's Python code

    try:
        fails_in_torch()
    except RuntimeError as err:
        cell = runner.failure(err)
    tb = cell["traceback"]
    assert 'File "tests/test_bench_smoke.py"' in tb, tb      # checkout-relative
    assert 'File "<site-packages>/torch/' in tb, tb          # the environment, unnamed
    assert str(REPO) not in tb and 'File "/' not in tb, tb


def _tracebacks(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "traceback" and isinstance(v, str):
                yield v
            else:
                yield from _tracebacks(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _tracebacks(v)


def test_recorded_runs_name_no_absolute_path():
    """Every committed results.json (their path fields were made checkout-relative), the
    frames of its failure tracebacks included."""
    runs = sorted((REPO / "bench" / "results").glob("*/results.json"))
    assert runs
    for path in runs:
        res = json.loads(path.read_text())
        report.check_no_absolute_paths(res, str(path.parent.name))
        for tb in _tracebacks(res):
            assert 'File "/' not in tb, (path.parent.name, tb[:300])


def test_memory_beyond_outputs_is_never_negative():
    from bench.memory import beyond_outputs
    assert beyond_outputs(5000, 1000) == (4000, None)
    extra, note = beyond_outputs(0, 4096)
    assert extra is None and "below resolution" in note
    assert beyond_outputs(None, 10)[0] is None


def test_configured_contender_applies_its_setting_in_the_backward_too():
    import torch

    from bench import contenders as C
    from rankgrpo_kernels import triton_config

    lean = C.make("triton-lean")
    seen = []
    x = torch.ones(3, requires_grad=True)
    x.register_hook(lambda g: seen.append(
        triton_config.select(torch.bfloat16, 64, 1024, interpret=False).dhidden))
    lean.backward(x.sum())
    assert seen == ["recompute"]  # the Triton backward reads its config at backward time
    assert triton_config.select(torch.bfloat16, 64, 1024, interpret=False).dhidden == "accumulate"
    # its no-grad pass is triton's own unless the spec changes the forward
    assert not lean.has_logp() and "backward only" in lean.logp_same_as
    assert C.Configured("x", "v_split=4096").has_logp()
