"""rankgrpo's losses registered in verl (>= 0.9) against verl's own losses, float64.

verl is installed with --no-deps plus what core_algos imports (scripts/dev.sh test). The
registered token / sequence losses must equal verl's "vanilla" (dual clip included) and
"gspo" for every loss_agg_mode, with and without the global-batch normalisation, to 1e-9,
also with verl's rollout_is_weights; the registered geo_mean must equal verl's "geo_mean";
the rank loss must equal the kernel's float64 reference.
"""

import types

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
actor_cfg = pytest.importorskip("verl.workers.config.actor")

from rankgrpo.integrations import verl as rv  # noqa: E402
from rankgrpo_kernels import group_advantages, rank_grpo_loss  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm"]


def _config(global_info: bool, **kw):
    kw = {"clip_ratio_c": 3.0, **kw}
    cfg = actor_cfg.ActorConfig(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=2,
                                clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, **kw)
    if global_info:  # a micro-batch of a 2-rank data-parallel step
        cfg.global_batch_info.update(dp_size=2, batch_num_tokens=97, global_batch_size=13,
                                     loss_scale_factor=None)
    return cfg


def _batch(rng, b=6, t=14, per_row_adv=False):
    lengths = torch.randint(1, t + 1, (b,), generator=rng)
    lengths[0] = t
    lengths[1] = 0  # an empty response (verl's sequence modes skip it)
    lengths[2] = t
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(b, t, generator=rng, dtype=torch.float64) * 4
    # wide enough that both clip sides and the dual clip (ratio > 3, A < 0) are hit
    logp = old + 0.7 * torch.randn(b, t, generator=rng, dtype=torch.float64)
    if per_row_adv:
        adv = torch.randn(b, 1, generator=rng, dtype=torch.float64).expand(b, t).clone()
        # both clip sides for sure: a row with A > 0 past 1 + eps_high and one with A < 0
        # below 1 - eps_low (random per-row signs alone miss one side for some seeds)
        adv[0], adv[2] = adv[0].abs() + 0.1, -adv[2].abs() - 0.1
        logp[0, :3] = old[0, :3] + 1.0
        logp[2, :3] = old[2, :3] - 1.0
    else:
        adv = torch.randn(b, t, generator=rng, dtype=torch.float64)
        # a few tokens past the dual clip for sure: ratio e^1.5 > 3 with A < 0
        logp[0, :3] = old[0, :3] + 1.5
        adv[0, :3] = -adv[0, :3].abs() - 0.1
    return logp, old, adv, mask


def _run(fn, logp, old, adv, mask, mode, cfg, **kw):
    lp = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask,
                       loss_agg_mode=mode, config=cfg, **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def test_registered_by_name():
    for name in rv.LOSS_NAMES:
        assert core_algos.get_policy_loss_fn(name) is getattr(rv, f"compute_policy_loss_{name}")


@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("ours,theirs,per_row", [("rankgrpo_token", "vanilla", False),
                                                 ("rankgrpo_sequence", "gspo", True)])
def test_matches_verl_loss(rng, ours, theirs, per_row, mode, global_info):
    cfg = _config(global_info)
    logp, old, adv, mask = _batch(rng, per_row_adv=per_row)
    if theirs == "gspo":  # below gspo's sequence log-ratio cap of 10 (the cap has its own test)
        assert float(((logp - old) * mask).sum(-1).div(mask.sum(-1).clamp(min=1)).max()) < 10
    lv, gv, mv = _run(core_algos.get_policy_loss_fn(theirs), logp, old, adv, mask, mode, cfg)
    lo, go, mo = _run(core_algos.get_policy_loss_fn(ours), logp, old, adv, mask, mode, cfg)
    lerr = abs(float(lv - lo))
    gerr = float((gv - go).abs().max())
    print(f"VERL {ours} vs {theirs} {mode} global={global_info}: loss {float(lv):.6g} "
          f"abs err {lerr:.2e}, grad max abs err {gerr:.2e} (max |grad| "
          f"{float(gv.abs().max()):.3g})")
    assert lerr <= 1e-9 * max(1.0, abs(float(lv)))
    assert gerr <= 1e-9 * max(1.0, float(gv.abs().max()))
    for k, v in mv.items():
        assert abs(v - mo[k]) <= 1e-6, (k, v, mo[k])  # verl averages in float32
    if theirs == "vanilla":
        assert mv["actor/pg_clipfrac_lower"] > 0  # the dual clip was exercised


