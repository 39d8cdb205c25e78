"""The chunked torch backend against the float64 reference, on fresh random inputs."""

import itertools

import pytest
import torch
from _factory import make_batch, run_fused

import rankgrpo_kernels.logprobs_torch as lt
from rankgrpo_kernels import (
    AGGREGATIONS,
    LEVELS,
    LOSS_TYPE_TABLE,
    LOSS_TYPES,
    fused_linear_rank_grpo_loss,
    linear_logprobs,
    rank_grpo_loss,
)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 16-row chunks over a vocabulary of ~40: T*B > 16, so every test crosses chunk edges.
    monkeypatch.setattr(lt, "CHUNK_ELEMENTS", 16 * 40)
    monkeypatch.setattr(lt, "EXP_ROWS", 5)  # the entropy's exp slices do not divide a tile


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _compare(ours, ref, tol, rel):
    for key in ("loss", "dhidden", "dweight", "dbias"):
        if key not in ref:
            continue
        a, b = ours[key].double(), ref[key].double()
        err = _rel(a, b) if rel else (a - b).abs().max().item()
        assert err <= tol, f"{key}: error {err:.3g} > {tol:g}"
    for name, v in ref["metrics"].items():
        assert ours["metrics"][name].double().item() == pytest.approx(
            v.item(), rel=max(tol, 1e-9), abs=1e-9), name


@pytest.mark.parametrize("loss_type,level", list(itertools.product(LOSS_TYPES, LEVELS)))
@pytest.mark.parametrize("beta,off_policy", [(0.0, True), (0.04, True), (0.04, False)])
def test_float64_parity(rng, loss_type, level, beta, off_policy):
    batch = make_batch(rng, off_policy=off_policy, bias=level == "rank")
    kw = dict(loss_type=loss_type, level=level, beta=beta, num_segments=batch["num_ranks"] + 1)
    ref = run_fused(batch, "reference", **kw)
    ours = run_fused(batch, "torch", **kw)
    _compare(ours, ref, 1e-10, rel=False)


def _objective_scale(batch, **kw):
    """The size of the objective without cancellation: |L(|A|, beta=0)| + |L(A=0, beta)|.

    Each per-token term of the first is <= 0 and of the second (the KL) >= 0, so neither sum
    cancels; the loss itself may (a sum of +-A terms near 5e-4), and an error relative to it
    measures the cancellation, not the kernel.
    """
    beta = kw.pop("beta", 0.0)
    pos = dict(batch, advantages=batch["advantages"].abs())
    zero = dict(batch, advantages=torch.zeros_like(batch["advantages"]))
    surrogate = run_fused(pos, "reference", grads=False, beta=0.0, **kw)["loss"]
    kl = run_fused(zero, "reference", grads=False, beta=beta, **kw)["loss"]
    return (surrogate.abs() + kl.abs()).item()


@pytest.mark.parametrize("loss_type,level", [("bnpo", "rank"), ("rank", "rank"),
                                             ("grpo", "sequence"), ("dr_grpo", "token")])
def test_float32_parity(rng, loss_type, level):
    """float32 inputs: gradients within 1e-5 of the float64 reference relative to their norm,
    the loss within 1e-5 of the objective's scale (see `_objective_scale`)."""
    batch64 = make_batch(rng, bias=True)
    batch32 = dict(batch64)
    for k in ("hidden", "weight", "bias"):
        batch32[k] = batch64[k].float()
    kw = dict(loss_type=loss_type, level=level, beta=0.04, temperature=0.7, delta=1.5)
    ref = run_fused(batch64, "reference", **kw)
    ours = run_fused(batch32, "torch", **kw)
    scale = _objective_scale(batch64, **kw)
    err = abs(ours["loss"].double().item() - ref["loss"].item()) / max(scale, 1e-30)
    assert err <= 1e-5, f"loss: error {err:.3g} of the objective's scale {scale:.3g} > 1e-5"
    _compare(dict(ours, loss=ref["loss"]), ref, 1e-5, rel=True)


def test_gradcheck_through_fused_loss(rng):
    batch = make_batch(rng, B=2, T=5, H=4, V=11, bias=True)
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    b = batch["bias"].clone().requires_grad_()

    def f(h, w, b):
        return fused_linear_rank_grpo_loss(
            h, w, batch["targets"], batch["old_logp"], batch["advantages"],
            batch["segment_ids"], batch["mask"], bias=b, ref_logp=batch["ref_logp"], beta=0.1,
            temperature=1.3, num_segments=batch["num_ranks"] + 1, eos_mask=batch["eos_mask"],
            backend="torch")[0]

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7)


