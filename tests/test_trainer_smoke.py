"""Trainer smoke tests on a tiny Qwen2: RL and SFT steps, the loss against an independent
logits-based reference, the rollout, evaluation, and bad input caught before any compute."""

import math

import pytest
import torch
from _trainer_world import (
    NUM_RANKS,
    ScriptedRollout,
    fixed_batch,
    grads_snapshot,
    grpo_config,
    make_model,
    params_snapshot,
    world_fixture,
)

from rankgrpo.config import ConfigError, EvalConfig, GRPOConfig, ModelConfig, SFTConfig
from rankgrpo.encoding import DataError
from rankgrpo.evaluate import evaluate
from rankgrpo.model import frozen_copy, lm_head_params, load_model, load_tokenizer
from rankgrpo.rl_step import accumulate_gradients
from rankgrpo.rollout import HFRollout, completion_mask
from rankgrpo.sft import sft_train
from rankgrpo.train import grpo_train
from rankgrpo_kernels import rank_grpo_loss

world = world_fixture(12)


def test_rl_two_steps_every_parameter_changes(world, tmp_path):
    tok, recs, cat = world
    model = make_model(tok)
    before = params_snapshot(model)
    cfg = grpo_config(tmp_path, beta=0.04, max_steps=2, save_steps=1)
    res = grpo_train(model, tok, recs, cat, cfg, num_ranks=NUM_RANKS,
                     rollout=ScriptedRollout(tok, recs))
    assert res.step == 2 and len(res.history) == 2
    for h in res.history:
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"])
        assert h["importance_ratio/mean"] == 1.0  # on-policy: w == 1 exactly
        for key in ("reward", "reward_std", "frac_reward_zero_std",
                    "frac_reward_zero_std_cells", "frac_tokens_nonzero_advantage",
                    "rewards/rank_1/mean",
                    "relevance/rank_4", "clip_ratio/region_mean", "kl", "entropy",
                    "completions/mean_length", "rollout/parse_failure_rate",
                    "rollout/out_of_catalog_rate", "rollout/seen_rate",
                    "rollout/duplicate_rate", "rollout/items_per_list", "time/generation",
                    "tokens_per_second", "learning_rate"):
            assert key in h, key
    after = params_snapshot(res.model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists()
    assert (tmp_path / "latest").read_text() == "checkpoint-2"
    # the final folder loads back as an HF model with the same weights
    m2 = load_model(ModelConfig(), str(res.final_dir))
    assert load_tokenizer(ModelConfig(), str(res.final_dir)).eos_token == tok.eos_token
    for (n, p), (_, q) in zip(res.model.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n


def test_rl_step_with_hf_generate(world, tmp_path):
    """The default rollout (HF generate, sampling) through the whole loop."""
    tok, recs, cat = world
    model = make_model(tok)
    cfg = grpo_config(tmp_path, max_steps=1, max_completion_length=12, num_iterations=1)
    res = grpo_train(model, tok, recs, cat, cfg, num_ranks=NUM_RANKS, save_final=False)
    h = res.history[0]
    assert math.isfinite(h["loss"]) and h["completions/max_length"] <= 12


@pytest.mark.parametrize("kw", [
    dict(reward_kind="log"), dict(reward_kind="exp_gamma", reward_gamma=2.0),
    dict(reward_kind="sequence_dcg", importance_sampling_level="token", epsilon=0.2,
         epsilon_high=0.26),
    dict(importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4,
         loss_type="grpo"),
    dict(segment_mode="aligned", loss_type="rank", num_iterations=2, max_steps=2),
    dict(loss_type="dr_grpo", scale_rewards="batch", mask_truncated_completions=True,
         delta=1.5, num_iterations=2, max_steps=2),
])
def test_rl_variants_run(world, tmp_path, kw):
    tok, recs, cat = world
    cfg = grpo_config(tmp_path, **{"max_steps": 1, "beta": 0.01, **kw})
    res = grpo_train(make_model(tok), tok, recs, cat, cfg, num_ranks=NUM_RANKS,
                     rollout=ScriptedRollout(tok, recs), save_final=False)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    if cfg.num_iterations == 2:  # the second step reuses the rollout: off-policy ratios
        assert res.history[1]["importance_ratio/max"] != 1.0


def _reference_loss(model, batch, cfg, ref_model=None):
    """The loss from the model's own logits (materialised), log_softmax, and the kernels'
    autograd reference of the segment stage: an independent path to the same number."""
    p = batch.prompt_width
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=pos).logits[:, p - 1:-1].double() / cfg.temperature
    logp = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.unsqueeze(-1))[..., 0]
    loss, _ = rank_grpo_loss(
        logp, batch.old_logp, batch.advantages.double(), batch.segment_ids,
        batch.completion_mask, ref_logp=batch.ref_logp, beta=cfg.beta,
        epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
        level=cfg.importance_sampling_level, loss_type=cfg.loss_type,
        max_completion_length=cfg.max_completion_length, normalizer=batch.normalizer,
        num_segments=NUM_RANKS + 1, advantages_per="token", backend="reference")
    return loss


