"""Hand-computed cases: every expected value below was worked out on paper (derivation in
the comments) and is written as a literal or a closed-form expression of literals."""

import math

import pytest
import torch

from rankgrpo_kernels import (
    BACKENDS,
    group_advantages,
    linear_logprobs,
    native_available,
    rank_grpo_loss,
)

# every backend that runs here ("triton" runs through the interpreter on a CPU)
HERE = [b for b in BACKENDS if b != "native" or native_available()]
LN2 = math.log(2.0)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("backend", HERE)
def test_token_level_bnpo(backend):
    # eps 0.2/0.2. Token ratios w = 1.5 (A=+1), 0.5 (A=-1), 1.1 (A=+2).
    # t0: min(1.5, 1.2) = 1.2 -> clipped high, l = -1.2, no gradient.
    # t1: min(-0.5, -0.8) = -0.8 -> clipped low, l = 0.8, no gradient.
    # t2: w inside the band, the two terms tie: l = -2.2, dl/dw = -2, dl/dlogp = w * -2 = -2.2.
    # bnpo: divide by 3 tokens. loss = (-1.2 + 0.8 - 2.2) / 3; g = [0, 0, -2.2/3].
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.tensor([1.5, 0.5, 1.1], dtype=torch.float64).log()
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    mask = torch.ones(3, dtype=torch.bool)
    loss, met = rank_grpo_loss(logp, old, adv, None, mask, level="token", epsilon_low=0.2,
                               epsilon_high=0.2, backend=backend)
    assert loss.item() == pytest.approx(-2.6 / 3, abs=1e-12)
    torch.testing.assert_close(_grad(loss, logp),
                               torch.tensor([0.0, 0.0, -2.2 / 3], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    assert met["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert met["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert met["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
    assert met["importance_ratio/max"].item() == pytest.approx(1.5)
    assert met["importance_ratio/min"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("backend", HERE)
def test_sequence_level_grpo_with_zero_std_group(backend):
    # Two groups of G=2. Rewards [1, 0] -> A = +-0.5 / (std + 1e-4), std = sqrt(0.5) (unbiased).
    # Rewards [0.3, 0.3] -> zero std -> A = 0 exactly.
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.3], dtype=torch.float64)
    adv = group_advantages(rewards, 2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, 0.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert adv[2].item() == 0.0 and adv[3].item() == 0.0
    # Row 0 lr = [ln 2, 0] -> w = sqrt 2 > 1.2 with A > 0: clipped, l = -1.2a per token.
    # Row 1 lr = [ln 0.81, 0] -> w = 0.9 (inside), A = -a: l = 0.9a per token;
    #   dl/dw = a, dw/dlr_t = w / 2, c_t = 1 / (2 tokens * 4 rows) -> g_t = 0.45 * 2/8 * a.
    # Rows 2, 3 have A = 0: l = 0, g = 0. Row 3 has one padded token.
    # grpo: mean over rows of the row means = (-1.2a + 0.9a + 0 + 0) / 4.
    logp = torch.tensor([[-1.0, -2.0], [-0.3, -0.7], [-1.1, -0.2], [-0.4, -9.0]],
                        dtype=torch.float64, requires_grad=True)
    lr = torch.tensor([[2.0, 1.0], [0.81, 1.0], [1.3, 0.6], [0.7, 1.0]],
                      dtype=torch.float64).log()
    old = logp.detach() - lr
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    loss, _ = rank_grpo_loss(logp, old, adv, None, mask, level="sequence", loss_type="grpo",
                             epsilon_low=0.2, epsilon_high=0.2, backend=backend)
    assert loss.item() == pytest.approx(-0.3 * a / 4, abs=1e-12)
    g = 0.45 * 2 / 8 * a
    expected = torch.tensor([[0, 0], [g, g], [0, 0], [0, 0]], dtype=torch.float64)
    torch.testing.assert_close(_grad(loss, logp), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", HERE)
def test_rank_level_rank_loss_with_kl(backend):
    # One row, num_ranks 2 -> segments 0, 1 and the overflow bin 2; per-rank A = [1, -1],
    # the overflow token gets A = 0. eps 0.2/0.2, beta 0.1.
    # seg 0, lr = [ln 1.69, 0] -> w = 1.3 > 1.2, A > 0: clipped, l_pg = -1.2 per token.
    # seg 1, lr = ln 0.7 -> w = 0.7 < 0.8, A < 0: min(-0.7, -0.8), clipped, l_pg = 0.8.
    # KL with r = ref - logp = [0, ln 2, -ln 2, 0]: k3(r) = e^r - r - 1 = [0, 1 - ln2,
    #   ln2 - 0.5, 0]. "rank" loss: mean over the 3 non-empty segments of segment means:
    # ((-1.2 + 0.05 (1 - ln2)) + (0.8 + 0.1 (ln2 - 0.5)) + 0) / 3 = (-0.4 + 0.05 ln2) / 3.
    # Gradient: only KL, c_t beta (1 - e^r) with c = [1/6, 1/6, 1/3, 1/3]:
    #   [0, (1/6)(0.1)(1 - 2), (1/3)(0.1)(1 - 0.5), 0] = [0, -1/60, 1/60, 0].
    logp = torch.tensor([[-0.5, -1.5, -2.5, -0.1]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.tensor([[1.69, 1.0, 0.7, 1.0]], dtype=torch.float64).log()
    ref = logp.detach() + torch.tensor([[0.0, LN2, -LN2, 0.0]], dtype=torch.float64)
    seg = torch.tensor([[0, 0, 1, 2]])
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    # The row was truncated (it overflows): no EOS token.
    loss, met = rank_grpo_loss(logp, old, adv, seg, mask, ref_logp=ref, beta=0.1,
                               level="rank", loss_type="rank", epsilon_low=0.2,
                               epsilon_high=0.2, eos_mask=torch.zeros_like(mask),
                               backend=backend)
    assert loss.item() == pytest.approx((-0.4 + 0.05 * LN2) / 3, abs=1e-12)
    torch.testing.assert_close(
        _grad(loss, logp), torch.tensor([[0.0, -1 / 60, 1 / 60, 0.0]], dtype=torch.float64),
        rtol=0, atol=1e-12)
    assert met["kl"].item() == pytest.approx((1 - LN2 + LN2 - 0.5) / 4, abs=1e-12)


@pytest.mark.parametrize("backend", HERE)
def test_logprob_hand_case(backend):
    # z = [ln 3, 0] -> p = [0.75, 0.25]; target 0: logp = ln 0.75,
    # dlogp/dh = W_y - sum_j p_j W_j = ln3 - 0.75 ln3 = 0.25 ln3; dlogp/dW = (onehot - p) h.
    h = torch.tensor([[2.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[math.log(3) / 2], [0.0]], dtype=torch.float64, requires_grad=True)
    logp, ent = linear_logprobs(h, w, torch.tensor([0]), return_entropy=True, backend=backend)
    assert logp.item() == pytest.approx(math.log(0.75), abs=1e-14)
    assert ent.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)),
                                       abs=1e-14)
    dh, dw = torch.autograd.grad(logp.sum(), (h, w))
    assert dh.item() == pytest.approx(0.25 * math.log(3) / 2, abs=1e-14)
    torch.testing.assert_close(dw, torch.tensor([[0.5], [-0.5]], dtype=torch.float64),
                               rtol=0, atol=1e-14)
