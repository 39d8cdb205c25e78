"""The per-process body of the 2-process (gloo, CPU) data-parallel test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ROWS_PER_PROCESS = 6  # 3 prompts x G=4 = 12 rows; prompt 1's group spans both processes
# Loss metrics that must not depend on how a step is split over micro-batches or processes
# (sums and extremes reduced over both, then turned into means).
SPLIT_FREE = ("kl", "entropy", "importance_ratio/mean", "importance_ratio/min",
              "importance_ratio/max", "clip_ratio/region_mean", "frac_tokens_nonzero_advantage")


def perturb(model, seed: int, scale: float = 0.01) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(scale * torch.randn(p.shape, generator=g))


def dp_config(tmp, **kw):
    from rankgrpo.config import GRPOConfig

    base = dict(output_dir=str(Path(tmp) / "run"), num_generations=4,
                per_device_train_batch_size=3, gradient_accumulation_steps=2, beta=0.05,
                num_iterations=2, kernel_backend="torch", max_completion_length=64,
                max_prompt_length=128, disable_tqdm=True, save_steps=0, seed=0)
    base.update(kw)
    return GRPOConfig(**base)


def free_port() -> int:
    """A free TCP port on the loopback for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_metrics(world, model, tmp) -> dict:
    """The one-process reference of a 2-process run: the same 12 rows (reference model and
    policy perturbed as the workers perturb them) through `accumulate_gradients`; the
    gradients are left on `model`."""
    from _trainer_world import NUM_RANKS, fixed_batch

    from rankgrpo.model import frozen_copy
    from rankgrpo.rl_step import accumulate_gradients

    tok, recs, cat = world
    cfg = dp_config(tmp)
    ref = frozen_copy(model)
    perturb(ref, 1)
    batch, _, _ = fixed_batch(tok, recs, cat, cfg, model=model, ref_model=ref)
    assert len(batch) == 2 * ROWS_PER_PROCESS
    perturb(model, 2)
    return accumulate_gradients(model, batch, cfg, NUM_RANKS)


def assert_metrics_match(multi: dict, single: dict) -> None:
    """The loss, its token count and every split-free metric of a multi-process run equal
    the one-process run's."""
    import pytest

    assert multi["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-7)
    assert multi["num_loss_tokens"] == single["num_loss_tokens"]
    for k in SPLIT_FREE:
        assert multi[k] == pytest.approx(single[k], rel=1e-5, abs=1e-7), k


def worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from _trainer_world import NUM_RANKS, ScriptedRollout, fixed_batch, make_catalog, make_records
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from rankgrpo.config import EvalConfig, ModelConfig, SFTConfig
    from rankgrpo.model import frozen_copy, load_tokenizer
    from rankgrpo.rl_step import accumulate_gradients
    from rankgrpo.sft import sft_train
    from rankgrpo.train import grpo_train

    acc = Accelerator(cpu=True)
    assert acc.num_processes == world, acc.state
    tok = load_tokenizer(ModelConfig(), f"{tmp}/tiny")
    model = AutoModelForCausalLM.from_pretrained(f"{tmp}/tiny")
    ref = frozen_copy(model)
    perturb(ref, 1)
    recs, cat = make_records(3), make_catalog()
    cfg = dp_config(tmp)
    model = acc.prepare(model)
    rows = slice(rank * ROWS_PER_PROCESS, (rank + 1) * ROWS_PER_PROCESS)
    batch, _, _ = fixed_batch(tok, recs, cat, cfg, model=model, ref_model=ref, accelerator=acc,
                              rows=rows)
    perturb(acc.unwrap_model(model), 2)
    metrics = accumulate_gradients(model, batch, cfg, NUM_RANKS, accelerator=acc)
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in acc.unwrap_model(model).named_parameters()},
                   f"{tmp}/grads_dp.pt")
        Path(f"{tmp}/metrics_dp.json").write_text(json.dumps(metrics))
    acc.wait_for_everyone()

    # the loops themselves, distributed: one RL step (with eval and a checkpoint), one SFT step
    policy = AutoModelForCausalLM.from_pretrained(f"{tmp}/tiny")
    res = grpo_train(policy, tok, recs * 2, cat, dp_config(tmp, max_steps=1, num_iterations=1),
                     num_ranks=NUM_RANKS, eval_records=recs,
                     eval_config=EvalConfig(max_new_tokens=4), accelerator=acc,
                     rollout=ScriptedRollout(tok, recs))
    sft = sft_train(AutoModelForCausalLM.from_pretrained(f"{tmp}/tiny"), tok, recs * 2,
                    SFTConfig(output_dir=f"{tmp}/sft", max_steps=1, per_device_train_batch_size=2,
                              disable_tqdm=True, kernel_backend="torch", max_length=256),
                    accelerator=acc, save_final=False)
    if rank == 0:
        Path(f"{tmp}/loops_dp.json").write_text(json.dumps({
            "grpo_loss": res.history[0]["loss"], "grpo_eval": res.eval_history[-1]["ndcg@5"],
            "sft_loss": sft.history[0]["loss"], "ckpt": str(res.checkpoint_dir)}))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()
