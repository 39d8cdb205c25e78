"""The loss contract owned by rankgrpo_kernels (docs/math.md sections 5-9): per-token
advantages with an explicit EOS, the denominator, raw metric sums, the meaning of the
advantages' shape, option names, backend selection, and the edge cases of issue 13."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch

import rankgrpo_kernels as rk
from rankgrpo_kernels import (
    ADVANTAGES_PER,
    AGGREGATIONS,
    BACKENDS,
    LEVELS,
    LOSS_TYPE_TABLE,
    LOSS_TYPES,
    LengthShaping,
    backends,
    check_delta,
    eos_mask_from_ids,
    fused_linear_rank_grpo_loss,
    logprobs_torch,
    logprobs_triton,
    loss_normalizer,
    metrics_from_sums,
    native,
    rank_grpo_loss,
    reduce_sums,
    token_advantages,
)
from rankgrpo_kernels.contract import Phase1Backend

PHASE1 = ["reference", "torch", "triton"]  # triton runs through the interpreter on a CPU
ALL = PHASE1 + (["native"] if native.available() else [])


def ragged(rng, B, T, N, *, p_newline=0.25):
    """mask with ragged lengths (row 0 full), newline-mode segment ids with overflow, an
    eos_mask at the last token of rows that ended (shorter rows; row 0 by a coin flip)."""
    lengths = torch.randint(1, T + 1, (B,), generator=rng)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    nl = (torch.rand(B, T, generator=rng) < p_newline).long() * mask
    seg = torch.where(mask, (torch.cumsum(nl, 1) - nl).clamp(max=N), -1)
    ended = (lengths < T) | (torch.rand(B, generator=rng) < 0.5)
    eos = (torch.arange(T).unsqueeze(0) == (lengths - 1).unsqueeze(1)) & ended.unsqueeze(1)
    return mask, seg, eos


# ----------------------------------------------------------------- docs/math.md section 5

def test_eos_of_a_b_gets_zero():
    # "A\nB<eos>" with N = 2, A = [0.5, -1]: tokens A, "\n" (item 0), B (item 1), EOS.
    newline_counts = torch.tensor([0, 1, 0, 0])  # ids: 0 = "A", 1 = "\n", 2 = "B", 3 = EOS
    ids = torch.tensor([[0, 1, 2, 3]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    seg = rk.segment_ids_from_newlines(ids, mask, newline_counts, num_ranks=2)
    assert seg.tolist() == [[0, 0, 1, 1]]  # EOS sits in the last item's segment
    eos = eos_mask_from_ids(ids, mask, 3)
    assert eos.tolist() == [[False, False, False, True]]
    A = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    adv = token_advantages(A, seg, mask, eos)
    assert adv.tolist() == [[0.5, 0.5, -1.0, 0.0]]
    # With shaping: 2 items == N, ended with EOS, no overflow -> the exact-length bonus.
    shaped = token_advantages(A, seg, mask, eos, shaping=LengthShaping())
    assert shaped.tolist() == [[0.5, 0.5, -1.0, 0.1]]
    # The loss (on-policy, bnpo over 4 tokens, w = 1): l_t = -A_t, so
    # loss = -(0.5 + 0.5 - 1 + 0) / 4 = 0 (with the EOS read as item 1: 0.25).
    # Token level: dL/dlogp_t = -A_t / 4 -> [-1/8, -1/8, 1/4, 0]: no gradient at the EOS.
    # Rank level: segment k = {B, EOS} shares w_k, g_s = (w_k / n_k) sum_{t in k} c_t (-A_t)
    # = (1/2)(1/4)(1 + 0) = 1/8 on both (with the EOS read as item 1: 1/4 on both).
    expected = {"token": [[-0.125, -0.125, 0.25, 0.0]], "rank": [[-0.125, -0.125, 0.125, 0.125]]}
    for backend, level in itertools.product(ALL, expected):
        logp = torch.tensor([[-1.0, -0.5, -2.0, -0.1]], dtype=torch.float64,
                            requires_grad=True)
        loss, _ = rank_grpo_loss(logp, None, A, seg, mask, eos_mask=eos, level=level,
                                 backend=backend)
        (g,) = torch.autograd.grad(loss, logp)
        assert loss.item() == 0.0, (backend, level)
        assert g.tolist() == expected[level], (backend, level)


def test_per_row_advantages_reach_every_token_including_eos():
    seg = torch.tensor([[0, 0, 1, 1, -1]])
    mask = seg >= 0
    eos = torch.tensor([[0, 0, 0, 1, 0]], dtype=torch.bool)
    adv = token_advantages(torch.tensor([0.7]), seg, mask, eos)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([[0.7, 0.7, 0.7, 0.7, 0.0]]))
    with pytest.raises(ValueError, match="num_ranks"):
        token_advantages(torch.tensor([0.7]), seg, mask, eos, shaping=LengthShaping())
    # N = 3: 2 items ended with EOS -> short list, -0.1 on the EOS token.
    shaped = token_advantages(torch.tensor([0.7]), seg, mask, eos, shaping=LengthShaping(),
                              num_ranks=3)
    torch.testing.assert_close(shaped, torch.tensor([[0.7, 0.7, 0.7, 0.6, 0.0]]))


def test_length_shaping_hand_cases():
    s = LengthShaping(overflow_penalty=-0.25, short_eos_penalty=-0.5, exact_eos_bonus=0.75)
    A = torch.tensor([[1.0, 2.0]] * 4, dtype=torch.float64)
    seg = torch.tensor([[0, 1, 1, -1],    # exact: 2 items, EOS, no overflow -> +0.75 at EOS
                        [0, 0, 0, -1],    # short: 1 item, EOS -> -0.5 at EOS
                        [0, 1, 2, 2],     # overflow (id 2 = N): -0.25 each; EOS gets no bonus
                        [0, 0, 1, 1]])    # truncated (no EOS): nothing
    mask = seg >= 0
    eos = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    got = token_advantages(A, seg, mask, eos, shaping=s)
    want = torch.tensor([[1.0, 2.0, 0.75, 0.0],
                         [1.0, 1.0, -0.5, 0.0],
                         [1.0, 2.0, -0.25, -0.25],
                         [1.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    assert torch.equal(got, want)
    # aligned mode: the parsed item count overrides the EOS segment's (row 0 had 1 item).
    got = token_advantages(A, seg, mask, eos, shaping=s, num_items=torch.tensor([1, 1, 3, 2]))
    assert got[0, 2].item() == -0.5 and got[1, 2].item() == -0.5
    with pytest.raises(ValueError, match="num_items"):
        token_advantages(A, seg, mask, eos, shaping=s, num_items=torch.tensor([1, 1]))
    # eos_mask=None: every row truncated -> no EOS term, the last token keeps its item's A.
    got = token_advantages(A, seg, mask, None, shaping=s)
    assert got[0, 2].item() == 2.0 and got[1, 2].item() == 1.0


def test_token_advantages_match_an_independent_loop(rng):
    B, T, N = 6, 17, 3
    mask, seg, eos = ragged(rng, B, T, N)
    A = torch.randn(B, N, generator=rng, dtype=torch.float64)
    shaping = LengthShaping()
    got = token_advantages(A, seg, mask, eos, shaping=shaping)
    for b in range(B):
        ended = bool(eos[b].any())
        items = int(seg[b][eos[b]].item()) + 1 if ended else int(seg[b].max()) + 1
        overflow_row = bool(((seg[b] >= N) & mask[b]).any())
        for t in range(T):
            s = int(seg[b, t])
            if not mask[b, t]:
                want = 0.0
            elif eos[b, t]:
                want = (shaping.short_eos_penalty if items < N else 0.0) + (
                    shaping.exact_eos_bonus if items == N and not overflow_row else 0.0)
                want += shaping.overflow_penalty if s >= N else 0.0
            elif s >= N:
                want = shaping.overflow_penalty
            else:
                want = float(A[b, s])
            assert got[b, t].item() == pytest.approx(want, abs=1e-15), (b, t)


def test_trainer_rule_equals_kernel_rule(rng):
    """rankgrpo.shaping (the trainer's import) and the kernel give the same advantages."""
    shaping_mod = pytest.importorskip("rankgrpo.shaping")
    B, T, N = 5, 23, 4
    mask, seg, eos = ragged(rng, B, T, N)
    A = torch.randn(B, N, generator=rng)
    for sh in (None, LengthShaping()):
        theirs = shaping_mod.token_advantages(A, seg, mask, eos, shaping=sh)
        assert torch.equal(token_advantages(A, seg, mask, eos, shaping=sh), theirs)


@pytest.mark.parametrize("backend", ALL)
def test_quickstart_equals_trainer_path(rng, backend):
    """Per-rank advantages + eos_mask into the fused loss (the README quickstart) give the same
    loss and gradients as the trainer's path: per-token advantages from token_advantages, then
    the loss with advantages_per="token" (float64, every backend against the reference)."""
    B, T, H, V, N = 4, 15, 8, 29, 3
    mask, seg, eos = ragged(rng, B, T, N)
    h = torch.randn(B, T, H, generator=rng, dtype=torch.float64)
    w = torch.randn(V, H, generator=rng, dtype=torch.float64) / H ** 0.5
    y = torch.randint(0, V, (B, T), generator=rng)
    A = torch.randn(B, N, generator=rng, dtype=torch.float64)
    old = -torch.rand(B, T, generator=rng, dtype=torch.float64) * 3
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    results = {}
    for path in ("quickstart", "trainer"):
        hh = h.to(dtype).requires_grad_()
        ww = w.to(dtype).requires_grad_()
        if path == "quickstart":
            kw = dict(eos_mask=eos)
            adv = A
        else:
            adv = token_advantages(A, seg, mask, eos)
            kw = dict(advantages_per="token")
        loss, _ = fused_linear_rank_grpo_loss(hh, ww, y, old, adv, seg, mask,
                                              num_segments=N + 1, backend=backend, **kw)
        loss.backward()
        results[path] = (loss.detach().double(), hh.grad.double(), ww.grad.double())
    for a, b in zip(results["quickstart"], results["trainer"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # ... and against the float64 reference pipeline, and the module form.
    ref_loss, _ = fused_linear_rank_grpo_loss(h, w, y, old, A, seg, mask, eos_mask=eos,
                                              backend="reference")
    torch.testing.assert_close(results["quickstart"][0], ref_loss.detach(), rtol=tol, atol=tol)
    module = rk.LinearRankGRPOLoss(num_segments=N + 1, backend=backend)
    mod_loss, _ = module(h.to(dtype), w.to(dtype), y, old, A, seg, mask, eos_mask=eos)
    torch.testing.assert_close(mod_loss.double(), results["quickstart"][0], rtol=0, atol=0)


# ----------------------------------------------------------------- docs/math.md section 7

def _pairs(mask, seg):
    return sum(len(torch.unique(seg[b][mask[b]])) for b in range(mask.shape[0]))


def test_loss_normalizer_counts(rng):
    B, T, N = 7, 19, 4
    mask, seg, _ = ragged(rng, B, T, N)
    mask[3] = False  # an empty row
    # per aggregation (docs/math.md sections 7, 7.1); a new one needs its count here
    want = {"bnpo": int(mask.sum()), "grpo": B, "dr_grpo": B * T, "rank": _pairs(mask, seg),
            "luspo": B}
    assert set(want) == set(AGGREGATIONS)
    for lt in LOSS_TYPES:
        d = loss_normalizer(mask, seg, lt)
        assert d.dtype == torch.float64 and d.shape == ()
        assert d.item() == want[LOSS_TYPE_TABLE[lt][0]], lt
    assert loss_normalizer(mask, None, "dr_grpo", max_completion_length=64).item() == B * 64
    # not clamped: an all-masked micro-batch contributes 0 to the global sum
    for lt in ("bnpo", "rank"):
        assert loss_normalizer(torch.zeros_like(mask), seg, lt).item() == 0.0
    # ids above num_segments - 1 share the last (overflow) bin
    wide = torch.where(seg == N, seg + torch.randint(0, 3, seg.shape, generator=rng), seg)
    assert loss_normalizer(mask, wide, "rank", num_segments=N + 1).item() == want["rank"]
    with pytest.raises(ValueError, match="segment_ids"):
        loss_normalizer(mask, None, "rank")
    with pytest.raises(ValueError, match="loss_type"):
        loss_normalizer(mask, seg, "sum")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_global_normalizer_is_the_sum_of_local_ones(rng, loss_type):
    """Sum of loss_normalizer over micro-batches as `normalizer`: the micro-batch losses add
    up to the whole batch's loss (what the trainer does across processes)."""
    B, T, N = 6, 13, 3
    mask, seg, eos = ragged(rng, B, T, N)
    logp = -torch.rand(B, T, generator=rng, dtype=torch.float64) * 3
    old = logp + 0.1 * torch.randn(B, T, generator=rng, dtype=torch.float64)
    A = torch.randn(B, N, generator=rng, dtype=torch.float64)
    kw = dict(loss_type=loss_type, num_segments=N + 1, epsilon_low=0.1, epsilon_high=0.1)
    whole, _ = rank_grpo_loss(logp, old, A, seg, mask, eos_mask=eos, **kw)
    parts = [slice(0, 2), slice(2, 3), slice(3, 6)]
    total = sum(loss_normalizer(mask[p], seg[p], loss_type, num_segments=N + 1) for p in parts)
    assert total.item() == loss_normalizer(mask, seg, loss_type).item()
    summed = sum(rank_grpo_loss(logp[p], old[p], A[p], seg[p], mask[p], eos_mask=eos[p],
                                normalizer=total, **kw)[0] for p in parts)
    torch.testing.assert_close(summed, whole, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------- docs/math.md section 9

def test_metric_sums_reduce_to_the_whole_batch_means(rng):
    B, T, N = 6, 11, 3
    mask, seg, eos = ragged(rng, B, T, N)
    logp = -torch.rand(B, T, generator=rng, dtype=torch.float64) * 3
    old = logp + 0.2 * torch.randn(B, T, generator=rng, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(B, T, generator=rng, dtype=torch.float64)
    ent = torch.rand(B, T, generator=rng, dtype=torch.float64)
    A = torch.randn(B, N, generator=rng, dtype=torch.float64)
    kw = dict(ref_logp=ref, beta=0.05, num_segments=N + 1)
    _, means = rank_grpo_loss(logp, old, A, seg, mask, eos_mask=eos, entropy=ent, **kw)
    _, sums = rank_grpo_loss(logp, old, A, seg, mask, eos_mask=eos, entropy=ent,
                             return_sums=True, **kw)
    assert set(sums) == set(rk.SUM_KEYS)
    assert all(v.shape == () for v in sums.values())
    m = mask
    assert sums["num_tokens"].item() == m.sum().item()
    # entropy mean is the masked mean; the stats match an independent computation
    assert sums["entropy_sum"].item() == pytest.approx(ent[m].sum().item(), rel=1e-14)
    for k, v in metrics_from_sums(sums).items():
        assert torch.equal(v, means[k]), k
    # micro-batches (one of them empty) reduced once give the whole batch's means
    parts = [slice(0, 2), slice(2, 2), slice(2, 6)]
    got = [rank_grpo_loss(logp[p], old[p], A[p], seg[p], mask[p], eos_mask=eos[p],
                          entropy=ent[p], return_sums=True, validate=False,
                          ref_logp=ref[p], beta=0.05, num_segments=N + 1)[1] for p in parts]
    assert got[1]["ratio_min"].item() == math.inf and got[1]["ratio_max"].item() == -math.inf
    merged = metrics_from_sums(reduce_sums(got))
    for k, v in means.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-12, atol=1e-14, msg=k)
    # an empty step: ratio metrics are 1, fractions 0, nothing NaN
    empty = metrics_from_sums(got[1])
    assert empty["importance_ratio/mean"].item() == 1.0 and empty["kl"].item() == 0.0
    assert all(torch.isfinite(v) for v in empty.values())
    with pytest.raises(ValueError, match="clip_low"):
        metrics_from_sums({"num_tokens": torch.tensor(1.0)})


def test_no_host_sync_with_validate_false(rng, monkeypatch):
    """With validate=False and num_segments known, the loss and its sums never read a value
    back to the host (every Tensor -> Python conversion raises here)."""
    B, T, H, V, N = 3, 9, 6, 17, 2
    mask, seg, eos = ragged(rng, B, T, N)
    h = torch.randn(B, T, H, generator=rng, requires_grad=True)
    w = torch.randn(V, H, generator=rng, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=rng)
    A = torch.randn(B, N, generator=rng)
    old = -torch.rand(B, T, generator=rng)

    def sync(*_a, **_k):
        raise AssertionError("host sync")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for loss_type in LOSS_TYPES:
        loss, sums = fused_linear_rank_grpo_loss(
            h, w, y, old, A, seg, mask, eos_mask=eos, loss_type=loss_type, ref_logp=old,
            beta=0.01, num_segments=N + 1, backend="torch", validate=False, return_sums=True)
        loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()


# ----------------------------------------------------------------- the advantages' meaning

def test_advantages_per_resolves_the_n_equals_t_ambiguity(rng):
    B, T = 3, 4
    seg = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 4], [0, 1, 1, -1]])
    mask = seg >= 0
    eos = torch.zeros_like(mask)
    logp = -torch.rand(B, T, generator=rng, dtype=torch.float64)
    old = logp + 0.05 * torch.randn(B, T, generator=rng, dtype=torch.float64)
    A = torch.randn(B, T, generator=rng, dtype=torch.float64)  # N == T == 4
    with pytest.raises(ValueError, match="advantages_per"):
        rank_grpo_loss(logp, old, A, seg, mask, eos_mask=eos)
    as_token, _ = rank_grpo_loss(logp, old, A, seg, mask, advantages_per="token")
    as_rank, _ = rank_grpo_loss(logp, old, A, seg, mask, eos_mask=eos, advantages_per="rank")
    gathered = token_advantages(A, seg, mask, eos)
    assert torch.equal(rank_grpo_loss(logp, old, gathered, seg, mask,
                                      advantages_per="token")[0], as_rank)
    assert not torch.equal(as_token, as_rank)
    # without segment ids a [B, T] tensor can only be per token
    inferred, _ = rank_grpo_loss(logp, old, A, None, mask, level="token")
    assert torch.equal(inferred, rank_grpo_loss(logp, old, A, None, mask, level="token",
                                                advantages_per="token")[0])
    # per row: [B]
    row, _ = rank_grpo_loss(logp, old, A[:, 0], seg, mask)
    same, _ = rank_grpo_loss(logp, old, A[:, :1].expand(B, T), seg, mask,
                             advantages_per="token")
    assert torch.equal(row, same)


@pytest.mark.parametrize("kw,adv_shape,words", [
    (dict(advantages_per="rank"), (3,), "advantages_per='rank' expects [3, N]"),
    (dict(advantages_per="row"), (3, 2), "advantages_per='row' expects [3]"),
    (dict(advantages_per="token"), (3, 2), "advantages_per='token' expects (3, 5)"),
    (dict(advantages_per="item"), (3, 2), "advantages_per='item' is not one of"),
    (dict(), (3, 2), "need eos_mask"),
    (dict(), (2, 2), "per row [3]"),
    (dict(beta=0.1), (3,), "beta=0.1 > 0 needs ref_logp"),
    (dict(delta=1.0), (3,), "delta must be None or a finite number > 1"),
    (dict(delta=0.5), (3,), "delta"),
])
def test_loss_rejects(kw, adv_shape, words):
    seg = torch.tensor([[0, 0, 1, 1, 2]] * 3)
    logp = torch.zeros(3, 5)
    adv = torch.ones(adv_shape)
    with pytest.raises(ValueError) as info:
        rank_grpo_loss(logp, None, adv, seg, torch.ones(3, 5, dtype=torch.bool), **kw)
    assert words in str(info.value)


def test_check_delta():
    assert check_delta(None) is None
    assert check_delta(1.5) == 1.5 and check_delta(2) == 2.0
    for bad in (1.0, 0.9, 0.0, -1.0, math.inf, math.nan, True, "1.5"):
        with pytest.raises(ValueError, match="grpo.delta"):
            check_delta(bad, name="grpo.delta")
    assert rk.DELTA_MIN == 1.0


# ----------------------------------------------------------------- option names, backends

def test_enumerations_have_one_source():
    from rankgrpo_kernels import backends as be
    from rankgrpo_kernels import contract, loss, segments, variants

    assert loss.LOSS_TYPES is contract.LOSS_TYPES is LOSS_TYPES
    assert variants.LOSS_TYPE_TABLE is contract.LOSS_TYPE_TABLE is LOSS_TYPE_TABLE
    assert LOSS_TYPES == tuple(LOSS_TYPE_TABLE)
    # each aggregation is the plain (clip) loss type of itself; every default surrogate exists
    assert set(AGGREGATIONS) == {agg for agg, _ in LOSS_TYPE_TABLE.values()}
    assert all(LOSS_TYPE_TABLE[agg] == (agg, "clip") for agg in AGGREGATIONS)
    assert all(sur in variants.SURROGATES for _, sur in LOSS_TYPE_TABLE.values())
    assert segments.LEVELS is contract.LEVELS is LEVELS
    assert be.BACKENDS is contract.BACKENDS is BACKENDS
    assert ADVANTAGES_PER == ("token", "rank", "row")
    logp = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    for level, loss_type in itertools.product(LEVELS, LOSS_TYPES):  # every name is accepted
        rank_grpo_loss(logp, None, torch.ones(1), torch.zeros(1, 3, dtype=torch.long), mask,
                       level=level, loss_type=loss_type, backend="torch")
    for name, value in (("level", "item"), ("loss_type", "sum"), ("backend", "cuda")):
        with pytest.raises(ValueError, match=name):
            rank_grpo_loss(logp, None, torch.ones(1), None, mask,
                           **{"level": "token", name: value})


def test_phase1_modules_follow_the_protocol(rng):
    for mod in (logprobs_torch, logprobs_triton):
        assert isinstance(mod, Phase1Backend)
        for fn in ("forward", "backward"):
            want = list(inspect.signature(getattr(Phase1Backend, fn)).parameters)[1:]
            assert list(inspect.signature(getattr(mod, fn)).parameters) == want, (mod, fn)
    h = torch.randn(5, 8, generator=rng)
    w = torch.randn(13, 8, generator=rng)
    y = torch.randint(0, 13, (5,), generator=rng)
    _, state_t, _ = logprobs_torch.forward(h, w, y, None, 0.7, False)
    _, state_x, _ = logprobs_triton.forward(h, w, y, None, 0.7, False)
    assert state_t.shape == (5,) and state_x.shape == (2, 5)
    # Triton's (m, log2 s) is the same log-sum-exp: lse = m / temperature + ln2 * log2 s.
    torch.testing.assert_close(state_x[0] / 0.7 + math.log(2) * state_x[1], state_t,
                               rtol=1e-5, atol=1e-5)


def test_backend_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    for has_native in (True, False):
        monkeypatch.setattr(backends, "native_cuda_available", lambda v=has_native: v)
        monkeypatch.setattr(backends, "native_available", lambda v=has_native: v)
        assert backends.phase2_name("auto", cuda) == ("native" if has_native else "torch")
        assert backends.phase2_name("auto", cpu) == "torch"
        assert backends.phase1_name("auto", cuda) == "triton"
        assert backends.phase1_name("auto", cpu) == "torch"
        assert backends.phase2_name("triton", cuda) == "torch"  # no Triton segment stage
        assert backends.phase2_name("torch", cuda) == "torch"
        assert backends.phase2_name("reference", cuda) == "reference"
        assert backends.phase1_name("native", cuda) == "triton"
        assert backends.phase1_name("native", cpu) == "torch"
    # built without its CUDA kernel: auto stays with torch on CUDA
    monkeypatch.setattr(backends, "native_available", lambda: True)
    monkeypatch.setattr(backends, "native_cuda_available", lambda: False)
    assert backends.phase2_name("auto", cuda) == "torch"
    monkeypatch.setattr(backends, "native_available", lambda: False)
    with pytest.raises(RuntimeError, match="native"):
        backends.phase2_name("native", cpu)
    with pytest.raises(ValueError, match="backend"):
        backends.phase2_name("segment_triton", cpu)


def test_auto_backend_accepts_every_loss_type(rng, monkeypatch):
    """Where "auto" picks the native stage (CUDA with the op library), a loss type whose
    surrogate that stage lacks runs on torch's stage instead of raising; "native" itself
    refuses it by name. Simulated on the CPU: phase2_name answers "native" for "auto"."""
    B, T, N = 3, 8, 2
    mask, seg, eos = ragged(rng, B, T, N)
    logp = -torch.rand(B, T, generator=rng, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(B, T, generator=rng, dtype=torch.float64)
    A = torch.randn(B, N, generator=rng, dtype=torch.float64)
    kw = dict(eos_mask=eos, num_segments=N + 1)
    want = {lt: rank_grpo_loss(logp, old, A, seg, mask, loss_type=lt, backend="torch", **kw)[0]
            for lt in LOSS_TYPES}
    real = backends.phase2_name
    monkeypatch.setattr(backends, "phase2_name",
                        lambda b, d: "native" if b == "auto" else real(b, d))
    variant_types = [lt for lt in LOSS_TYPES if LOSS_TYPE_TABLE[lt][1] != "clip"]
    assert variant_types  # cispo, sapo, vespo today
    for lt in variant_types:
        got, _ = rank_grpo_loss(logp, old, A, seg, mask, loss_type=lt, backend="auto", **kw)
        assert torch.equal(got, want[lt]), lt
        if native.available():
            with pytest.raises(ValueError, match="backend='native'"):
                rank_grpo_loss(logp, old, A, seg, mask, loss_type=lt, backend="native", **kw)


# ----------------------------------------------------------------- edge cases (issue 13)

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_batch_gives_zero_loss_and_gradients(backend, shape):
    B, T = shape
    h = torch.randn(B, T, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 11, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    seg = torch.zeros(B, T, dtype=torch.long)
    for lt in AGGREGATIONS if backend == "native" else LOSS_TYPES:  # native: plain loss only
        loss, met = fused_linear_rank_grpo_loss(
            h, w, y, None, torch.randn(B, 2), seg, mask, eos_mask=torch.zeros_like(mask),
            ref_logp=torch.zeros(B, T), beta=0.1, loss_type=lt, backend=backend)
        loss.backward()
        assert loss.item() == 0.0
        assert h.grad.shape == h.shape and not w.grad.any()
        assert all(torch.isfinite(v) for v in met.values())
        assert met["num_tokens"].item() == 0


@pytest.mark.parametrize("backend", PHASE1)
@pytest.mark.parametrize("validate", [True, False])
def test_nan_hidden_at_masked_and_ignored_positions(rng, backend, validate):
    B, T, H, V, N = 3, 9, 8, 23, 2
    mask, seg, eos = ragged(rng, B, T, N)
    dtype = torch.float32 if backend == "triton" else torch.float64
    h = torch.randn(B, T, H, generator=rng, dtype=torch.float64)
    w = torch.randn(V, H, generator=rng, dtype=torch.float64) / H ** 0.5
    y = torch.randint(0, V, (B, T), generator=rng)
    y[0, 2] = -100  # an ignored target inside a masked row
    A = torch.randn(B, N, generator=rng, dtype=torch.float64)
    dead = ~mask | (y == -100)
    assert dead.any()
    poisoned = h.clone()
    poisoned[dead] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64).repeat(
        H)[:H]
    clean = torch.where(dead.unsqueeze(-1), 0.0, h)  # what the masked rows hold must not matter
    out = {}
    for name, x, be in (("ours", poisoned, backend), ("ref", clean, "reference")):
        xx = x.to(dtype if name == "ours" else torch.float64).requires_grad_()
        ww = w.to(dtype if name == "ours" else torch.float64).requires_grad_()
        loss, met = fused_linear_rank_grpo_loss(xx, ww, y, None, A, seg, mask, eos_mask=eos,
                                                num_segments=N + 1, backend=be,
                                                validate=validate)
        loss.backward()
        out[name] = (loss.detach().double(), xx.grad.double(), ww.grad.double(),
                     met["entropy"].double())
    assert torch.isfinite(out["ours"][1]).all() and torch.isfinite(out["ours"][2]).all()
    assert not out["ours"][1][dead].any()  # dead rows get exactly zero gradient
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(out["ours"], out["ref"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # A NaN in a live row is still an error with validate=True.
    if validate:
        live = poisoned.clone()
        live[0, 0, 0] = math.nan
        with pytest.raises(ValueError, match="hidden contains NaN"):
            fused_linear_rank_grpo_loss(live.to(dtype), w.to(dtype), y, None, A, seg, mask,
                                        eos_mask=eos, backend=backend)


def test_fused_path_rejects_a_fractional_mask():
    h = torch.randn(1, 3, 4)
    w = torch.randn(5, 4)
    y = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[1.0, 0.5, 0.0]])
    for fn, args in ((fused_linear_rank_grpo_loss, (h, w, y, None, torch.ones(1), None, mask)),
                     (rank_grpo_loss, (torch.zeros(1, 3), None, torch.ones(1), None, mask))):
        with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
            fn(*args, level="token")


def test_replayed_seed_leaves_the_global_rng_alone(request, monkeypatch):
    monkeypatch.setenv("RANKGRPO_TEST_SEED", "12345")
    before = torch.random.get_rng_state()
    gen = request.getfixturevalue("rng")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert gen.initial_seed() == 12345