@pytest.mark.parametrize("level,loss_type,backend", [
    ("rank", "bnpo", "torch"), ("rank", "rank", "torch"), ("token", "grpo", "torch"),
    ("sequence", "dr_grpo", "reference")])
def test_trainer_loss_equals_reference(world, level, loss_type, backend):
    tok, recs, cat = world
    torch.manual_seed(0)
    model = make_model(tok)
    ref = frozen_copy(model)
    with torch.no_grad():  # a reference that differs from the policy, for a non-zero KL
        for q in ref.parameters():
            q.add_(0.02 * torch.randn_like(q))
    cfg = GRPOConfig(num_generations=4, per_device_train_batch_size=5, beta=0.05,
                     num_iterations=2, importance_sampling_level=level, loss_type=loss_type,
                     kernel_backend=backend, max_completion_length=64)
    batch, _, _ = fixed_batch(tok, recs[:4], cat, cfg, model=model, ref_model=ref)
    with torch.no_grad():  # move the policy away from the old one: ratios != 1, some clip
        for q in model.parameters():
            q.add_(0.01 * torch.randn_like(q))
    metrics = accumulate_gradients(model, batch, cfg, NUM_RANKS)
    grads = grads_snapshot(model)
    model.zero_grad()
    expected = _reference_loss(model, batch, cfg, ref)
    expected.backward()
    assert metrics["loss"] == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-6)
    assert metrics["importance_ratio/max"] > 1.0 + 1e-4
    for n, q in model.named_parameters():
        torch.testing.assert_close(grads[n], q.grad, rtol=2e-3, atol=2e-6, msg=n)


def test_tied_head_is_the_embedding(world):
    tok, _, _ = world
    model = make_model(tok)
    w, b = lm_head_params(model)
    assert w is model.model.embed_tokens.weight and b is None


def test_sft_two_steps(world, tmp_path):
    tok, recs, cat = world
    model = make_model(tok)
    before = params_snapshot(model)
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3,
                    gradient_accumulation_steps=2, learning_rate=1e-3, disable_tqdm=True,
                    kernel_backend="torch", max_length=256, save_steps=0)
    res = sft_train(model, tok, recs, cfg, catalog=cat, num_ranks=NUM_RANKS,
                    eval_records=recs[:3], eval_config=EvalConfig(max_new_tokens=8))
    assert res.step == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    assert res.history[0]["loss"] == pytest.approx(math.log(len(tok)), rel=0.1)
    after = params_snapshot(res.model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert res.eval_history and "ndcg@10" in res.eval_history[-1]


def test_sft_loss_is_completion_cross_entropy(world):
    """SFT's fused -logp equals cross-entropy on the model's logits over completion tokens."""
    from accelerate import Accelerator

    from rankgrpo.encoding import encode_sft
    from rankgrpo.sft import _step_loss, collate

    tok, recs, _ = world
    model = make_model(tok)
    ex, _ = encode_sft(tok, recs[:3], 256, tok.eos_token_id)
    ids, att, lmask = collate(ex, tok.pad_token_id, True, "cpu")
    cfg = SFTConfig(kernel_backend="torch")
    loss = _step_loss(model, model, ids, att, lmask, float(lmask.sum()), cfg, Accelerator(
        cpu=True))
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.where(lmask, ids[:, 1:], -100).reshape(-1))
    assert float(loss.detach()) == pytest.approx(float(ce.detach()), rel=1e-5)
    # the completion (not the prompt) is what is trained: first loss token is the first
    # completion token
    assert int(lmask[0].nonzero()[0]) == ex[0].prompt_length - 1


