"""Peer parity: token level (GRPO) and sequence level (GSPO) equal liger-kernel's
LigerFusedLinearGRPOLoss, a real independent implementation (plain PyTorch on CPU)."""

import itertools

import pytest
import torch
from _factory import make_batch, run_fused

liger = pytest.importorskip("liger_kernel.chunked_loss")


@pytest.mark.parametrize("loss_type,level",
                         list(itertools.product(["bnpo", "grpo", "dr_grpo"],
                                                ["token", "sequence"])))
@pytest.mark.parametrize("beta,temperature,delta", [(0.0, 1.0, None), (0.05, 0.8, 1.3)])
def test_matches_liger(rng, loss_type, level, beta, temperature, delta):
    batch = make_batch(rng, B=4, T=11, H=12, V=29, bias=True)
    adv_row = torch.randn(4, generator=rng, dtype=torch.float64)
    batch["advantages"] = adv_row
    kw = dict(loss_type=loss_type, level=level, beta=beta, temperature=temperature,
              delta=delta, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=16)
    ours = run_fused(batch, "torch", **kw)

    peer = liger.LigerFusedLinearGRPOLoss(
        beta=beta, compiled=False, use_ref_model=beta != 0, chunk_size=2, epsilon_low=0.2,
        epsilon_high=0.28, loss_type=loss_type, max_completion_length=16,
        importance_sampling_level=level, temperature=temperature, delta=delta)
    h = batch["hidden"].clone().requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    b = batch["bias"].clone().requires_grad_()
    loss, metrics = peer(h, w, batch["targets"], batch["mask"].long(), adv_row, bias=b,
                         ref_per_token_logps=batch["ref_logp"] if beta else None,
                         old_per_token_logps=batch["old_logp"])
    loss.backward()
    # Liger computes its log-softmax in float32 even for float64 inputs, so the rule is
    # float32 accuracy: 1e-5 relative.
    torch.testing.assert_close(ours["loss"], loss.detach().double(), rtol=1e-5, atol=1e-7)
    for name, g in (("dhidden", h.grad), ("dweight", w.grad), ("dbias", b.grad)):
        err = ((ours[name] - g.double()).norm() / g.double().norm()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.3g}"
    torch.testing.assert_close(ours["metrics"]["clip_ratio/region_mean"].double(),
                               metrics[-1].double(), rtol=1e-6, atol=1e-7)
    if beta:
        torch.testing.assert_close(ours["metrics"]["kl"].double(), metrics[0].double(),
                                   rtol=1e-5, atol=1e-7)