def test_rank_loss_matches_float64_reference(rng):
    b, t, n = 6, 16, 3
    logp, old, adv_tok, mask = _batch(rng, b, t)
    seg = torch.where(mask, (torch.arange(t) // 5).clamp(max=n).expand(b, t), -1)
    cfg = _config(False)
    with rv.rank_segments(seg):
        lo, go, _ = _run(core_algos.get_policy_loss_fn("rankgrpo_rank"), logp, old, adv_tok,
                         mask, "token-mean", cfg)
    lp = logp.clone().requires_grad_(True)
    ref, _ = rank_grpo_loss(lp, old, adv_tok, seg, mask, epsilon_low=0.2, epsilon_high=0.28,
                            level="rank", loss_type="bnpo", advantages_per="token",
                            backend="reference")
    ref.backward()
    print(f"VERL rankgrpo_rank vs float64 reference: loss abs err {abs(float(lo - ref)):.2e}, "
          f"grad max abs err {float((go - lp.grad).abs().max()):.2e}")
    assert abs(float(lo - ref)) <= 1e-12 * max(1.0, abs(float(ref)))
    assert torch.allclose(go, lp.grad, rtol=0, atol=1e-12)


def test_rank_loss_without_segments_names_the_gap(rng):
    logp, old, adv, mask = _batch(rng)
    with pytest.raises(ValueError, match="rank segment ids"):
        core_algos.get_policy_loss_fn("rankgrpo_rank")(old, logp, adv, mask, "token-mean",
                                                       _config(False))


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("ours,theirs,per_row", [("rankgrpo_token", "vanilla", False),
                                                 ("rankgrpo_sequence", "gspo", False),
                                                 ("rankgrpo_geo_mean", "geo_mean", False)])
def test_rollout_is_weights_match_verl(rng, ours, theirs, per_row, mode):
    """verl's rollout_is_weights (per-token weights from the rollout correction, some 0 as
    its masked modes give) with per-token advantages: verl's loss and gradient to 1e-9."""
    cfg = _config(True)
    logp, old, adv, mask = _batch(rng, per_row_adv=per_row)
    isw = torch.where(mask, 0.5 + torch.rand(logp.shape, generator=rng, dtype=torch.float64), 0)
    isw[2, 0] = 0.0
    lv, gv, mv = _run(core_algos.get_policy_loss_fn(theirs), logp, old, adv, mask, mode, cfg,
                      rollout_is_weights=isw)
    lo, go, mo = _run(core_algos.get_policy_loss_fn(ours), logp, old, adv, mask, mode, cfg,
                      rollout_is_weights=isw)
    l0, _, _ = _run(core_algos.get_policy_loss_fn(theirs), logp, old, adv, mask, mode, cfg)
    lerr, gerr = abs(float(lv - lo)), float((gv - go).abs().max())
    print(f"VERL-IS {ours} vs {theirs} {mode}: loss {float(lv):.6g} abs err {lerr:.2e}, grad "
          f"max abs err {gerr:.2e} (max |grad| {float(gv.abs().max()):.3g})")
    assert abs(float(lv - l0)) > 1e-6  # the weights changed verl's loss
    assert lerr <= 1e-9 * max(1.0, abs(float(lv)))
    assert gerr <= 1e-9 * max(1.0, float(gv.abs().max()))
    for k, v in mv.items():
        assert abs(v - mo[k]) <= 1e-6, (k, v, mo[k])


@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("per_row", [False, True])
def test_geo_mean_matches_verl(rng, per_row, mode, global_info):
    """rankgrpo_geo_mean against verl's geo_mean (GMPO), float64, an empty response in the
    batch: verl ignores loss_agg_mode and global_batch_info (a mean over the micro-batch's
    responses), and so does ours; token log-ratios wide enough that both clip sides act."""
    cfg = _config(global_info)
    logp, old, adv, mask = _batch(rng, per_row_adv=per_row)
    lv, gv, mv = _run(core_algos.get_policy_loss_fn("geo_mean"), logp, old, adv, mask, mode,
                      cfg)
    lo, go, mo = _run(core_algos.get_policy_loss_fn("rankgrpo_geo_mean"), logp, old, adv, mask,
                      mode, cfg)
    lerr, gerr = abs(float(lv - lo)), float((gv - go).abs().max())
    print(f"VERL rankgrpo_geo_mean vs geo_mean {mode} global={global_info} per_row={per_row}: "
          f"loss {float(lv):.6g} abs err {lerr:.2e}, grad max abs err {gerr:.2e} (max |grad| "
          f"{float(gv.abs().max()):.3g})")
    assert lerr <= 1e-9 * max(1.0, abs(float(lv)))
    assert gerr <= 1e-9 * max(1.0, float(gv.abs().max()))
    assert mv["actor/pg_clipfrac"] > 0 and mv["actor/pg_clipfrac_lower"] > 0
    for k, v in mv.items():
        assert abs(v - mo[k]) <= 1e-6, (k, v, mo[k])


def test_rank_loss_with_rollout_is_weights_matches_reference(rng):
    b, t, n = 6, 16, 3
    logp, old, adv_tok, mask = _batch(rng, b, t)
    seg = torch.where(mask, (torch.arange(t) // 5).clamp(max=n).expand(b, t), -1)
    isw = torch.where(mask, 0.5 + torch.rand(logp.shape, generator=rng, dtype=torch.float64), 0)
    with rv.rank_segments(seg):
        lo, go, _ = _run(core_algos.get_policy_loss_fn("rankgrpo_rank"), logp, old, adv_tok,
                         mask, "token-mean", _config(False), rollout_is_weights=isw)
    lp = logp.clone().requires_grad_(True)
    ref, _ = rank_grpo_loss(lp, old, adv_tok, seg, mask, epsilon_low=0.2, epsilon_high=0.28,
                            level="rank", loss_type="bnpo", advantages_per="token",
                            importance_weights=isw, backend="reference")
    ref.backward()
    assert abs(float(lo - ref)) <= 1e-12 * max(1.0, abs(float(ref)))
    assert torch.allclose(go, lp.grad, rtol=0, atol=1e-12)


def test_dual_clip_below_the_upper_clip_and_log_ratio_clamp(rng):
    """clip_ratio_c inside (1, 1 + clip_ratio_high] and log-ratios past verl's clamps."""
    logp, old, adv, mask = _batch(rng)
    logp[2, :2] = old[2, :2] + 25.0  # beyond vanilla's [-20, 20] clamp
    logp[3, :2] = old[3, :2] - 25.0
    cfg = _config(False, clip_ratio_c=1.1)
    lv, gv, _ = _run(core_algos.get_policy_loss_fn("vanilla"), logp, old, adv, mask,
                     "token-mean", cfg)
    lo, go, _ = _run(core_algos.get_policy_loss_fn("rankgrpo_token"), logp, old, adv, mask,
                     "token-mean", cfg)
    assert abs(float(lv - lo)) <= 1e-9 * max(1.0, abs(float(lv)))
    assert float((gv - go).abs().max()) <= 1e-9


def test_catalog_reward_manager_and_rank_advantages():
    from rankgrpo.catalog import Catalog
    from rankgrpo.tiny import build_tokenizer

    items = ["Alien (1979)", "Heat (1995)", "Up (2009)", "Jaws (1975)"]
    tok = build_tokenizer(items, texts=["films"])
    texts = ["Alien (1979)\nHeat (1995)\nUp (2009)", "Jaws (1975)\nAlien (1979)",
             "Up (2009)\nJaws (1975)\nHeat (1995)\nAlien (1979)", "Heat (1995)"]
    enc = [tok(x, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for x in texts]
    t = max(map(len, enc))
    responses = torch.tensor([e + [tok.pad_token_id] * (t - len(e)) for e in enc])
    attn = torch.tensor([[1] * len(e) + [0] * (t - len(e)) for e in enc])
    gt = [[["Alien", "1979"], ["Up", "2009"]], [["Alien", "1979"]],
          [["Heat", "1995"]], [["Heat", "1995"]]]
    data = types.SimpleNamespace(
        batch={"responses": responses, "attention_mask": torch.cat([attn, attn], 1)},
        non_tensor_batch={"reward_model": np.array([{"ground_truth": g} for g in gt]),
                          "extra_info": np.array([{} for _ in gt])})
    catalog = Catalog([(s.rsplit(" (", 1)[0], int(s[-5:-1])) for s in items])
    mgr = rv.RankCatalogRewardManager(tok, catalog=catalog, num_ranks=3)
    out = mgr(data, return_dict=True)
    per_rank = torch.tensor(out["reward_extra_info"]["rank_rewards"])
    assert per_rank.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]]
    # the [B, T] tensor holds rank k's reward on item k's last token: row sums agree
    assert torch.equal(out["reward_tensor"].sum(-1), per_rank.sum(-1))
    seg = out["reward_extra_info"]["rank_segment_ids"]
    eos = out["reward_extra_info"]["eos_mask"]
    adv = rv.rank_grpo_advantages(per_rank, seg, attn.bool(), ["a", "b", "a", "b"],
                                  eos_mask=eos)
    want = group_advantages(per_rank[[0, 2, 1, 3]], 2)[[0, 2, 1, 3]]
    for i in range(4):
        for j in range(t):
            k = int(seg[i, j])
            expect = float(want[i, k]) if 0 <= k < 3 and not eos[i, j] else 0.0
            assert abs(float(adv[i, j]) - expect) < 1e-6


def test_docs_table_in_sync():
    from pathlib import Path

    from rankgrpo.integrations._support import table_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    assert table_markdown(rv.VERL_OPTIONS) in doc, "regenerate the verl table in the doc"


def test_gspo_sequence_log_ratio_cap(rng):
    logp, old, adv, mask = _batch(rng, per_row_adv=True)
    logp[0] = old[0] + 12.0  # the sequence log-ratio of row 0 is past gspo's cap of 10
    cfg = _config(False)
    lv, gv, _ = _run(core_algos.get_policy_loss_fn("gspo"), logp, old, adv, mask,
                     "seq-mean-token-mean", cfg)
    lo, go, _ = _run(core_algos.get_policy_loss_fn("rankgrpo_sequence"), logp, old, adv, mask,
                     "seq-mean-token-mean", cfg)
    assert abs(float(lv - lo)) <= 1e-9 * max(1.0, abs(float(lv)))
    assert float((gv - go).abs().max()) <= 1e-9