def test_completion_mask_and_truncation():
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 6, 7, 8, 9], [1, 1, 0, 0, 0]])
    mask, trunc = completion_mask(ids, [1])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert trunc.tolist() == [False, True, False]


def test_hf_rollout_shapes_and_greedy(world):
    tok, recs, _ = world
    model = make_model(tok)
    from rankgrpo.encoding import encode_prompt

    prompts = [encode_prompt(tok, r) for r in recs[:3]]
    ro = HFRollout(model, tok, [tok.eos_token_id])
    a = ro.generate(prompts, max_new_tokens=6, greedy=True)
    b = ro.generate(prompts, max_new_tokens=6, greedy=True)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert a.prompt_ids.shape[0] == 3 and a.completion_ids.shape[1] <= 6
    assert (a.prompt_mask[:, -1] == 1).all()  # left padded
    s = ro.generate(prompts * 2, max_new_tokens=6, temperature=1.0, top_p=0.9)
    assert s.completion_mask.dtype == torch.bool and len(s.texts) == 6


def test_evaluate_returns_all_ks(world):
    tok, recs, cat = world
    m = evaluate(make_model(tok), tok, recs[:4] + recs[:2], cat,
                 config=EvalConfig(max_new_tokens=8, ks=[5, 10]), num_ranks=NUM_RANKS)
    assert {"recall@5", "ndcg@5", "recall@10", "ndcg@10"} <= set(m)
    assert m["num_unique_prompts"] == 4.0  # one generation per unique prompt


class _Forbidden:
    """A rollout that fails the test if anything asks it for completions."""

    def generate(self, *a, **k):  # pragma: no cover - must not run
        raise AssertionError("generation started before the input was checked")


def test_bad_input_is_caught_before_compute(world, tmp_path):
    tok, recs, cat = world
    model = make_model(tok)
    before = params_snapshot(model)
    run = lambda records, **kw: grpo_train(  # noqa: E731
        model, tok, records, cat, grpo_config(tmp_path, **kw), num_ranks=NUM_RANKS,
        rollout=_Forbidden())
    with pytest.raises(DataError, match="training dataset is empty"):
        run([])
    with pytest.raises(DataError, match=r"record 0: the prompt is \d+ tokens, longer than "
                                        r"max_prompt_length=5"):
        run(recs, max_prompt_length=5)
    with pytest.raises(ConfigError, match="not a multiple of num_generations"):
        run(recs, per_device_train_batch_size=3, gradient_accumulation_steps=1)
    with pytest.raises(ConfigError, match="grpo.loss_type"):
        run(recs, loss_type="nope")
    with pytest.raises(DataError, match="evaluation"):
        grpo_train(model, tok, recs, cat, grpo_config(tmp_path), eval_records=[],
                   num_ranks=NUM_RANKS, rollout=_Forbidden())
    sft_cfg = SFTConfig(output_dir=str(tmp_path), max_length=16, disable_tqdm=True)
    with pytest.raises(DataError, match="SFT training dataset is empty"):
        sft_train(model, tok, [], sft_cfg)
    with pytest.raises(DataError, match="SFT record 0.*max_length=16"):
        sft_train(model, tok, recs, sft_cfg)
    after = params_snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_long_prompts_can_be_skipped(world, tmp_path):
    tok, recs, cat = world
    long = dict(recs[0], prompt=recs[0]["prompt"] + " and more" * 200)
    cfg = grpo_config(tmp_path, max_steps=1, long_prompts="skip")
    res = grpo_train(make_model(tok), tok, [long] + recs, cat, cfg, num_ranks=NUM_RANKS,
                     rollout=ScriptedRollout(tok, recs), save_final=False)
    assert res.step == 1


def test_saved_tokenizer_reloads_as_trained(world, tmp_path):
    """A tokenizer trained in-process, saved beside a Qwen2 model, reloads unchanged (plain
    AutoTokenizer would rebuild it as Qwen2Tokenizer, which splits digits)."""
    tok = world[0]
    make_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(ModelConfig(), str(tmp_path))
    text = "Animal (2014)\nBreach (2007)"
    assert again(text).input_ids == tok(text).input_ids
    assert again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True).endswith("<|assistant|>")
