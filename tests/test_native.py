"""Parity of the native op library (csrc/, backend="native") with the PyTorch segment stages.

Tolerance rule: compared with `reference_stage` (the loss as an expression, autograd for g)
and `torch_stage` (the closed form) in the same dtype, g and the stats agree within
`tol * max|expected|` (elementwise, plus the same relative tolerance), and the loss within
`tol * sum_t |c_t| (|A_t| (w_t + 1) + 1)` (its rounding scale, see `loss_scale`): tol = 1e-12
in float64, 1e-5 in float32. Token counts and clip counts are exact. Inputs are fresh random
draws each run (the `rng` fixture prints the seed). Skipped when the library is not built;
build it with `cmake -S . -B build && cmake --build build` (see rankgrpo_kernels/native.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rankgrpo_kernels import (  # AGGREGATIONS: the loss types of the plain stage, see below
    AGGREGATIONS,
    LEVELS,
    fused_linear_rank_grpo_loss,
    native,
    rank_grpo_loss,
)
from rankgrpo_kernels.loss import prepare
from rankgrpo_kernels.segment_stage import ClipParams, reference_stage, torch_stage

pytestmark = pytest.mark.skipif(
    not native.available(),
    reason=f"native op library not built ({native.load_error()}); {native.BUILD_HINT}")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
DTYPES = (torch.float64, torch.float32)


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def assert_stats(actual, expected, dtype, what):
    assert torch.equal(actual[:3], expected[:3]), f"{what}: counts {actual[:3]} != {expected[:3]}"
    assert_close(actual, expected, dtype, what)


def make_batch(rng, dtype, *, b=4, t=37, ranks=5, on_policy=False, adv_per_token=False,
               monotone=True, device="cpu"):
    """Random loss inputs with ragged masks, an all-masked row, holes and an overflow bin."""
    lengths = torch.randint(1, t + 1, (b,), generator=rng)
    lengths[0] = t
    if b > 2:
        lengths[2] = 0  # a row without a single completion token
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    mask &= torch.rand(b, t, generator=rng) > 0.1
    logp = -(torch.rand(b, t, generator=rng, dtype=dtype) * 4 + 0.01)
    old = None if on_policy else logp + 0.2 * torch.randn(b, t, generator=rng, dtype=dtype)
    ref = logp + 0.2 * torch.randn(b, t, generator=rng, dtype=dtype)
    if monotone:  # ids as segment_ids_from_newlines makes them (ranks = the overflow bin)
        newline = (torch.rand(b, t, generator=rng) < 0.15).long()
        seg = (torch.cumsum(newline, 1) - newline).clamp(max=ranks)
    else:
        seg = torch.randint(0, ranks + 1, (b, t), generator=rng)
    seg = torch.where(mask, seg, -1)
    if adv_per_token:
        adv = torch.randn(b, t, generator=rng, dtype=dtype)
    else:
        adv = torch.randn(b, ranks, generator=rng, dtype=dtype)
    # Rows that stop before t ended with EOS at their last position (when it is masked).
    eos = (torch.arange(t).unsqueeze(0) == (lengths - 1).unsqueeze(1)) & mask
    eos &= (lengths < t).unsqueeze(1)
    out = dict(logp=logp, old_logp=old, ref_logp=ref, advantages=adv, segment_ids=seg, mask=mask,
               eos_mask=eos)
    out = {k: (v.to(device) if v is not None else None) for k, v in out.items()}
    out["advantages_per"] = "token" if adv_per_token else "rank"
    return out


def stage_args(batch, level, loss_type, beta):
    prep = prepare(batch["logp"], batch["old_logp"], batch["advantages"], batch["segment_ids"],
                   batch["mask"], ref_logp=batch["ref_logp"] if beta else None, level=level,
                   loss_type=loss_type, eos_mask=batch["eos_mask"],
                   advantages_per=batch["advantages_per"])
    return (prep.logp, prep.old_logp, prep.ref_logp, prep.adv, prep.key, prep.num_keys,
            prep.c, prep.mask)


def reference_with_grad(args, params):
    logp = args[0].detach().clone().requires_grad_(True)
    loss, stats = reference_stage(logp, *args[1:], params)
    (g,) = torch.autograd.grad(loss, logp)
    return loss.detach(), g, stats


def loss_scale(args):
    """sum_t |c_t| (|A_t| (w_t + 1) + 1) over masked tokens, a bound on sum_t |c_t l_t|: the
    scale of the loss's rounding error (a loss near 0 by cancellation keeps no relative
    accuracy in float32, whoever sums it)."""
    w = torch_ratios(args)
    adv, c, mask = args[3], args[6], args[7]
    return float(torch.where(mask, c.abs() * (adv.abs() * (w + 1) + 1), 0).sum()) + 1e-30


def check_stage(args, params, dtype, what):
    loss, g, stats = native.segment_stage(*args, params)
    assert loss.shape == () and g.shape == args[0].shape and stats.shape == (7,)
    assert loss.dtype == g.dtype == stats.dtype == dtype
    compare((loss, g, stats), reference_with_grad(args, params), args, dtype,
            f"{what} vs reference")
    compare((loss, g, stats), torch_stage(*args, params), args, dtype, f"{what} vs torch")


def compare(actual, expected, args, dtype, what):
    """(loss, g, stats) against an expected triple, by the module's tolerance rule."""
    torch.testing.assert_close(actual[0], expected[0], rtol=TOL[dtype],
                               atol=TOL[dtype] * loss_scale(args),
                               msg=lambda m: f"{what} loss: {m}")
    assert_close(actual[1], expected[1], dtype, f"{what} g")
    assert_stats(actual[2], expected[2], dtype, f"{what} stats")


