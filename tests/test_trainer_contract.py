"""The trainer calls the kernel package's loss contract (issue 14): the README quickstart's
kernel calls and the trainer's `build_rl_batch` + micro-batch loss give the same loss,
metrics and gradients on the same batch, EOS included; and the step metrics the trainer
adds (reward spread, tokens with a non-zero advantage) mean what their docs say."""

import pytest
import torch
from _trainer_world import (
    NUM_RANKS,
    grads_snapshot,
    make_model,
    movies,
    scripted_rollout_output,
    world_fixture,
)

from rankgrpo.config import ConfigError, GRPOConfig, validate_section
from rankgrpo.model import last_hidden_states, lm_head_params
from rankgrpo.rewards import reward_matrix
from rankgrpo.rl_step import (
    accumulate_gradients,
    build_rl_batch,
    group_advantages_dp,
    reward_spread_metrics,
    score_rollout,
)
from rankgrpo.rollout import RolloutOutput, completion_mask, decode_completions, left_pad
from rankgrpo.tokens import newline_counts
from rankgrpo_kernels import (
    AGGREGATIONS,
    BACKENDS,
    LEVELS,
    LOSS_TYPE_TABLE,
    LOSS_TYPES,
    eos_mask_from_ids,
    fused_linear_rank_grpo_loss,
    gather_rank_advantages,
    group_advantages,
    native_available,
    segment_ids_from_newlines,
    triton_available,
)

world = world_fixture(3)


@pytest.fixture(scope="module")
def model(world):
    """One tiny policy for the module: the tests only read its weights and zero its grads."""
    return make_model(world[0])

# The quickstart has no length shaping; the trainer's is configurable, so switch it off.
NO_SHAPING = dict(overflow_penalty=0.0, short_eos_penalty=0.0, exact_eos_bonus=0.0)
METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
           "importance_ratio/mean", "importance_ratio/min", "importance_ratio/max", "kl",
           "entropy")


def quickstart_loss(model, rollout: RolloutOutput, advantages, newline_table, eos_ids,
                    num_ranks, **options):
    """The README quickstart's calls, on the model's own last hidden states and LM head:
    segment_ids_from_newlines -> (advantages per rank) -> fused_linear_rank_grpo_loss with
    eos_mask, the whole batch at once (no micro-batches, no trimming)."""
    p = rollout.prompt_ids.shape[1]
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    att = torch.cat([rollout.prompt_mask.long(), rollout.completion_mask.long()], 1)
    hidden = last_hidden_states(model, ids, att)[:, p - 1:-1]  # position t predicts t + 1
    lm_head, bias = lm_head_params(model)
    targets, mask = rollout.completion_ids, rollout.completion_mask
    seg = segment_ids_from_newlines(targets, mask, newline_table, num_ranks=num_ranks)
    eos = eos_mask_from_ids(targets, mask, eos_ids)
    return fused_linear_rank_grpo_loss(hidden, lm_head, targets, None, advantages, seg, mask,
                                       bias=bias, eos_mask=eos, **options)


def trainer_config(**kw) -> GRPOConfig:
    base = dict(num_generations=4, per_device_train_batch_size=5, beta=0.0, num_iterations=1,
                kernel_backend="torch", max_completion_length=64, **NO_SHAPING)
    return GRPOConfig(**{**base, **kw})


def assert_same(model, trainer_metrics, trainer_grads, loss, metrics):
    assert trainer_metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-7)
    assert trainer_metrics["num_loss_tokens"] == float(metrics["num_tokens"])
    for k in METRICS:
        assert trainer_metrics[k] == pytest.approx(float(metrics[k]), rel=1e-5, abs=1e-7), k
    for n, q in model.named_parameters():
        torch.testing.assert_close(trainer_grads[n], q.grad, rtol=1e-4, atol=1e-7, msg=n)


def one_completion(tok, record, text: str) -> RolloutOutput:
    """A one-row rollout whose completion is `text` then EOS."""
    from rankgrpo.encoding import encode_prompt

    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    pid, pmask = left_pad([encode_prompt(tok, record)], tok.pad_token_id)
    comp = torch.tensor([ids])
    mask, truncated = completion_mask(comp, [tok.eos_token_id])
    return RolloutOutput(pid, pmask, comp, mask, decode_completions(tok, comp, mask),
                         truncated)


