"""Triton phase-1 kernels on a CUDA GPU at the real shapes of docs/design.md (`pytest -m gpu`).

bf16 parity uses the one tolerance rule of tests/_tolerance.py (Cut Cross-Entropy's, per
tensor: max|ours - fp64| <= max|torch - fp64| + slack), with "fp64" the chunked torch backend
in float64 on the same bf16-rounded inputs and "torch" the chunked torch backend on the bf16
inputs (fp32 math, one rounding at the end).
Plus the identities: batch invariance and no-grad/grad passes bitwise equal, on-policy ratio
exactly 1, and a bitwise deterministic backward. Budget: well under 2 minutes on an H100.
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import check_against

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
triton = pytest.importorskip("triton")

import rankgrpo_kernels.logprobs_torch as ltorch  # noqa: E402
import rankgrpo_kernels.logprobs_triton as ltri  # noqa: E402
from rankgrpo_kernels import fused_linear_rank_grpo_loss, linear_logprobs  # noqa: E402

DEV = "cuda"


def _inputs(rng, T, H, V, *, bias=False, ignore=0.02):
    g = torch.Generator(device=DEV).manual_seed(int(torch.randint(0, 2**31, (1,),
                                                                  generator=rng)))
    h = torch.randn(T, H, generator=g, device=DEV).bfloat16()
    w = (torch.randn(V, H, generator=g, device=DEV) * (2.0 / H**0.5)).bfloat16()
    b = torch.randn(V, generator=g, device=DEV).bfloat16() if bias else None
    y = torch.randint(0, V, (T,), generator=g, device=DEV)
    y[torch.rand(T, generator=g, device=DEV) < ignore] = -1
    gl = torch.randn(T, generator=g, device=DEV) / T**0.5
    ge = 0.1 * torch.randn(T, generator=g, device=DEV) / T**0.5
    ge = torch.where(y >= 0, ge, 0.0)  # as linear_logprobs feeds it (entropy is 0 there)
    return h, w, b, y, gl, ge


def _run(impl, h, w, b, y, gl, ge, temperature=1.0):
    logp, lse, ent = impl.forward(h, w, y, b, temperature, True)
    dh, dw, db = impl.backward(h, w, y, b, temperature, lse, ent, gl, ge,
                               (True, True, b is not None))
    return dict(logp=logp, entropy=ent, dh=dh, dw=dw, db=db)


@pytest.mark.parametrize("T,H,V,bias", [
    (65536 + 17, 896, 151936, False),   # Qwen2.5-0.5B head; T above the 65,535 grid-y limit
    (4096, 3584, 152064, False),        # Qwen2.5-7B head
    (3000, 3072, 128256, True),         # Llama-3.2-3B head (+ a bias, temperature != 1)
])
def test_bf16_parity_real_shapes(rng, monkeypatch, T, H, V, bias):
    monkeypatch.setattr(ltorch, "CHUNK_ELEMENTS", 1 << 27)  # fewer, larger fp64 chunks
    temp = 0.8 if bias else 1.0
    h, w, b, y, gl, ge = _inputs(rng, T, H, V, bias=bias)
    ours = _run(ltri, h, w, b, y, gl, ge, temp)
    base = _run(ltorch, h, w, b, y, gl, ge, temp)
    ref = _run(ltorch, h.double(), w.double(), b.double() if bias else None, y, gl.double(),
               ge.double(), temp)
    keep = y >= 0
    check_against(ours, ref, base, torch.bfloat16, label=f"T={T} H={H} V={V}")
    assert (ours["logp"][~keep] == 0).all()


def test_batch_invariance_and_no_grad_bitwise(rng):
    T, H, V = 1000, 896, 151936
    h, w, _, y, _, _ = _inputs(rng, T, H, V, ignore=0.0)
    full, _, ent = ltri.forward(h, w, y, None, 1.0, True)
    no_ent, _, _ = ltri.forward(h, w, y, None, 1.0, False)
    assert torch.equal(full, no_ent)
    for i in (0, 1, 37, 555, 999):  # alone
        one, _, e1 = ltri.forward(h[i:i + 1], w, y[i:i + 1], None, 1.0, True)
        assert torch.equal(one, full[i:i + 1]) and torch.equal(e1, ent[i:i + 1]), i
    sub, _, _ = ltri.forward(h[100:164], w, y[100:164], None, 1.0, True)  # a batch of 64
    assert torch.equal(sub, full[100:164])
    # The public API with and without autograd.
    hg = h.clone().requires_grad_()
    lp_grad, _ = linear_logprobs(hg, w, y, return_entropy=True, backend="triton")
    with torch.no_grad():
        lp_nog = linear_logprobs(h, w, y, backend="triton")
    assert torch.equal(lp_grad.detach(), lp_nog) and torch.equal(lp_nog, full)


def test_on_policy_ratio_is_exactly_one(rng):
    B, T, H, V, R = 8, 1024, 896, 151936, 20
    h, w, _, y, _, _ = _inputs(rng, B * T, H, V, ignore=0.0)
    h, y = h.view(B, T, H), y.view(B, T)
    gen = torch.Generator(device=DEV).manual_seed(1)
    seg = torch.randint(0, R + 1, (B, T), generator=gen, device=DEV).sort(1).values
    mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
    adv = torch.randn(B, R, generator=gen, device=DEV)
    with torch.no_grad():
        old = linear_logprobs(h, w, y, backend="triton")
    hg = h.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    eos = torch.zeros_like(mask)  # truncated rows: no EOS token to exclude
    loss, m = fused_linear_rank_grpo_loss(hg, wg, y, old, adv, seg, mask, backend="triton",
                                          num_segments=R + 1, eos_mask=eos)
    loss.backward()
    assert m["importance_ratio/min"].item() == 1.0
    assert m["importance_ratio/max"].item() == 1.0
    assert m["clip_ratio/region_mean"].item() == 0.0
    assert torch.isfinite(hg.grad).all() and torch.isfinite(wg.grad).all()


def test_backward_is_deterministic(rng):
    T, H, V = 8192, 896, 151936  # several slabs and a split-token dW GEMM
    h, w, b, y, gl, ge = _inputs(rng, T, H, V, bias=True)
    a = _run(ltri, h, w, b, y, gl, ge)
    c = _run(ltri, h, w, b, y, gl, ge)
    for key in a:
        assert torch.equal(a[key], c[key]), key


def _rows_reference(h, w, y, gl, ge, rows):
    """fp64 logp, entropy and dhidden of the selected rows (each row's own: dhidden of a row
    depends only on its upstream gradients)."""
    sub = _run(ltorch, h[rows].double(), w.double(), None, y[rows], gl[rows].double(),
               ge[rows].double())
    return {k: sub[k] for k in ("logp", "entropy", "dh")}


@pytest.mark.parametrize("dhidden", ["accumulate", "recompute"])
@pytest.mark.parametrize("H,V", [(896, 151936), (3584, 152064)], ids=["0.5b", "7b"])
def test_long_context_parity(rng, monkeypatch, H, V, dhidden):
    """T = 131072 on the Qwen2.5-0.5B and -7B heads: T x V = 2e10 logits, past int32 offsets.

    logp, entropy and dhidden by the shared rule (tests/_tolerance.py) on 2048 rows (the
    first, the last and random ones: a 32-bit offset overflow lands on late rows), against
    the fp64 reference of those rows and the torch backend; dW, a sum over every token,
    against the torch backend in relative norm (both are rounded to bf16 once at the end, so
    they may differ by two bf16 unit roundoffs, 2^-7)."""
    from rankgrpo_kernels.triton_config import override

    monkeypatch.setattr(ltorch, "CHUNK_ELEMENTS", 1 << 27)
    T = 131072
    h, w, _, y, gl, ge = _inputs(rng, T, H, V)
    with override(dhidden=dhidden):
        ours = _run(ltri, h, w, None, y, gl, ge)
    base = _run(ltorch, h, w, None, y, gl, ge)
    gen = torch.Generator(device=DEV).manual_seed(3)
    rows = torch.cat([torch.arange(512, device=DEV), torch.arange(T - 512, T, device=DEV),
                      torch.randint(512, T - 512, (1024,), generator=gen, device=DEV)])
    ref = _rows_reference(h, w, y, gl, ge, rows)
    pick = {k: ours[k][rows] for k in ref}
    check_against(pick, ref, {k: base[k][rows] for k in ref}, torch.bfloat16,
                  keys=("logp", "entropy", "dh"), label=f"T={T} H={H} {dhidden}")
    for key in ("logp", "entropy", "dh", "dw"):
        assert torch.isfinite(ours[key]).all(), key  # every row written, none overflowed
    dw, dw_t = ours["dw"].double(), base["dw"].double()
    rel = ((dw - dw_t).norm() / dw_t.norm()).item()
    assert rel <= 2.0**-7, f"dW relative difference to the torch backend {rel:.3g}"


def test_recompute_matches_accumulate_and_is_deterministic(rng):
    """dhidden="recompute" computes the same dhidden as "accumulate" within one bf16 rounding
    of each (both round the same fp32 sums once), bitwise the same dW, and is itself
    bitwise deterministic."""
    from rankgrpo_kernels.triton_config import override

    T, H, V = 8192, 896, 151936
    h, w, b, y, gl, ge = _inputs(rng, T, H, V, bias=True)
    acc = _run(ltri, h, w, b, y, gl, ge)
    with override(dhidden="recompute"):
        rec = _run(ltri, h, w, b, y, gl, ge)
        rec2 = _run(ltri, h, w, b, y, gl, ge)
    for key in rec:
        assert torch.equal(rec[key], rec2[key]), key
    assert torch.equal(rec["dw"], acc["dw"]) and torch.equal(rec["db"], acc["db"])
    d = (rec["dh"].double() - acc["dh"].double()).abs()
    assert d.max().item() <= 2.0**-7 * acc["dh"].double().abs().max().item()
