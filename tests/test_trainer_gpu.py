"""The trainer on a CUDA device (run with `-m gpu`): the loss through the trainer with the
default (Triton) kernels against a float64 logits reference, bf16 training steps, and one
step at Qwen2.5-0.5B's shape with its time and memory printed."""

import math
import time

import pytest
import torch
from _trainer_world import (
    NUM_RANKS,
    ScriptedRollout,
    fixed_batch,
    grpo_config,
    make_model,
    world_fixture,
)

from rankgrpo.config import GRPOConfig
from rankgrpo.model import build_tiny_model, frozen_copy
from rankgrpo.rl_step import RLBatch, accumulate_gradients
from rankgrpo.train import grpo_train
from rankgrpo_kernels import rank_grpo_loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

world = world_fixture(8)


def _to(batch: RLBatch, device) -> RLBatch:
    return RLBatch.from_state_dict(batch.state_dict(), device)


@pytest.mark.parametrize("level", ["rank", "token"])
def test_gpu_trainer_loss_equals_fp64_reference(world, level):
    tok, recs, cat = world
    torch.manual_seed(0)
    model = make_model(tok).cuda()
    ref = frozen_copy(model)
    with torch.no_grad():
        for q in ref.parameters():
            q.add_(0.02 * torch.randn_like(q))
    cfg = GRPOConfig(num_generations=4, per_device_train_batch_size=6, beta=0.05,
                     num_iterations=2, importance_sampling_level=level, kernel_backend="auto",
                     max_completion_length=64)
    batch, _, _ = fixed_batch(tok, recs[:4], cat, cfg)
    batch = _to(batch, "cuda")
    from rankgrpo.rl_step import add_logprobs

    batch = add_logprobs(batch, model, ref, cfg)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.01 * torch.randn_like(q))
    m = accumulate_gradients(model, batch, cfg, NUM_RANKS)
    grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()
    p = batch.prompt_width
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=pos).logits[:, p - 1:-1].double()
    logp = torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.unsqueeze(-1))[..., 0]
    loss, _ = rank_grpo_loss(logp, batch.old_logp, batch.advantages.double(),
                             batch.segment_ids, batch.completion_mask, ref_logp=batch.ref_logp,
                             beta=cfg.beta, level=level, normalizer=batch.normalizer,
                             num_segments=NUM_RANKS + 1, advantages_per="token",
                             backend="reference")
    loss.backward()
    assert m["loss"] == pytest.approx(float(loss.detach()), rel=1e-3, abs=1e-5)
    for n, q in model.named_parameters():
        torch.testing.assert_close(grads[n], q.grad, rtol=5e-3, atol=5e-5, msg=n)


def test_gpu_grpo_bf16_steps_with_generate(world, tmp_path):
    tok, recs, cat = world
    cfg = grpo_config(tmp_path, bf16=True, kernel_backend="auto", max_steps=2, beta=0.01,
                      num_iterations=2, max_completion_length=32)
    res = grpo_train(make_model(tok), tok, recs, cat, cfg, num_ranks=NUM_RANKS)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert res.history[0]["memory/peak_gib"] > 0


def test_gpu_qwen05b_shape_step(world, tmp_path):
    """One Rank-GRPO step (bf16 autocast, fused kernels) on a random model of Qwen2.5-0.5B's
    shape (H 896, 24 layers, V 151936), 32 scripted completions: prints time and memory."""
    tok, recs, cat = world
    torch.manual_seed(0)
    model = build_tiny_model(151936, hidden_size=896,
                             intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2,
                             max_position_embeddings=4096)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    cfg = grpo_config(tmp_path, bf16=True, kernel_backend="auto", max_steps=2, beta=1e-3,
                      num_generations=8, per_device_train_batch_size=16,
                      gradient_accumulation_steps=2, max_completion_length=64,
                      learning_rate=1e-6)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = grpo_train(model.cuda(), tok, recs, cat, cfg, num_ranks=NUM_RANKS,
                     rollout=ScriptedRollout(tok, recs), save_final=False)
    torch.cuda.synchronize()
    h = res.history[-1]
    print(f"\nqwen0.5b-shape step: {h['time/step']:.3f}s step, loss {h['loss']:.4f}, "
          f"{h['tokens_per_second']:.0f} tok/s, peak {h['memory/peak_gib']:.2f} GiB, "
          f"{torch.cuda.get_device_name()} total {time.perf_counter() - t0:.1f}s")
    assert math.isfinite(h["loss"])