def test_on_policy_ratio_is_exactly_one(rng):
    batch = make_batch(rng, off_policy=False, dtype=torch.float32)
    out = run_fused(batch, "torch")
    m = out["metrics"]
    assert m["importance_ratio/min"].item() == 1.0
    assert m["importance_ratio/max"].item() == 1.0
    assert m["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_invariance_bitwise(rng, dtype):
    h = torch.randn(16, 9, 24, generator=rng).to(dtype)
    w = torch.randn(61, 24, generator=rng).to(dtype)
    y = torch.randint(0, 61, (16, 9), generator=rng)
    full = linear_logprobs(h, w, y, backend="torch")
    for i in (0, 7, 15):
        one = linear_logprobs(h[i:i + 1], w, y[i:i + 1], backend="torch")
        assert torch.equal(one[0], full[i]), f"row {i} differs between batch 1 and 16"
    hg = h.clone().requires_grad_()
    with_grad = linear_logprobs(hg, w, y, backend="torch")
    assert torch.equal(with_grad.detach(), full)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_split_invariance_with_global_normalizer(rng, loss_type):
    batch = make_batch(rng, B=6, bias=False)
    m = batch["mask"]
    seg = batch["segment_ids"]
    pairs = sum(len(torch.unique(seg[i][m[i]])) for i in range(6))
    # the whole batch's denominator per aggregation (docs/math.md sections 7, 7.1)
    norm = {"bnpo": m.sum().item(), "grpo": 6, "dr_grpo": 6 * m.shape[1], "rank": pairs,
            "luspo": 6}
    assert set(norm) == set(AGGREGATIONS)
    kw = dict(loss_type=loss_type, normalizer=float(norm[LOSS_TYPE_TABLE[loss_type][0]]),
              beta=0.02,
              num_segments=batch["num_ranks"] + 1)
    whole = run_fused(batch, "torch", **{k: v for k, v in kw.items() if k != "normalizer"})
    parts = []
    for sl in (slice(0, 2), slice(2, 6)):
        part = {k: (v[sl] if isinstance(v, torch.Tensor) and k not in ("weight", "bias")
                    else v) for k, v in batch.items()}
        parts.append(run_fused(part, "torch", **kw))
    torch.testing.assert_close(parts[0]["loss"] + parts[1]["loss"], whole["loss"],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts[0]["dweight"] + parts[1]["dweight"], whole["dweight"],
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([parts[0]["dhidden"], parts[1]["dhidden"]]),
                               whole["dhidden"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (3, 17, 5, 33), (2, 31, 7, 129)])
def test_adversarial_shapes(rng, shape):
    B, T, H, V = shape
    batch = make_batch(rng, B=B, T=T, H=H, V=V, bias=True)
    ref = run_fused(batch, "reference", temperature=0.5)
    ours = run_fused(batch, "torch", temperature=0.5)
    _compare(ours, ref, 1e-10, rel=False)


def test_strongly_negative_logits_and_peaked_softmax(rng):
    batch = make_batch(rng, V=50)
    batch["weight"] = batch["weight"] * 40 - 30  # logits around -1000s, very peaked
    batch["bias"] = None
    ref = run_fused(batch, "reference")
    ours = run_fused(batch, "torch")
    assert torch.isfinite(ours["loss"])
    _compare(ours, ref, 1e-9, rel=True)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_all_masked_gives_zero_loss_and_grads(rng, backend):
    batch = make_batch(rng)
    batch["mask"] = torch.zeros_like(batch["mask"])
    out = run_fused(batch, backend, beta=0.1)
    assert out["loss"].item() == 0.0
    assert not out["dhidden"].any() and not out["dweight"].any()
    assert all(torch.isfinite(v) for v in out["metrics"].values())


def test_empty_and_length_one_segments(rng):
    logp = torch.randn(2, 6, generator=rng, dtype=torch.float64).requires_grad_()
    old = logp.detach() + 0.05 * torch.randn(2, 6, generator=rng, dtype=torch.float64)
    seg = torch.tensor([[0, 2, 2, 2, 5, -1], [1, 1, 3, 4, 4, 4]])  # 1 and 3 empty in row 0
    mask = seg >= 0
    adv = torch.randn(2, 5, generator=rng, dtype=torch.float64)
    eos = torch.zeros_like(mask)  # truncated rows: no EOS token
    for lt_ in LOSS_TYPES:
        outs = []
        for backend in ("reference", "torch"):
            loss, _ = rank_grpo_loss(logp, old, adv, seg, mask, loss_type=lt_,
                                     eos_mask=eos, backend=backend)
            outs.append((loss, torch.autograd.grad(loss, logp)[0]))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("delta", [None, 1.08, 1.2])
@pytest.mark.parametrize("A", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("w", [1.06, 0.94, 1.08, 0.92, 1.2, 1.5, 0.5])
def test_clip_boundaries_match_autograd(A, w, delta):
    # Ratios exactly at, inside and outside the bounds: closed form == autograd, ties too.
    logp = torch.full((1, 1), -1.0, dtype=torch.float64, requires_grad=True)
    # these w survive the log/exp round trip exactly, so the bounds are hit exactly
    old = logp.detach() - torch.tensor([[w]], dtype=torch.float64).log()
    adv = torch.tensor([[A]], dtype=torch.float64)
    grads = []
    for backend in ("reference", "torch"):
        loss, _ = rank_grpo_loss(logp, old, adv, None, torch.ones(1, 1, dtype=torch.bool),
                                 level="token", epsilon_low=0.06, epsilon_high=0.08,
                                 delta=delta, backend=backend)
        grads.append(torch.autograd.grad(loss, logp)[0])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_entropy_and_its_gradient(rng, temperature):
    h = torch.randn(3, 19, 6, generator=rng, dtype=torch.float64)
    w = torch.randn(45, 6, generator=rng, dtype=torch.float64)
    b = torch.randn(45, generator=rng, dtype=torch.float64)
    y = torch.randint(0, 45, (3, 19), generator=rng)
    y[1, 3] = -100
    a = torch.randn(3, 19, generator=rng, dtype=torch.float64)
    c = torch.randn(3, 19, generator=rng, dtype=torch.float64)
    out = {}
    for backend in ("reference", "torch"):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        logp, ent = linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2],
                                    temperature=temperature, return_entropy=True,
                                    backend=backend)
        (logp * a + ent * c).sum().backward()
        out[backend] = [logp, ent] + [x.grad for x in leaves]
    for r, o in zip(out["reference"], out["torch"]):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-10)
    assert out["torch"][1][1, 3] == 0 and out["torch"][0][1, 3] == 0
