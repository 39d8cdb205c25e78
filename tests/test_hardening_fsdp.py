"""The accelerate FSDP config (rankgrpo/configs/accelerate-fsdp.yaml, FSDP2) on 2 CPU processes
over gloo, started exactly as a user starts it (`accelerate launch --config_file ...`):

- one RL step's gradients equal one process's on the same 12 rows (the DDP test's batch and
  tolerances, tests/test_trainer_invariance.py), and every parameter is really sharded;
- a sharded checkpoint (optimizer_rank{r}.pt per process) resumes bitwise: 2 steps, Ctrl-C,
  --resume, 2 steps == 4 straight steps (weights, each optimizer shard, every step's loss);
- the held-out evaluation (generation) and one SFT step run under FSDP2 as well.

Without a GPU, accelerate 1.15 would make this launch a DDP run and torch's FSDP1 refuses the
CPU; rankgrpo's make_accelerator gives the CPU accelerator the FSDP2 plugin
(rankgrpo.runtime.fsdp_on_cpu) and refuses fsdp_version 1 on CPU in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _dp_worker import assert_metrics_match, free_port, single_process_metrics
from _trainer_world import make_model, world_fixture

from rankgrpo.config import ConfigError, GRPOConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "rankgrpo" / "configs" / "accelerate-fsdp.yaml"

world = world_fixture(3)


@pytest.fixture(scope="module")
def fsdp_run(world, tmp_path_factory):
    """The worker's outputs (tests/_fsdp_worker.py) after one 2-process launch."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this checks the CPU (gloo) path")
    tok = world[0]
    tmp = tmp_path_factory.mktemp("fsdp")
    model = make_model(tok)
    model.save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    # the shipped config as is (its bf16 is overridden by the run's own bf16 key: False)
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", str(CONFIG), "--num_processes", "2",
           "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "_fsdp_worker.py"), str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return tmp, model


def test_shipped_config_is_fsdp2():
    cfg = yaml.safe_load(CONFIG.read_text())
    assert cfg["distributed_type"] == "FSDP" and cfg["fsdp_config"]["fsdp_version"] == 2


def test_fsdp_gradients_equal_one_process(world, fsdp_run):
    """2 FSDP processes x 6 rows (one group split across them) == 1 process x 12 rows."""
    tmp, model = fsdp_run
    single = single_process_metrics(world, model, tmp)
    fsdp = json.loads((tmp / "metrics_fsdp.json").read_text())
    # really sharded: each process holds half of every parameter's rows (dim 0)
    for n, p in model.named_parameters():
        assert fsdp["full"][n] == list(p.shape), n
        assert fsdp["shards"][n][0] == (p.shape[0] + 1) // 2, n
    assert_metrics_match(fsdp, single)
    grads = torch.load(tmp / "grads_fsdp.pt", weights_only=True)
    assert grads.keys() == dict(model.named_parameters()).keys()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    worst = max(((grads[n] - p.grad).abs().max() / p.grad.abs().max()).item()
                for n, p in model.named_parameters())
    print(f"[fsdp] loss {fsdp['loss']!r} vs one process {single['loss']!r}; largest "
          f"|grad difference| / max |grad| over parameters: {worst:.2e}")


def test_fsdp_sharded_checkpoint_resumes_bitwise(fsdp_run):
    """4 straight steps == 2 steps + Ctrl-C + --resume + 2 steps, with sharded checkpoints."""
    from safetensors.torch import load_file

    tmp, _ = fsdp_run
    runs = json.loads((tmp / "runs_fsdp.json").read_text())
    assert runs["b1_interrupted"] and len(runs["b1"]) == 2
    assert runs["b2_step"] == 4 and not runs["b2_interrupted"]
    assert runs["b2"] == runs["a"] and len(runs["a"]) == 4  # every step's loss, exactly
    assert runs["a_eval"] == runs["a_eval"]  # the held-out evaluation ran (generation)
    sft = runs["sft"]  # the SFT loop ran a step under FSDP2 too
    assert sft["loss"] > 0 and 0 < sft["grad_norm"] < float("inf")
    mid = tmp / "b" / "checkpoint-2"
    assert {p.name for p in mid.glob("optimizer*.pt")} == {"optimizer_rank0.pt",
                                                           "optimizer_rank1.pt"}
    assert (mid / "extra_rank1.pt").exists()  # mid-round: each process's rollout batch
    wa = load_file(tmp / "a" / "checkpoint-4" / "model.safetensors")
    wb = load_file(tmp / "b" / "checkpoint-4" / "model.safetensors")
    w0 = load_file(tmp / "tiny" / "model.safetensors")
    # the gathered state dict also names the tied LM head (lm_head.weight == the embeddings)
    assert wa.keys() == wb.keys() and set(w0) <= set(wa)
    assert any(not torch.equal(wa[k], w0[k]) for k in w0)  # it trained
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    if "lm_head.weight" not in w0:
        assert torch.equal(wa["lm_head.weight"], wa["model.embed_tokens.weight"])
    for r in (0, 1):
        same = json.loads((tmp / f"optimizer_same_rank{r}.json").read_text())
        assert same["dtensors"] > 0 and same["same"], (r, same)


def test_fsdp1_on_cpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: FSDP1 is allowed there")
    from rankgrpo.runtime import make_accelerator

    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        make_accelerator(GRPOConfig(output_dir="unused"))
