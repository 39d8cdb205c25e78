"""Triton phase-1 kernels against the float64 reference.

On a CPU machine they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), in fp32
and fp16 at small shapes; on a CUDA machine the same tests run compiled on the GPU.

Tolerance: the one rule of tests/_tolerance.py (Cut Cross-Entropy's, per tensor: max|ours -
fp64| <= max|torch backend - fp64| + a slack fixed by the dtype's math), shared with the GPU
tests.
"""

from __future__ import annotations

import pytest
import torch
from _factory import make_batch, run_fused
from _tolerance import check_against

triton = pytest.importorskip("triton")

import rankgrpo_kernels.logprobs_triton as lt  # noqa: E402
from rankgrpo_kernels import linear_logprobs, logprobs_torch  # noqa: E402
from rankgrpo_kernels.logprobs_reference import logprobs as ref_logprobs  # noqa: E402
from rankgrpo_kernels.triton_config import (  # noqa: E402
    DHIDDEN_MODES,
    Config,
    Tile,
    override,
    select,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Small tiles: many token blocks, vocabulary splits, slabs and dW token splits, and tiles
# that V, H and T never fill (the interpreter runs this at ~0.5 ms per program).
SMALL = dict(fwd=Tile(16, 128, 32), v_split=256, group=2, dz=Tile(16, 128, 32),
             dw=Tile(128, 32, 16), dh=Tile(16, 32, 128), slab_mib=0.01, combine_rows=16,
             combine_k=32)


def make_inputs(rng, T, H, V, *, bias=True, w_scale=2.0, bias_shift=0.0, ignore=0):
    h = torch.randn(T, H, generator=rng, dtype=torch.float64)
    w = torch.randn(V, H, generator=rng, dtype=torch.float64) * (w_scale / H**0.5)
    b = (torch.randn(V, generator=rng, dtype=torch.float64) + bias_shift) if bias else None
    y = torch.randint(0, V, (T,), generator=rng)
    if ignore:
        y[torch.randperm(T, generator=rng)[:ignore]] = -1
    # Upstream gradients as fp32 values (what the kernels receive), kept in fp64.
    g = torch.randn(T, generator=rng, dtype=torch.float64).float().double()
    ge = (0.3 * torch.randn(T, generator=rng, dtype=torch.float64)).float().double()
    return h, w, b, y, g, ge


def reference(h, w, b, y, temperature, g, ge):
    """fp64 logp, entropy and gradients of sum(g logp + ge entropy) over non-ignored rows."""
    hh = h.double().requires_grad_()
    ww = w.double().requires_grad_()
    bb = b.double().requires_grad_() if b is not None else None
    logp, ent = ref_logprobs(hh, ww, y, bb, temperature, True)
    keep = (y >= 0).double()
    ((g * keep * logp).sum() + (ge * keep * ent).sum()).backward()
    return dict(logp=logp.detach(), entropy=ent.detach(), dh=hh.grad, dw=ww.grad,
                db=bb.grad if bb is not None else None)


def run_impl(impl, h, w, b, y, temperature, g, ge, dtype):
    """logp, entropy and gradients from a phase-1 module on `dtype` copies of the inputs."""
    hd, wd = h.to(DEV, dtype), w.to(DEV, dtype)
    bd = b.to(DEV, dtype) if b is not None else None
    yd = y.to(DEV)
    logp, lse, ent = impl.forward(hd, wd, yd, bd, temperature, True)
    dh, dw, db = impl.backward(hd, wd, yd, bd, temperature, lse, ent, g.to(DEV).float(),
                               ge.to(DEV).float(), (True, True, b is not None))
    out = dict(logp=logp, entropy=ent, dh=dh, dw=dw, db=db)
    return {k: (v.double().cpu() if v is not None else None) for k, v in out.items()}


def check(ours, ref, dtype, base):
    """The shared rule (tests/_tolerance.py) on every output of a phase-1 module."""
    check_against(ours, ref, base, dtype)


CASES = {
    # name: (T, H, V, kwargs for make_inputs, temperature)
    "ragged": (77, 40, 1000, dict(ignore=9), 0.7),
    "one-token": (1, 24, 333, dict(), 1.0),
    "very-negative": (33, 16, 700, dict(bias_shift=-800.0, ignore=3), 1.0),
    # Large logits with a temperature: the max must come off before any scaling.
    "large-hot": (29, 16, 650, dict(bias_shift=2000.0, ignore=2), 0.8),
    "peaked": (40, 32, 517, dict(w_scale=25.0, ignore=2), 1.3),
    "no-bias": (50, 64, 1100, dict(bias=False), 1.0),
}


@pytest.mark.parametrize("dhidden", DHIDDEN_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity(rng, case, dtype, dhidden):
    T, H, V, kw, temp = CASES[case]
    h, w, b, y, g, ge = make_inputs(rng, T, H, V, **kw)
    if case == "peaked":  # half the rows target their argmax (p ~ 1), half a random token
        with torch.no_grad():
            z = h @ w.t() + b
        y[: T // 2] = z[: T // 2].argmax(1)
    # The reference sees the inputs rounded to dtype, so only the kernel's arithmetic differs.
    hq, wq = h.to(dtype).double(), w.to(dtype).double()
    bq = b.to(dtype).double() if b is not None else None
    ref = reference(hq, wq, bq, y, temp, g, ge)
    with override(dhidden=dhidden, **(SMALL if case == "ragged" else {})):
        ours = run_impl(lt, h, w, b, y, temp, g, ge, dtype)
    # The torch backend takes ge of ignored rows at face value; linear_logprobs feeds it 0
    # there, and so does this baseline (ours is handed the raw ge and must drop it).
    base = run_impl(logprobs_torch, h, w, b, y, temp, g, ge * (y >= 0), dtype)
    check(ours, ref, dtype, base)
    if case == "very-negative":  # the true lse sits near -800: padded columns were not 0
        assert (ours["logp"] <= 1e-4).all()


def test_ignored_rows_contribute_nothing(rng):
    T, H, V = 20, 16, 300
    h, w, b, y, g, ge = make_inputs(rng, T, H, V, ignore=T)  # every target ignored
    ours = run_impl(lt, h, w, b, y, 1.0, g, ge, torch.float32)
    assert (ours["logp"] == 0).all()
    assert (ours["dh"] == 0).all() and (ours["dw"] == 0).all() and (ours["db"] == 0).all()
    assert torch.isfinite(ours["entropy"]).all() and (ours["entropy"] > 0).all()


def test_public_api_and_gradients(rng):
    """linear_logprobs(backend="triton") through autograd, 3-d input, ignore_index."""
    B, T, H, V = 3, 9, 20, 450
    h = torch.randn(B, T, H, generator=rng, dtype=torch.float64)
    w = torch.randn(V, H, generator=rng, dtype=torch.float64) / H**0.5
    y = torch.randint(0, V, (B, T), generator=rng)
    y[1, 4:] = -100
    args = {}
    for backend in ("reference", "triton"):
        hh = h.float().to(DEV).requires_grad_()
        ww = w.float().to(DEV).requires_grad_()
        if backend == "reference":
            hh, ww = (h.float().double().requires_grad_(), w.float().double().requires_grad_())
        logp, ent = linear_logprobs(hh, ww, y.to(hh.device), temperature=0.9,
                                    return_entropy=True, backend=backend)
        (logp.sum() + 0.5 * ent.sum()).backward()
        args[backend] = [x.detach().double().cpu() for x in (logp, ent, hh.grad, ww.grad)]
    for a, r in zip(args["triton"], args["reference"]):
        assert (a - r).abs().max().item() <= 2e-5 * (1 + r.abs().max().item())
    assert (args["triton"][0][1, 4:] == 0).all() and (args["triton"][1][1, 4:] == 0).all()


@pytest.mark.parametrize("loss_type,level", [("bnpo", "rank"), ("grpo", "token"),
                                             ("rank", "sequence")])
def test_fused_loss_matches_reference(rng, loss_type, level):
    batch64 = make_batch(rng, B=3, T=11, H=24, V=300, bias=level == "rank")
    batch32 = dict(batch64)
    for k in ("hidden", "weight", "bias"):
        if batch64[k] is not None:
            batch32[k] = batch64[k].float()
    if DEV != "cpu":
        batch32 = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
                   for k, v in batch32.items()}
    kw = dict(loss_type=loss_type, level=level, beta=0.04, temperature=0.8,
              num_segments=batch64["num_ranks"] + 1)
    ref = run_fused(batch64, "reference", **kw)
    ours = run_fused(batch32, "triton", **kw)
    for key in ("loss", "dhidden", "dweight", "dbias"):
        if key in ref:
            r, o = ref[key].double(), ours[key].double().cpu()
            err = ((o - r).norm() / r.norm().clamp(min=1e-30)).item()
            assert err <= 2e-5, f"{key}: relative error {err:.3g}"
    for name, v in ref["metrics"].items():
        assert ours["metrics"][name].double().item() == pytest.approx(v.item(), rel=2e-5,
                                                                      abs=1e-6), name


def test_batch_invariance_bitwise(rng):
    """A row's logp and entropy do not depend on the rest of the batch (docs/math.md section 8).

    Compiled (CUDA), bitwise: alone, in a batch of 64, and beside rows that differ. Through
    the interpreter, `tl.dot` is numpy's BLAS, whose blocking depends on the operand shapes:
    a 1-row and a 64-row call may round a logit differently (seen: one ulp on an AVX2-only
    EPYC with OpenBLAS 0.3.31). There the bitwise claim holds only between calls of the same
    shape (other rows' values, entropy on or off); across shapes the difference is bounded by
    a few ulps of the largest logit, which is all one rounding of z can move logp and entropy.
    """
    T, H, V = 64, 48, 1500
    h, w, b, y, *_ = make_inputs(rng, T, H, V)
    compiled = DEV == "cuda"
    for dtype in (torch.float32, torch.float16):
        hd, wd, bd, yd = h.to(DEV, dtype), w.to(DEV, dtype), b.to(DEV, dtype), y.to(DEV)
        full, _, ent_full = lt.forward(hd, wd, yd, bd, 1.0, True)
        nog, _, _ = lt.forward(hd, wd, yd, bd, 1.0, False)
        assert torch.equal(full, nog)
        z_max = (hd.double() @ wd.double().t() + bd.double()).abs().max().item()
        ulps = 4 * torch.finfo(torch.float32).eps * max(z_max, 1.0)
        for i in (0, 37, 63):
            one, _, ent_one = lt.forward(hd[i:i + 1], wd, yd[i:i + 1], bd, 1.0, True)
            if compiled:
                assert torch.equal(one, full[i:i + 1]), (dtype, i)
                assert torch.equal(ent_one, ent_full[i:i + 1]), (dtype, i)
            else:
                assert (one - full[i:i + 1]).abs().max().item() <= ulps, (dtype, i)
                assert (ent_one - ent_full[i:i + 1]).abs().max().item() <= ulps, (dtype, i)
        other = hd.clone()
        other[:37] = torch.randn(37, H, generator=rng).to(DEV, dtype)
        mixed, _, _ = lt.forward(other, wd, yd, bd, 1.0, True)
        assert torch.equal(mixed[37:], full[37:])


def test_on_policy_ratio_is_exactly_one(rng):
    """old_logp from a separate no-grad pass (no entropy) equals the grad pass bitwise."""
    batch = make_batch(rng, B=3, T=10, H=24, V=250, dtype=torch.float32)
    batch = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    with torch.no_grad():
        old = linear_logprobs(batch["hidden"], batch["weight"], batch["targets"],
                              backend="triton")
    batch["old_logp"] = old
    out = run_fused(batch, "triton", level="token", num_segments=batch["num_ranks"] + 1)
    m = out["metrics"]
    assert m["importance_ratio/min"].item() == 1.0
    assert m["importance_ratio/max"].item() == 1.0
    assert m["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("dhidden", DHIDDEN_MODES)
def test_deterministic(rng, dhidden):
    T, H, V = 40, 32, 900
    h, w, b, y, g, ge = make_inputs(rng, T, H, V)
    with override(dhidden=dhidden, **SMALL):
        a = run_impl(lt, h, w, b, y, 1.0, g, ge, torch.float16)
        c = run_impl(lt, h, w, b, y, 1.0, g, ge, torch.float16)
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_bf16_and_fp64_inputs(rng):
    """bf16 runs (widened to fp32 under the interpreter); fp64 is served by the torch backend."""
    T, H, V = 30, 32, 400
    h, w, b, y, g, ge = make_inputs(rng, T, H, V)
    ref = reference(h.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double(), y,
                    1.0, g, ge)
    ours = run_impl(lt, h, w, b, y, 1.0, g, ge, torch.bfloat16)
    base = run_impl(logprobs_torch, h, w, b, y, 1.0, g, ge, torch.bfloat16)
    check_against(ours, ref, base, torch.bfloat16)
    ours64 = run_impl(lt, h, w, b, y, 1.0, g, ge, torch.float64)
    ref64 = reference(h, w, b, y, 1.0, g, ge)
    for key in ref64:
        assert (ours64[key] - ref64[key]).abs().max().item() <= 1e-10 * (
            1 + ref64[key].abs().max().item()), key


@pytest.mark.parametrize("dhidden", DHIDDEN_MODES)
def test_no_grad_needed_and_partial_needs(rng, dhidden):
    T, H, V = 12, 16, 200
    h, w, b, y, g, ge = make_inputs(rng, T, H, V)
    with override(dhidden=dhidden):
        _partial_needs(h, w, b, y, g)


def _partial_needs(h, w, b, y, g):
    hd, wd, bd = (x.to(DEV, torch.float32) for x in (h, w, b))
    yd = y.to(DEV)
    logp, lse, ent = lt.forward(hd, wd, yd, bd, 1.0, False)
    assert ent is None
    full = lt.backward(hd, wd, yd, bd, 1.0, lse, None, g.to(DEV).float(), None,
                       (True, True, True))
    assert lt.backward(hd, wd, yd, bd, 1.0, lse, None, g.float(), None,
                       (False, False, False)) == (None, None, None)
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        part = lt.backward(hd, wd, yd, bd, 1.0, lse, None, g.to(DEV).float(), None, needs)
        for want, got, ref in zip(needs, part, full):
            assert (got is not None) == want
            if want:
                assert torch.equal(got, ref)


def test_config_table_and_overrides(monkeypatch):
    gpu = select(torch.bfloat16, 896, 151936, interpret=False)
    assert isinstance(gpu, Config) and gpu.v_split % gpu.fwd.n == 0
    # The forward's configuration never depends on the token count (batch invariance).
    assert "n" not in select.__code__.co_varnames[:select.__code__.co_argcount]
    monkeypatch.setenv("RANKGRPO_TRITON_CONFIG", "fwd=64x128x32w4s2,v_split=4096,slab_mib=8")
    cfg = select(torch.bfloat16, 896, 151936, interpret=False)
    assert cfg.fwd == Tile(64, 128, 32, 4, 2) and cfg.v_split == 4096 and cfg.slab_mib == 8
    monkeypatch.setenv("RANKGRPO_TRITON_CONFIG", "fwd=64x100")
    with pytest.raises(ValueError, match="bad tile"):
        select(torch.bfloat16, 896, 151936, interpret=False)
    monkeypatch.setenv("RANKGRPO_TRITON_CONFIG", "dhidden=recompute,dh_splits=3")
    cfg = select(torch.bfloat16, 896, 151936, interpret=False)
    assert cfg.dhidden == "recompute" and cfg.dh_splits == 3
    monkeypatch.setenv("RANKGRPO_TRITON_CONFIG", "dhidden=sometimes")
    with pytest.raises(ValueError, match="dhidden='sometimes'.*accumulate"):
        select(torch.bfloat16, 896, 151936, interpret=False)
    monkeypatch.delenv("RANKGRPO_TRITON_CONFIG")
    assert select(torch.bfloat16, 896, 151936, interpret=False).dhidden == "accumulate"
    with pytest.raises(ValueError, match="unknown"):
        with override(nonsense=1):
            pass


@pytest.mark.parametrize("dhidden", DHIDDEN_MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H,V", [(896, 151936), (3584, 152064), (3072, 128256)])
@pytest.mark.parametrize("T", [1, 8192, 32768, 131072])
def test_long_context_launch_plan(T, H, V, dtype, dhidden):
    """Launch sizes and index arithmetic up to T = 131072 on the real heads (no tensors).

    CUDA allows 2^31 - 1 programs on grid axis x and 65535 on y; the kernels index with int32
    wherever a product stays below 2^31 (row offsets inside a tile, `state + N`, a slab's
    column) and with int64 wherever it can pass it (row * stride, split * plane: T * V is
    2e10 at T = 131072). This checks the int32 ones at these sizes and that the buffers keep
    to their budget."""
    with override(dhidden=dhidden):
        cfg = select(dtype, H, V, interpret=False)
    itemsize = torch.finfo(dtype).bits // 8
    plan = lt.plan_backward(cfg, T, H, V, itemsize, 132, (True, True, False))
    assert plan.mode == dhidden
    for kernel, grid in plan.grids.items():
        assert 1 <= grid[0] <= lt.GRID_X_MAX, (kernel, grid)
        assert all(1 <= x <= lt.GRID_YZ_MAX for x in grid[1:]), (kernel, grid)
    i32 = 2**31 - 1
    assert 2 * T <= i32                                # lse_state[1] at state + N + row
    assert plan.slab * max(cfg.dw.k, cfg.dh.k) <= i32  # BLOCK_K * dz_stride (dW pointer step)
    assert max(cfg.dw.k, cfg.dh.k) * H <= i32          # BLOCK_K * stride_h / stride_w
    assert V + cfg.dz.n <= i32 and T + cfg.fwd.m <= i32  # column / row offsets of a tile
    # The forward: its split partials and grid.
    splits = -(-V // cfg.v_split)
    assert -(-T // cfg.fwd.m) * splits <= lt.GRID_X_MAX
    budget = cfg.slab_mib * 2**20
    dz = plan.buffers.get("dz slab", 0)
    # The slab keeps to its budget unless one quantum of it is larger.
    quantum_bytes = max(T * 256 * itemsize, plan.token_rows * plan.token_stride * itemsize)
    assert dz <= max(budget, quantum_bytes)
    if dhidden == "recompute":
        assert "dhidden fp32 running sum" not in plan.buffers
        assert plan.dh_splits * plan.dh_split_len >= V
        assert plan.token_rows % cfg.dh.m == 0 and plan.token_stride >= V
    elif itemsize == 2 and plan.num_slabs > 1:
        assert plan.buffers["dhidden fp32 running sum"] == T * H * 4


def test_recompute_plan_memory_at_32k():
    """The point of dhidden="recompute": at T = 32768 on the 7B head (bf16, H200's 132 SMs),
    the backward's own buffers drop from the accumulator's 448 MiB + the dz slab to the dz
    slab and the partial sums (sizes, not a measurement)."""
    acc = lt.plan_backward(select(torch.bfloat16, 3584, 152064, interpret=False), 32768,
                           3584, 152064, 2, 132, (True, True, False))
    with override(dhidden="recompute", slab_mib=48):
        cfg = select(torch.bfloat16, 3584, 152064, interpret=False)
    rec = lt.plan_backward(cfg, 32768, 3584, 152064, 2, 132, (True, True, False))
    assert acc.buffers["dhidden fp32 running sum"] == 32768 * 3584 * 4
    assert rec.extra_bytes < acc.extra_bytes / 4
    assert "dhidden fp32 running sum" not in rec.buffers