def _skip_unavailable(backend: str) -> None:
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not importable here")
    if backend == "native" and not native_available():
        pytest.skip("the native op library is not built (cmake -S . -B build)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_gets_zero_advantage_in_both_paths(world, model, backend):
    """Issue 14's case: "A\\nB<eos>", N = 2, A = [0.5, -1]. The EOS token's advantage is 0 in
    the trainer's batch and in the quickstart's loss (the kernel's bare per-rank gather, which
    knows nothing of EOS, gives it B's -1), and the two losses and gradients agree: the
    trainer on every backend, the quickstart on the reference backend (materialised logits)."""
    _skip_unavailable(backend)
    tok, recs, cat = world
    n = 2
    a, b = (f"{t} ({y})" for t, y in movies()[:2])
    out = one_completion(tok, recs[0], f"{a}\n{b}")
    eos = [tok.eos_token_id]
    table = newline_counts(tok)
    adv = torch.tensor([[0.5, -1.0]])
    cfg = trainer_config(kernel_backend=backend)
    scored = score_rollout(out, recs[:1], catalog=cat, tokenizer=tok, newline_table=table,
                           cfg=cfg, num_ranks=n)
    batch = build_rl_batch(out, scored, adv, eos_ids=eos, cfg=cfg, num_ranks=n)
    seg = batch.segment_ids[0]
    assert seg[-1] == 1 and bool((seg == 0).any())  # EOS sits in B's segment
    expected = torch.where(seg == 0, 0.5, -1.0)
    expected[-1] = 0.0
    assert batch.advantages[0].tolist() == expected.tolist()
    assert gather_rank_advantages(adv, batch.segment_ids)[0, -1] == -1.0  # EOS-blind gather

    model.zero_grad()
    m = accumulate_gradients(model, batch, cfg, n)
    grads = grads_snapshot(model)
    model.zero_grad()
    loss, metrics = quickstart_loss(model, out, adv, table, eos, n, backend="reference")
    loss.backward()
    assert_same(model, m, grads, loss, metrics)
    # on-policy, ratio 1: loss = -mean of the per-token advantages over the mask
    assert float(loss.detach()) == pytest.approx(-float(expected.mean()), rel=1e-6)


# Every aggregation (its own denominator) at every level; the loss types that differ from
# their aggregation in the surrogate only, once each (at the rank level).
QUICKSTART_CASES = [(lt, level) for lt in AGGREGATIONS for level in LEVELS] + [
    (lt, "rank") for lt in LOSS_TYPES if lt not in AGGREGATIONS]


def test_config_accepts_every_loss_type_of_the_kernel():
    for lt in LOSS_TYPES:
        validate_section("grpo", trainer_config(loss_type=lt))
    with pytest.raises(ConfigError, match="grpo.loss_type") as e:
        validate_section("grpo", trainer_config(loss_type="sum"))
    assert all(repr(lt) in str(e.value) for lt in LOSS_TYPES)  # the choices are listed
    # the native op library implements the clip surrogate only: refused before any compute
    for lt, (_, surrogate) in LOSS_TYPE_TABLE.items():
        cfg = trainer_config(loss_type=lt, kernel_backend="native")
        if surrogate == "clip":
            validate_section("grpo", cfg)
        else:
            with pytest.raises(ConfigError, match="kernel_backend=native"):
                validate_section("grpo", cfg)


@pytest.mark.parametrize("loss_type,level", QUICKSTART_CASES)
def test_quickstart_path_equals_trainer_path(world, model, loss_type, level):
    """Scripted completions of 3 prompts x G = 4 (ragged, truncated, overflowing lists):
    rewards -> group advantages -> the trainer's batch and micro-batched loss, against the
    quickstart's calls on the same completions."""
    tok, recs, cat = world
    cfg = trainer_config(loss_type=loss_type, importance_sampling_level=level)
    out, rrecs = scripted_rollout_output(tok, recs, cfg.num_generations, seed=1)
    eos = [tok.eos_token_id]
    table = newline_counts(tok)
    scored = score_rollout(out, rrecs, catalog=cat, tokenizer=tok, newline_table=table,
                           cfg=cfg, num_ranks=NUM_RANKS)
    adv, _ = group_advantages_dp(scored.rewards, cfg)
    batch = build_rl_batch(out, scored, adv, eos_ids=eos, cfg=cfg, num_ranks=NUM_RANKS)
    assert bool(out.truncated.any()) or bool((batch.segment_ids == NUM_RANKS).any())

    model.zero_grad()
    m = accumulate_gradients(model, batch, cfg, NUM_RANKS)
    grads = grads_snapshot(model)
    model.zero_grad()
    rewards = reward_matrix(out.texts, rrecs, cat, NUM_RANKS)
    q_adv = group_advantages(rewards, group_size=cfg.num_generations)
    loss, metrics = quickstart_loss(model, out, q_adv, table, eos, NUM_RANKS,
                                    loss_type=loss_type, level=level,
                                    max_completion_length=cfg.max_completion_length)
    loss.backward()
    assert_same(model, m, grads, loss, metrics)


def test_reward_spread_metrics_two_definitions():
    # 2 prompts x G = 2 x N = 2: prompt 0 differs at rank 2 only, prompt 1 nowhere
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0],
                      [0.0, 1.0], [0.0, 1.0]])
    out = reward_spread_metrics(r, 2)
    assert out == {"frac_reward_zero_std": 0.5, "frac_reward_zero_std_cells": 0.75}
    # a sequence reward: one cell per prompt, both definitions agree
    out = reward_spread_metrics(torch.tensor([0.5, 0.5, 0.1, 0.2, 0.3, 0.3]), 2)
    assert out["frac_reward_zero_std"] == out["frac_reward_zero_std_cells"] == \
        pytest.approx(2 / 3)


def test_frac_tokens_nonzero_advantage(world, model):
    tok, recs, cat = world
    cfg = trainer_config()  # no shaping: overflow and EOS tokens carry advantage 0
    out, rrecs = scripted_rollout_output(tok, recs, cfg.num_generations, seed=1)
    scored = score_rollout(out, rrecs, catalog=cat, tokenizer=tok,
                           newline_table=newline_counts(tok), cfg=cfg, num_ranks=NUM_RANKS)
    adv, _ = group_advantages_dp(scored.rewards, cfg)
    batch = build_rl_batch(out, scored, adv, eos_ids=[tok.eos_token_id], cfg=cfg,
                           num_ranks=NUM_RANKS)
    model.zero_grad()
    m = accumulate_gradients(model, batch, cfg, NUM_RANKS)
    mask = batch.completion_mask
    want = float((mask & (batch.advantages != 0)).sum()) / float(mask.sum())
    assert 0.0 < want < 1.0
    assert m["frac_tokens_nonzero_advantage"] == want
