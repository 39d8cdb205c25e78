"""`python -m bench.accuracy`: how far each contender is from float64 on the same inputs.

Speed alone does not rank losses that round differently: a peer that computes the logits in
the model's 16-bit dtype is faster and less exact. This measures, for every contender that can
run here, on one input set in the given dtype:

    loss      |loss - loss64|
    dhidden   ||g - g64|| / ||g64|| (Frobenius) and max|g - g64| / max|g64|
    dW        the same
    logp      max and mean |logp - logp64| over the loss tokens (the no-grad pass, where the
              contender has one of its own)

The float64 side is `backend="reference"` on the same tensors upcast to float64, at the
contender's level (rank, token or sequence), so rounding of the inputs themselves is not
counted. Results go to stdout and, with --out, to accuracy.json; like every bench number they
are claims of this command's output, never of a test.

    python -m bench.accuracy [--device cpu|cuda] [--dtype bfloat16] [--shape qwen2.5-0.5b]
                             [--tokens 512] [--completion-len 256] [--contenders a,b]
                             [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

import rankgrpo_kernels as rk

from . import contenders as C
from .env import environment, machine_free
from .inputs import Inputs, make_inputs
from .report import check_no_absolute_paths
from .suites import ALL_CONTENDERS, SHAPES, parse_contenders, parse_shapes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_float64(inp: Inputs) -> Inputs:
    """The same input set in float64 (fresh leaves; integer tensors shared)."""
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().requires_grad_(True)

    return dataclasses.replace(
        inp, hidden=leaf(inp.hidden), weight=leaf(inp.weight),
        old_logp=inp.old_logp.double(), adv_rank=inp.adv_rank.double(),
        adv_row=inp.adv_row.double())


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(Frobenius relative error, max-abs error relative to max |b|) of a against b."""
    d = a.double() - b
    nb = float(b.norm())
    mb = float(b.abs().max()) if b.numel() else 0.0
    return (float(d.norm()) / nb if nb else float(d.norm()),
            float(d.abs().max()) / mb if mb else float(d.abs().max()))


def _first(x):
    return x[0] if isinstance(x, tuple | list) else x


