"""The one tolerance rule for the phase-1 kernels (Cut Cross-Entropy's, per tensor).

    max|ours - fp64| <= max|torch - fp64| + slack

"fp64" is the float64 reference on the same inputs rounded to the operand dtype (so only the
arithmetic differs), "torch" the chunked torch backend on those inputs (fp32 math, one rounding
at the end): the kernels may be as far from the truth as the plain implementation is, plus a
slack that the math of each dtype fixes:

- logp and entropy: 2e-5 (1 + max|ref|). Both are fp32 results of fp32 arithmetic whatever
  the operand dtype (the logits accumulate in fp32); summing the vocabulary in another order
  than the torch backend moves them by a few fp32 ulps of the log-sum-exp, which is at most
  about max|ref| + 1 in magnitude. 2e-5 is ~170 fp32 ulps at 1: room for V ~ 1e5 terms
  added in blocks, far below any real error (a wrong max shift or a dropped tile is O(1)).
- gradients: max(u, 2e-5) max|ref|, u the unit roundoff of the dtype our dz is rounded to as
  a GEMM operand (half an ulp: fp16 2^-11, bf16 2^-8). The kernels round dz = dL/dlogits to
  the operand dtype once before the two GEMMs (the torch backend keeps it in fp32), so each
  gradient entry sum_v dz_v W_v carries that one extra relative rounding per term: at most
  u max|ref| where the terms share a sign, less otherwise. fp32 operands are not rounded (u
  = 2^-24); 2e-5 covers the summation order of the fp32 GEMMs over V or T, as for logp.

Before this module the rule was written twice: the CPU tests allowed one fp16 ulp (2^-10) and
one bf16 ulp (2^-7), the GPU tests half a bf16 ulp (2^-8). The half ulp is what one rounding
can cost, so it is the one kept, for every dtype (the fp16 CPU slack halved; checked over
fresh seeds, see tests/test_triton_logprobs.py).
"""

from __future__ import annotations

import torch

VALUE_KEYS = ("logp", "entropy")
FP32_SLACK = 2e-5

_UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def slack(key: str, dtype: torch.dtype, scale: float) -> float:
    """Allowed excess over the torch backend's error for tensor `key` (logp, entropy, or a
    gradient name) computed from operands of `dtype`, with scale = max|ref| of that tensor."""
    if key in VALUE_KEYS:
        return FP32_SLACK * (1.0 + scale)
    if dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"no tolerance rule for operand dtype {dtype}; expected one of "
                         f"{sorted(str(d) for d in _UNIT_ROUNDOFF)}")
    return max(_UNIT_ROUNDOFF[dtype], FP32_SLACK) * scale


def check_against(ours: dict, ref: dict, base: dict, dtype: torch.dtype, *,
                  keys: tuple[str, ...] = ("logp", "entropy", "dh", "dw", "db"),
                  label: str = "") -> None:
    """Assert the rule for every key whose reference is not None (ours must be None where the
    reference is). Tensors may live on any device; they are compared in float64 on the CPU."""
    for key in keys:
        r = ref.get(key)
        if r is None:
            assert ours.get(key) is None, f"{key}: expected None"
            continue
        r = r.double().cpu()
        o = ours[key].double().cpu()
        t = base[key].double().cpu()
        assert o.shape == r.shape, f"{key}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(o).all(), f"{key} {label}: non-finite values"
        err = (o - r).abs().max().item() if r.numel() else 0.0
        base_err = (t - r).abs().max().item() if r.numel() else 0.0
        scale = r.abs().max().item() if r.numel() else 0.0
        tol = base_err + slack(key, dtype, scale)
        assert err <= tol, (f"{key} ({dtype}) {label}: max error {err:.3g} > {tol:.3g} "
                            f"(torch backend {base_err:.3g}, max|ref| {scale:.3g})")
