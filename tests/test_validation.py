"""Bad input raises ValueError/TypeError naming the argument; nothing becomes NaN."""

import pytest
import torch

from rankgrpo_kernels import (
    fused_linear_rank_grpo_loss,
    group_advantages,
    linear_logprobs,
    rank_grpo_loss,
    segment_ids_from_newlines,
)


def _inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    m = torch.ones(2, 5, dtype=torch.bool)
    seg = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]])
    adv = torch.randn(2, 2, generator=g)
    return h, w, y, m, seg, adv


EOS = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)  # row 1 truncated


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: a.update(w=torch.randn(11, 7)), ValueError, "weight"),
    (lambda a: a.update(w=a["w"].double()), TypeError, "dtype"),
    (lambda a: a.update(y=a["y"][:, :4]), ValueError, "targets"),
    (lambda a: a.update(y=a["y"].float()), TypeError, "targets"),
    (lambda a: a["y"].__setitem__((0, 1), 11), ValueError, "targets must be in [0, 11)"),
    (lambda a: a["y"].__setitem__((0, 1), -5), ValueError, "targets"),
    (lambda a: a["h"].__setitem__((1, 2, 3), float("nan")), ValueError, "hidden contains NaN"),
    (lambda a: a["w"].__setitem__((3, 3), float("inf")), ValueError, "weight contains NaN"),
    (lambda a: a.update(m=a["m"][:, :3]), ValueError, "mask"),
    (lambda a: a["seg"].__setitem__((0, 1), 3), ValueError, "segment_ids must be in [0, 3)"),
    (lambda a: a["seg"].__setitem__((0, 1), -1), ValueError, "segment_ids"),
    (lambda a: a.update(adv=torch.randn(3)), ValueError, "advantages"),
    (lambda a: a["adv"].__setitem__((0, 0), float("nan")), ValueError, "advantages contains"),
    (lambda a: a.update(kw={"epsilon_low": -0.1}), ValueError, "epsilon_low"),
    (lambda a: a.update(kw={"epsilon_high": -1}), ValueError, "epsilon_high"),
    (lambda a: a.update(kw={"beta": -1}), ValueError, "beta"),
    (lambda a: a.update(kw={"loss_type": "sum"}), ValueError, "loss_type"),
    (lambda a: a.update(kw={"level": "item"}), ValueError, "level"),
    (lambda a: a.update(kw={"backend": "cuda"}), ValueError, "backend"),
    (lambda a: a.update(kw={"temperature": 0}), ValueError, "temperature"),
    (lambda a: a.update(kw={"normalizer": 0.0}), ValueError, "normalizer"),
    (lambda a: a.update(kw={"loss_type": "dr_grpo", "max_completion_length": 0}), ValueError,
     "max_completion_length"),
])
def test_fused_loss_rejects(mutate, exc, words):
    h, w, y, m, seg, adv = _inputs()
    a = dict(h=h, w=w, y=y, m=m, seg=seg, adv=adv, kw={})
    mutate(a)
    with pytest.raises(exc) as info:
        fused_linear_rank_grpo_loss(a["h"], a["w"], a["y"], None, a["adv"], a["seg"], a["m"],
                                    **{"eos_mask": EOS, **a["kw"]})
    assert words in str(info.value)


def test_ignore_index_is_masked_out():
    h, w, y, m, seg, adv = _inputs()
    y[0, 4] = -100
    logp = linear_logprobs(h, w, y)
    assert logp[0, 4].item() == 0.0
    loss, met = fused_linear_rank_grpo_loss(h, w, y, None, adv, seg, m, eos_mask=EOS)
    assert met["num_tokens"].item() == 9
    assert torch.isfinite(loss)


def test_padding_may_hold_garbage():
    logp = torch.tensor([[-1.0, float("nan")]], requires_grad=True)
    adv = torch.tensor([[1.0, float("inf")]])
    mask = torch.tensor([[True, False]])
    for backend in ("reference", "torch"):
        loss, _ = rank_grpo_loss(logp, None, adv, None, mask, level="token", backend=backend)
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_group_advantages_errors_and_zero_std():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.randn(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.randn(4), 2, scale="global")
    r = torch.tensor([[0.1, 1.0], [0.1, 0.0], [0.1, 1.0]])
    a = group_advantages(r, 3)
    assert (a[:, 0] == 0).all() and torch.isfinite(a).all()
    assert (group_advantages(torch.randn(5), 1) == 0).all()


def test_segment_ids_from_newlines_overflow_and_padding():
    table = torch.tensor([0, 1, 2, 0])  # id 1 = "\n", id 2 = "\n\n", id 3 = EOS
    ids = torch.tensor([[0, 1, 0, 2, 0, 1, 0, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    seg = segment_ids_from_newlines(ids, mask, table, num_ranks=3)
    assert seg.tolist() == [[0, 0, 1, 1, 3, 3, 3, 3, -1]]
    with pytest.raises(ValueError, match="num_ranks"):
        segment_ids_from_newlines(ids, mask, table, num_ranks=0)