class Float64Oracle:
    """backend="reference" in float64 per level, computed once per level."""

    def __init__(self, inp: Inputs):
        self.inp64 = as_float64(inp)
        self._by_level: dict[str, tuple[float, torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            self.logp = rk.linear_logprobs(self.inp64.hidden, self.inp64.weight,
                                           self.inp64.targets, backend="reference",
                                           validate=False)

    def at(self, level: str) -> tuple[float, torch.Tensor, torch.Tensor]:
        if level not in self._by_level:
            ref = C.Ours(f"float64-{level}", "reference", level)
            self.inp64.clear_grads()
            loss = ref.loss(self.inp64)
            loss.backward()
            self._by_level[level] = (float(loss.detach()), self.inp64.hidden.grad.clone(),
                                     self.inp64.weight.grad.clone())
            self.inp64.clear_grads()
        return self._by_level[level]


def measure_contender(contender: C.Contender, inp: Inputs, oracle: Float64Oracle,
                      device: torch.device) -> dict:
    """One contender's errors against the float64 oracle (status "skipped"/"error" + reason
    where it cannot run)."""
    out: dict = {"level": contender.level, "note": contender.note}
    why = contender.skip_reason(device)
    if why:
        return {**out, "status": "skipped", "reason": why}
    try:
        loss64, dh64, dw64 = oracle.at(contender.level)
        inp.clear_grads()
        loss = contender.loss(inp)
        contender.backward(loss)
        if inp.hidden.grad is None or inp.weight.grad is None:
            return {**out, "status": "error",
                    "reason": "the backward left dhidden or dW empty"}
        out["loss"] = float(loss.detach())
        out["loss_float64"] = loss64
        out["loss_abs_err"] = abs(out["loss"] - loss64)
        if float(dh64.norm()) == 0.0 and float(dw64.norm()) == 0.0:
            # e.g. sequence level on few rows: every sequence ratio clipped. A gradient error
            # against 0 would rank nothing, so it is reported as such.
            out["gradient_note"] = "the float64 gradient is exactly 0 (every term clipped)"
            out["gradient_abs_max"] = max(float(inp.hidden.grad.abs().max()),
                                          float(inp.weight.grad.abs().max()))
        else:
            out["dhidden_rel_err"], out["dhidden_max_err"] = _rel(inp.hidden.grad, dh64)
            out["dweight_rel_err"], out["dweight_max_err"] = _rel(inp.weight.grad, dw64)
        inp.clear_grads()
        if contender.has_logp():
            lp = _first(contender.logp(inp))
            if lp is not None and lp.numel() == inp.targets.numel():
                d = (lp.reshape(inp.targets.shape).double() - oracle.logp)[inp.mask].abs()
                out["logp_max_err"] = float(d.max())
                out["logp_mean_err"] = float(d.mean())
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - a failing peer is a result, not a crash
        out.update(status="error", reason=machine_free(f"{type(err).__name__}: {str(err)[:300]}"))
    finally:
        inp.clear_grads()
    return out


def run(names: tuple[str, ...], *, device: torch.device, dtype: torch.dtype, shape: str,
        tokens: int, completion_len: int, seed: int) -> dict:
    hidden, vocab = SHAPES[shape].hidden, SHAPES[shape].vocab
    inp = make_inputs(tokens, hidden, vocab, dtype=dtype, device=device,
                      completion_len=completion_len, num_ranks=20, seed=seed)
    oracle = Float64Oracle(inp)
    cells = {}
    for name in names:
        t0 = time.perf_counter()
        contender = C.make(name)
        cells[name] = measure_contender(contender, inp, oracle, device)
        cells[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(format_row(name, cells[name]), flush=True)
    return {"shape": shape, "hidden": hidden, "vocab": vocab, "tokens": tokens,
            "completion_len": completion_len, "dtype": str(dtype).removeprefix("torch."),
            "device": device.type, "seed": seed, "cells": cells}


HEADER = (f"{'contender':20} {'loss err':>9} {'dh rel':>9} {'dh max':>9} {'dW rel':>9} "
          f"{'dW max':>9} {'logp max':>9} {'logp mean':>9}  status")


def _e(x) -> str:
    return f"{x:9.2e}" if isinstance(x, float) and math.isfinite(x) else f"{'-':>9}"


def format_row(name: str, cell: dict) -> str:
    if cell["status"] != "ok":
        return f"{name:20} {'':>9} {'':>9} {'':>9} {'':>9} {'':>9} {'':>9} {'':>9}  " \
               f"{cell['status']}: {cell.get('reason', '')[:90]}"
    keys = ("loss_abs_err", "dhidden_rel_err", "dhidden_max_err", "dweight_rel_err",
            "dweight_max_err", "logp_max_err", "logp_mean_err")
    note = f" ({cell['gradient_note']}; |g| <= {cell['gradient_abs_max']:.1e} here)" \
        if "gradient_note" in cell else ""
    return f"{name:20} " + " ".join(_e(cell.get(k)) for k in keys) + "  ok" + note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split(
        "\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--shape", default="qwen2.5-0.5b", help="a bench shape name or HxV")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--completion-len", type=int, default=256)
    p.add_argument("--contenders", default=",".join(ALL_CONTENDERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for accuracy.json (created)")
    a = p.parse_args(argv)
    try:
        (shape,) = parse_shapes(a.shape)
        names = parse_contenders(a.contenders)
        if a.tokens < 1 or a.tokens % min(a.completion_len, a.tokens):
            raise ValueError(f"--tokens {a.tokens} must be a positive multiple of "
                             f"--completion-len {a.completion_len}")
        if a.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")
    except ValueError as err:
        print(f"python -m bench.accuracy: {err}", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    print(f"{shape} T={a.tokens} {a.dtype} on {device.type}, seed {a.seed}: errors against "
          "backend='reference' in float64 on the same inputs")
    print(HEADER)
    t0 = time.perf_counter()
    result = run(names, device=device, dtype=DTYPES[a.dtype], shape=shape, tokens=a.tokens,
                 completion_len=a.completion_len, seed=a.seed)
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    result["env"] = environment(device)
    print(f"took {result['elapsed_s']} s")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        check_no_absolute_paths(result)
        tmp = out / "accuracy.json.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out / "accuracy.json")
        print(f"wrote {out / 'accuracy.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
