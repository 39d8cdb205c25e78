"""The gradient of a step does not depend on how its completions are split: into
micro-batches (gradient accumulation) or across processes (2 CPU processes, gloo, DDP)."""

import json

import pytest
import torch
import torch.multiprocessing as mp
from _dp_worker import (
    SPLIT_FREE,
    assert_metrics_match,
    free_port,
    perturb,
    single_process_metrics,
    worker,
)
from _trainer_world import NUM_RANKS, fixed_batch, grads_snapshot, make_model, world_fixture

from rankgrpo.config import GRPOConfig
from rankgrpo.model import frozen_copy
from rankgrpo.rl_step import accumulate_gradients
from rankgrpo_kernels import AGGREGATIONS

world = world_fixture(3)


# One loss type per aggregation (its own denominator): the other loss types differ in the
# surrogate only, whose split invariance the kernel's tests check over every LOSS_TYPES.
@pytest.mark.parametrize("loss_type", AGGREGATIONS)
def test_gradient_accumulation_invariance(world, loss_type):
    tok, recs, cat = world
    model = make_model(tok)
    cfg = GRPOConfig(num_generations=4, beta=0.05, num_iterations=2, loss_type=loss_type,
                     kernel_backend="torch", max_completion_length=64)
    ref = frozen_copy(model)
    perturb(ref, 1)
    batch, _, _ = fixed_batch(tok, recs, cat, cfg, model=model, ref_model=ref)
    perturb(model, 2)
    results = []
    sizes = (12, 5, 1) if loss_type == "rank" else (12, 5)  # whole, ragged, one row each
    for size in sizes:
        model.zero_grad()
        cfg.per_device_train_batch_size = size
        m = accumulate_gradients(model, batch, cfg, NUM_RANKS)
        results.append((m, grads_snapshot(model)))
    (m0, g0) = results[0]
    for m, g in results[1:]:
        assert m["loss"] == pytest.approx(m0["loss"], rel=1e-5, abs=1e-7)
        assert m["num_loss_tokens"] == m0["num_loss_tokens"]
        for k in SPLIT_FREE:
            assert m[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-7), k
        for n in g0:
            torch.testing.assert_close(g[n], g0[n], rtol=1e-4, atol=1e-7, msg=n)


def test_data_parallel_split_invariance(world, tmp_path):
    """2 processes x 6 rows (one group split across them) == 1 process x 12 rows."""
    tok, recs, cat = world
    model = make_model(tok)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    single = single_process_metrics(world, model, tmp_path)
    dp = json.loads((tmp_path / "metrics_dp.json").read_text())
    assert_metrics_match(dp, single)
    grads = torch.load(tmp_path / "grads_dp.pt", weights_only=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    loops = json.loads((tmp_path / "loops_dp.json").read_text())
    assert all(v == v for v in (loops["grpo_loss"], loops["sft_loss"], loops["grpo_eval"]))
    assert loops["ckpt"].endswith("checkpoint-1")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one step and one evaluation, written once (main process)
