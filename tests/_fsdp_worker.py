"""The per-process body of the 2-process (gloo, CPU) FSDP test, started by
`accelerate launch --config_file rankgrpo/configs/accelerate-fsdp.yaml --num_processes 2
tests/_fsdp_worker.py TMP` (tests/test_hardening_fsdp.py; TMP holds the tiny model).

1. One RL step's gradients on this process's 6 of 12 rows (the DDP test's batch), gathered
   whole: the parent compares them with one process's on all 12 rows.
2. Training with sharded checkpoints: 4 straight steps (run `a`, then a held-out
   evaluation: generation), and 2 steps, Ctrl-C, `--resume`, 2 more (run `b`); the parent
   compares the two runs' checkpoint-4. Then one SFT step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

RUN = dict(max_steps=4, num_iterations=3, learning_rate=1e-3, save_steps=2)


def perturb_sharded(model, seed: int, scale: float = 0.01) -> None:
    """`_dp_worker.perturb` for FSDP2's sharded (DTensor) parameters: the same noise.

    Units kept unsharded after a forward (accelerate's embeddings / norm / LM head unit) are
    resharded first: a change to their unsharded copy would be lost at the next reshard."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            assert isinstance(p, DTensor), n
            p.add_(distribute_tensor(scale * torch.randn(p.shape, generator=g), p.device_mesh,
                                     p.placements))


def _interrupt_at(step: int):
    def cb(rec):
        if rec["event"] == "step" and rec["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: finish the step, save, stop
    return cb


def _same(x, y) -> bool:
    """Bitwise equality of two state dicts (nested dicts / lists, DTensors by their shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y))
    if isinstance(x, torch.Tensor):
        x, y = (t.to_local() if isinstance(t, DTensor) else t for t in (x, y))
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    return x == y


def _count_dtensors(sd: dict) -> int:
    from torch.distributed.tensor import DTensor

    return sum(isinstance(v, DTensor) for s in sd["state"].values() for v in s.values())


def main(tmp: str) -> None:
    torch.set_num_threads(1)
    from _dp_worker import ROWS_PER_PROCESS, dp_config, perturb
    from _trainer_world import NUM_RANKS, ScriptedRollout, fixed_batch, make_catalog, make_records
    from transformers import AutoModelForCausalLM

    from rankgrpo.config import EvalConfig, ModelConfig, SFTConfig
    from rankgrpo.model import frozen_copy, is_fsdp2_module, load_tokenizer
    from rankgrpo.rl_step import accumulate_gradients
    from rankgrpo.runtime import make_accelerator
    from rankgrpo.sft import sft_train
    from rankgrpo.train import grpo_train

    acc = make_accelerator(dp_config(tmp))
    rank = acc.process_index
    assert acc.is_fsdp2 and acc.num_processes == 2, acc.state
    tok = load_tokenizer(ModelConfig(), f"{tmp}/tiny")
    recs, cat = make_records(3), make_catalog()

    # 1. gradients
    model = AutoModelForCausalLM.from_pretrained(f"{tmp}/tiny")
    ref = frozen_copy(model)
    perturb(ref, 1)
    cfg = dp_config(tmp)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # FSDP2 prepares a model with its optimizer
    model, opt = acc.prepare(model, opt)
    assert is_fsdp2_module(model)
    shards = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    rows = slice(rank * ROWS_PER_PROCESS, (rank + 1) * ROWS_PER_PROCESS)
    batch, _, _ = fixed_batch(tok, recs, cat, cfg, model=model, ref_model=ref, accelerator=acc,
                              rows=rows)
    perturb_sharded(model, 2)
    metrics = accumulate_gradients(model, batch, cfg, NUM_RANKS, accelerator=acc)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # collective
    if rank == 0:
        torch.save(grads, f"{tmp}/grads_fsdp.pt")
        Path(f"{tmp}/metrics_fsdp.json").write_text(json.dumps(
            {**metrics, "shards": shards,
             "full": {n: list(g.shape) for n, g in grads.items()}}))
    acc.wait_for_everyone()

    # 2. sharded checkpoints: a = 4 straight steps; b = 2 steps, Ctrl-C, resume, 2 steps
    def run(out: str, **kw):
        return grpo_train(AutoModelForCausalLM.from_pretrained(f"{tmp}/tiny"), tok, recs * 2,
                          cat, dp_config(tmp, output_dir=f"{tmp}/{out}", **RUN),
                          num_ranks=NUM_RANKS, accelerator=acc,
                          rollout=ScriptedRollout(tok, recs), save_final=False, **kw)

    a = run("a", eval_records=recs, eval_config=EvalConfig(max_new_tokens=4))
    b1 = run("b", callbacks=[_interrupt_at(2)])
    b2 = run("b", resume=True)
    # the SFT loop under FSDP2 too: one step
    sft = sft_train(AutoModelForCausalLM.from_pretrained(f"{tmp}/tiny"), tok, recs * 2,
                    SFTConfig(output_dir=f"{tmp}/sft", max_steps=1, disable_tqdm=True,
                              per_device_train_batch_size=2, kernel_backend="torch",
                              max_length=256),
                    accelerator=acc, save_final=False)

    # each process's optimizer shard after step 4: straight == resumed, bitwise
    name = f"checkpoint-4/optimizer_rank{rank}.pt"
    sa, sb = (torch.load(f"{tmp}/{r}/{name}", weights_only=True) for r in "ab")
    Path(f"{tmp}/optimizer_same_rank{rank}.json").write_text(json.dumps(
        {"same": _same(sa, sb), "dtensors": _count_dtensors(sa)}))
    if rank == 0:
        Path(f"{tmp}/runs_fsdp.json").write_text(json.dumps({
            "a": [h["loss"] for h in a.history], "a_eval": a.eval_history[-1]["ndcg@5"],
            "b1": [h["loss"] for h in b1.history], "b1_interrupted": b1.interrupted,
            "b2": [h["loss"] for h in b2.history], "b2_step": b2.step,
            "b2_interrupted": b2.interrupted, "sft": sft.history[0]}))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