# The native stage is the plain loss (clip surrogate): there the loss types differ by their
# aggregation only, so AGGREGATIONS covers every case it has (the others raise: test_contract).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", AGGREGATIONS)
@pytest.mark.parametrize("level", LEVELS)
def test_stage_parity(rng, level, loss_type, dtype):
    for on_policy in (False, True):
        for adv_per_token in (False, True):
            batch = make_batch(rng, dtype, on_policy=on_policy, adv_per_token=adv_per_token)
            for beta in (0.0, 0.04):
                args = stage_args(batch, level, loss_type, beta)
                for delta in (None, 1.03):
                    params = ClipParams(0.06, 0.08, delta, beta)
                    check_stage(args, params, dtype, f"on_policy={on_policy} "
                                f"adv_per_token={adv_per_token} beta={beta} delta={delta}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_on_policy_ratio_is_one(rng, dtype):
    args = stage_args(make_batch(rng, dtype, on_policy=True), "rank", "bnpo", 0.0)
    _, _, stats = native.segment_stage(*args, ClipParams(0.06, 0.08, None, 0.0))
    assert stats[1] == stats[2] == 0 and stats[4] == stats[5] == 1  # no clip; min = max = 1
    assert stats[3] == stats[0]  # ratio_sum == count


def tie_batch(rng, dtype, b=3, t=24, seg_len=4):
    """Dyadic log-probs whose log-ratios sum to exactly 0 in most segments, so that w == 1
    exactly in any implementation and summation order; the rest have w = exp(+-1/32)."""
    logp = -torch.randint(1, 256, (b, t), generator=rng).to(dtype) / 64
    x = torch.randint(1, 9, (b, t // seg_len, seg_len // 2), generator=rng).to(dtype) / 64
    lr = torch.cat([x, -x], dim=2)  # segments [x1, x2, -x1, -x2]: sum 0 in any order
    j = torch.arange(b * (t // seg_len)).reshape(b, t // seg_len, 1)  # segment number
    sign = torch.where(torch.rand(b, t // seg_len, 1, generator=rng) < 0.5, 1.0, -1.0)
    lr = torch.where(j % 4 == 3, sign.to(dtype) / 32, lr).reshape(b, t)
    seg = torch.arange(t).div(seg_len, rounding_mode="floor").expand(b, t).clone()
    # advantages constant per segment: > 0, < 0 and 0 among the segments with w == 1
    adv = torch.tensor([0.75, -1.5, 0.0], dtype=dtype)[(j % 3).squeeze(2)]
    adv = adv.repeat_interleave(seg_len, dim=1)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, -3:] = False
    seg = torch.where(mask, seg, -1)
    return dict(logp=logp, old_logp=logp - lr, ref_logp=logp - 1 / 16, advantages=adv,
                segment_ids=seg, mask=mask, eos_mask=None, advantages_per="token")


def torch_ratios(args):
    """w per token as torch_stage computes it."""
    logp, old, _, _, key, num_keys, _, mask = args
    flat = key.reshape(-1)
    n = logp.new_zeros(num_keys).index_add_(0, flat, mask.to(logp.dtype).reshape(-1))
    s = logp.new_zeros(num_keys).index_add_(0, flat, torch.where(mask, logp - old, 0).reshape(-1))
    return torch.exp(s / n.clamp(min=1))[key]


BOUNDS = {  # (epsilon_low, epsilon_high, delta) putting a clip bound at w == 1
    "low": (0.0, 0.08, None),
    "high": (0.06, 0.0, None),
    "both": (0.0, 0.0, None),
    "delta": (0.06, 0.08, 1.0),
    "delta_and_high": (0.06, 0.0, 1.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bound", sorted(BOUNDS))
@pytest.mark.parametrize("level", ("sequence", "rank"))
def test_ties_at_clip_bounds(rng, level, bound, dtype):
    """w == 1 exactly on a clip bound, with A > 0, < 0 and = 0: autograd's tie rules."""
    batch = tie_batch(rng, dtype)
    if level == "sequence":  # make whole rows sum to 0 as well
        batch["old_logp"] = batch["logp"] - torch.where(
            (batch["logp"] - batch["old_logp"]).abs() == 1 / 32, 0.0,
            batch["logp"] - batch["old_logp"])
    eps_low, eps_high, delta = BOUNDS[bound]
    for beta in (0.0, 0.02):
        args = stage_args(batch, level, "rank", beta)
        params = ClipParams(eps_low, eps_high, delta, beta)
        on_bound = args[7] & (torch_ratios(args) == 1)
        for sign in (1, -1, 0):
            assert bool((on_bound & (args[3].sign() == sign)).any())
        check_stage(args, params, dtype, f"bound={bound} beta={beta}")


def collapsing_advantage(x, y, rng, dtype):
    """An advantage A with x * A == y * A in `dtype` although x != y (rounding), or None."""
    a = (torch.rand(1 << 16, generator=rng, dtype=torch.float64) * 0.9 + 0.05).to(dtype)
    hits = a[x * a == y * a]
    return hits[0] if hits.numel() else None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_at_bounds_with_torch_ratio(rng, dtype):
    """Bounds at ratios w != 1 as torch computes them. The CPU op sums each segment in token
    order and takes ATen's exp, so its w is bitwise torch's and ties resolve the same way:
    (1) a bound exactly at w (clamp passes the gradient); (2) a bound one ulp from w with an
    advantage for which w * A and bound * A round to the same number, so that min() ties
    between a term with gradient and one without (autograd splits it in half)."""
    batch = make_batch(rng, dtype, t=64, ranks=4, adv_per_token=True)
    args = list(stage_args(batch, "rank", "rank", 0.0))
    adv, key, mask = args[3], args[4], args[7]
    w = torch_ratios(args)
    above = mask & (w > 1) & (w < 2)
    below = mask & (w < 1) & (w > 0.5)
    if not (bool(above.any()) and bool(below.any())):
        pytest.skip("this draw has no segment on both sides of 1")
    i_hi = torch.where(above, w, 0).argmax()  # far from 1: products round together more often
    i_lo = torch.where(below, w, 1).argmin()
    w_hi, k_hi = w.reshape(-1)[i_hi], key.reshape(-1)[i_hi]
    w_lo, k_lo = w.reshape(-1)[i_lo], key.reshape(-1)[i_lo]
    adv.masked_fill_(mask & (key == k_hi), 0.5)
    adv.masked_fill_(mask & (key == k_lo), -0.5)
    for delta in (None, float(w_hi)):  # (1) exactly on the bounds
        check_stage(args, ClipParams(1 - float(w_lo), float(w_hi) - 1, delta, 0.0), dtype,
                    f"exact delta={delta}")
    hi = torch.nextafter(w_hi, torch.zeros_like(w_hi))  # (2) one ulp inside the ratios
    lo = torch.nextafter(w_lo, torch.ones_like(w_lo))
    a_hi = collapsing_advantage(w_hi, hi, rng, dtype)
    a_lo = collapsing_advantage(w_lo, lo, rng, dtype)
    if a_hi is None or a_lo is None:
        pytest.skip("no advantage found whose products round together")
    adv.masked_fill_(mask & (key == k_hi), float(a_hi))
    adv.masked_fill_(mask & (key == k_lo), -float(a_lo))
    check_stage(args, ClipParams(1 - float(lo), float(hi) - 1, None, 0.0), dtype, "min tie")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_masked(rng, dtype):
    batch = make_batch(rng, dtype)
    batch["mask"] = torch.zeros_like(batch["mask"])
    batch["segment_ids"] = torch.full_like(batch["segment_ids"], -1)
    for beta in (0.0, 0.04):
        args = stage_args(batch, "rank", "rank", beta)
        loss, g, stats = native.segment_stage(*args, ClipParams(0.06, 0.08, None, beta))
        assert float(loss) == 0 and not bool(g.any())
        assert stats.tolist() == [0, 0, 0, 0, float("inf"), float("-inf"), 0]
        check_stage(args, ClipParams(0.06, 0.08, 1.1, beta), dtype, f"beta={beta}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_shared_across_rows(rng, dtype):
    """Keys need not be row-local or contiguous: a permuted key map takes the serial path."""
    batch = make_batch(rng, dtype, monotone=False)
    logp, old, ref, adv, key, num_keys, c, mask = stage_args(batch, "rank", "bnpo", 0.04)
    perm = torch.randperm(num_keys, generator=rng)
    args = (logp, old, ref, adv, torch.where(mask, perm[key], 0), num_keys, c, mask)
    check_stage(args, ClipParams(0.06, 0.08, None, 0.04), dtype, "permuted keys")


def test_threads_do_not_change_results(rng):
    batch = make_batch(rng, torch.float32, b=16, t=4096, ranks=20)
    args = stage_args(batch, "rank", "rank", 0.04)
    params = ClipParams(0.06, 0.08, 1.5, 0.04)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.segment_stage(*args, params)
        torch.set_num_threads(max(2, threads))
        many = native.segment_stage(*args, params)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


BAD_KEY_SCRIPT = """
import torch
from rankgrpo_kernels import native
from rankgrpo_kernels.segment_stage import ClipParams
x = -torch.rand(2, 5, dtype=torch.float64)
mask = torch.ones(2, 5, dtype=torch.bool)
key = torch.full((2, 5), 7)  # num_keys = 4
try:
    native.segment_stage(x, x, None, x, key, 4, x, mask, ClipParams(0.06, 0.08, None, 0.0))
except RuntimeError as e:
    print("RAISED", e)
"""


def test_bad_key_raises():
    """A masked key outside [0, num_keys) raises RuntimeError. Run in a subprocess: a build of
    the library against torch 2.11+cu130 once crashed (SIGSEGV) there instead of raising."""
    env = dict(os.environ, RANKGRPO_NATIVE_LIB=str(native.library_path()))
    run = subprocess.run([sys.executable, "-c", BAD_KEY_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, f"exit code {run.returncode}: {run.stderr[-2000:]}"
    assert "RAISED" in run.stdout and "is outside [0, num_keys=4)" in run.stdout, run.stdout


def public_loss(batch, backend, level, loss_type, beta, delta):
    logp = batch["logp"].detach().clone().requires_grad_(True)
    loss, metrics = rank_grpo_loss(logp, batch["old_logp"], batch["advantages"],
                                   batch["segment_ids"], batch["mask"],
                                   ref_logp=batch["ref_logp"], beta=beta, delta=delta,
                                   level=level, loss_type=loss_type, backend=backend,
                                   eos_mask=batch["eos_mask"],
                                   advantages_per=batch["advantages_per"])
    (g,) = torch.autograd.grad(loss, logp)
    return loss.detach(), g, metrics


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rank_grpo_loss_native_backend(rng, dtype):
    for level in LEVELS:
        for loss_type in AGGREGATIONS:
            batch = make_batch(rng, dtype)
            for beta, delta in ((0.0, None), (0.04, 1.05)):
                what = f"{level}/{loss_type} beta={beta} delta={delta}"
                loss, g, metrics = public_loss(batch, "native", level, loss_type, beta, delta)
                r_loss, r_g, r_metrics = public_loss(batch, "reference", level, loss_type,
                                                     beta, delta)
                scale = loss_scale(stage_args(batch, level, loss_type, beta))
                torch.testing.assert_close(loss, r_loss, rtol=TOL[dtype],
                                           atol=TOL[dtype] * scale, msg=f"{what} loss")
                assert_close(g, r_g, dtype, f"{what} dloss/dlogp")
                assert metrics.keys() == r_metrics.keys()
                for name in metrics:
                    assert_close(metrics[name], r_metrics[name], dtype, f"{what} {name}")


def fused_case(rng, dtype, backend, *, b=3, t=19, h=16, v=50, level="rank", loss_type="rank"):
    gen_state = rng.get_state()
    hidden = torch.randn(b, t, h, generator=rng, dtype=dtype)
    weight = torch.randn(v, h, generator=rng, dtype=dtype) / h**0.5
    bias = torch.randn(v, generator=rng, dtype=dtype)
    targets = torch.randint(0, v, (b, t), generator=rng)
    targets[1, -4:] = -100
    batch = make_batch(rng, dtype, b=b, t=t)
    rng.set_state(gen_state)  # the caller draws the same case for the other backend
    hidden, weight, bias = (x.requires_grad_(True) for x in (hidden, weight, bias))
    with torch.no_grad():
        old = batch["logp"]  # any fixed old/ref log-probs will do
    loss, metrics = fused_linear_rank_grpo_loss(
        hidden, weight, targets, old, batch["advantages"], batch["segment_ids"], batch["mask"],
        bias=bias, temperature=0.9, ref_logp=batch["ref_logp"], beta=0.04, delta=1.3,
        level=level, loss_type=loss_type, backend=backend, eos_mask=batch["eos_mask"])
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("level", LEVELS)
def test_fused_linear_native_backend(rng, level):
    """hidden -> loss through phase 1 (torch) and the native stage, against the reference
    pipeline (materialised logits, autograd) in float64 and the torch pipeline in float32."""
    for dtype, other in ((torch.float64, "reference"), (torch.float32, "torch")):
        loss, grads, metrics = fused_case(rng, dtype, "native", level=level)
        r_loss, r_grads, r_metrics = fused_case(rng, dtype, other, level=level)
        tol = 1e-10 if dtype == torch.float64 else 1e-5  # phase 1 differs at ~1e-14 in fp64
        torch.testing.assert_close(loss, r_loss, rtol=tol, atol=tol)  # |terms| sum to O(1)
        for name, x, y in zip(("hidden", "weight", "bias"), grads, r_grads):
            scale = float(y.abs().max())
            torch.testing.assert_close(x, y, rtol=tol, atol=tol * scale, msg=name)
        for name in r_metrics:
            torch.testing.assert_close(metrics[name], r_metrics[name], rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_op_parity(rng, dtype):
    """The CUDA kernel against the CPU stages (float64 reference / torch_stage) and against
    torch_stage on the GPU, small ragged batches and one large one, ties included."""
    if not native.cuda_compiled():
        pytest.skip("the native library was built without its CUDA kernel")
    cases = []
    for level in LEVELS:
        for loss_type in AGGREGATIONS:
            cases.append((make_batch(rng, dtype, monotone=level != "token"), level, loss_type))
    cases.append((make_batch(rng, dtype, b=32, t=2048, ranks=20), "rank", "bnpo"))
    cases.append((tie_batch(rng, dtype), "rank", "rank"))
    for batch, level, loss_type in cases:
        for beta, delta in ((0.0, None), (0.04, 1.03)):
            for eps in ((0.06, 0.08), (0.0, 0.0)):
                params = ClipParams(eps[0], eps[1], delta, beta)
                what = f"{level}/{loss_type} beta={beta} delta={delta} eps={eps}"
                args = stage_args(batch, level, loss_type, beta)
                cuda_args = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in args)
                loss, g, stats = native.segment_stage(*cuda_args, params)
                assert g.is_cuda and loss.is_cuda and stats.is_cuda
                t_loss, t_g, t_stats = torch_stage(*args, params)
                c_loss, c_g, c_stats = torch_stage(*cuda_args, params)
                for name, expected in (("cpu", (t_loss, t_g, t_stats)),
                                       ("cuda", (c_loss, c_g, c_stats))):
                    compare((loss.cpu(), g.cpu(), stats.cpu()), tuple(x.cpu() for x in expected),
                            args, dtype, f"{what} vs torch {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_public_api(rng):
    if not native.cuda_compiled():
        pytest.skip("the native library was built without its CUDA kernel")
    batch = make_batch(rng, torch.float64, device="cuda")
    for level in LEVELS:
        loss, g, metrics = public_loss(batch, "native", level, "rank", 0.04, 1.05)
        r_loss, r_g, r_metrics = public_loss(batch, "reference", level, "rank", 0.04, 1.05)
        assert_close(loss, r_loss, torch.float64, f"{level} loss")
        assert_close(g, r_g, torch.float64, f"{level} g")
        for name in metrics:
            assert_close(metrics[name], r_metrics[name], torch.float64, f"{level} {name}")
