"""bench.accuracy: errors against float64 are measured, not assumed (CPU, small shapes)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import accuracy as A
from bench import contenders as C
from bench.inputs import make_inputs


def _inputs(dtype, seed):
    return make_inputs(256, 128, 4099, dtype=dtype, device="cpu", completion_len=128,
                       num_ranks=20, seed=seed)


def test_float32_contenders_sit_at_float32_rounding(rng):
    seed = int(torch.randint(0, 2**30, (1,), generator=rng))
    inp = _inputs(torch.float32, seed)
    oracle = A.Float64Oracle(inp)
    for name in ("torch", "reference"):
        cell = A.measure_contender(C.make(name), inp, oracle, torch.device("cpu"))
        assert cell["status"] == "ok", cell
        assert cell["loss_abs_err"] < 1e-5, (name, cell)
        for k in ("dhidden_rel_err", "dweight_rel_err"):
            assert cell[k] < 1e-4, (name, k, cell)
        assert cell["logp_max_err"] < 1e-4, (name, cell)


class _Off(C.Ours):
    """The torch backend with its loss and logits shifted: the measure must see it."""

    def loss(self, inp):
        return super().loss(inp) * 1.01 + 0.02

    def logp(self, inp):
        return super().logp(inp) + 0.03


def test_a_wrong_contender_is_reported_wrong(rng):
    seed = int(torch.randint(0, 2**30, (1,), generator=rng))
    inp = _inputs(torch.float32, seed)
    oracle = A.Float64Oracle(inp)
    cell = A.measure_contender(_Off("off", "torch"), inp, oracle, torch.device("cpu"))
    assert cell["status"] == "ok"
    shift = abs(0.01 * cell["loss_float64"] + 0.02)  # what loss * 1.01 + 0.02 moves it by
    assert cell["loss_abs_err"] == pytest.approx(shift, rel=1e-3, abs=1e-6)
    assert cell["logp_max_err"] == pytest.approx(0.03, rel=1e-3)
    assert cell["dhidden_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert cell["dweight_rel_err"] == pytest.approx(0.01, rel=1e-3)


def test_bfloat16_logits_cost_accuracy(rng):
    """Rounding the logits to bf16 (what a 16-bit logits tensor does) moves the log-probs by
    ~1e-2; the torch backend keeps fp32 logits and stays near fp32 rounding."""
    seed = int(torch.randint(0, 2**30, (1,), generator=rng))
    inp = _inputs(torch.bfloat16, seed)
    oracle = A.Float64Oracle(inp)

    class Bf16Logits(C.LogpThenSegment):
        name = "bf16-logits"

        def _logp(self, inp):
            z = (inp.hidden @ inp.weight.t())  # bf16 out
            return torch.log_softmax(z.float(), -1).gather(-1, inp.targets[..., None])[..., 0]

    ours = A.measure_contender(C.make("torch"), inp, oracle, torch.device("cpu"))
    rounded = A.measure_contender(Bf16Logits(), inp, oracle, torch.device("cpu"))
    assert ours["logp_max_err"] < 1e-4, ours
    assert rounded["logp_max_err"] > 10 * ours["logp_max_err"], (ours, rounded)


def test_cli_writes_json_and_refuses_bad_arguments(tmp_path, capsys):
    rc = A.main(["--device", "cpu", "--dtype", "float32", "--shape", "small", "--tokens", "128",
                 "--completion-len", "64", "--contenders", "torch,reference",
                 "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(res["cells"]) == {"torch", "reference"}
    assert res["cells"]["torch"]["status"] == "ok"
    assert A.main(["--tokens", "100", "--completion-len", "64", "--shape", "small"]) == 2
    assert "--tokens 100" in capsys.readouterr().err
    assert A.main(["--contenders", "nope", "--shape", "small"]) == 2
