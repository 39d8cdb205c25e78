"""Checkpoints: RNG round trip, atomic writes and rotation, exact resume (parameters bitwise)
after Ctrl-C and after a crash, for both training stages."""

import os
import random
import signal

import numpy as np
import pytest
import torch
from _trainer_world import (
    NUM_RANKS,
    ScriptedRollout,
    grpo_config,
    make_model,
    params_snapshot,
    world_fixture,
)

from rankgrpo import checkpoint as ck
from rankgrpo.config import SFTConfig
from rankgrpo.sft import sft_train
from rankgrpo.train import grpo_train

world = world_fixture(8)


def test_rng_state_round_trip(tmp_path):
    ck.seed_everything(3)
    state = ck.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(2))
    ck.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_atomic_save_rotation_and_failed_save(world, tmp_path, monkeypatch):
    tok = world[0]
    model = make_model(tok)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, model=model, optimizer=opt, state={"x": step},
                           save_total_limit=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-3"
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, 4, model=model, optimizer=opt, state={})
    monkeypatch.setattr(torch, "save", real_save)
    # the failed save left the newest complete checkpoint in charge
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-3"
    assert ck.resolve_resume(True, tmp_path).name == "checkpoint-3"
    assert not (tmp_path / "checkpoint-4").exists()
    ck.save_checkpoint(tmp_path, 4, model=model, optimizer=opt, state={})
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert ck.resolve_resume(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ck.resolve_resume(str(tmp_path / "nope"), tmp_path)


def _interrupt_at(step):
    def cb(rec):
        if rec["event"] == "step" and rec["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: finish the step, save, stop
    return cb


def _assert_bitwise(model_a, model_b):
    a, b = params_snapshot(model_a), params_snapshot(model_b)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def _grpo(world, out, resume=None, callbacks=(), rollout=None, **kw):
    tok, recs, cat = world
    cfg = grpo_config(out, **{"max_steps": 4, "beta": 0.02, "num_iterations": 3,
                              "save_steps": 0, **kw})
    return grpo_train(make_model(tok), tok, recs, cat, cfg, num_ranks=NUM_RANKS,
                      rollout=rollout or ScriptedRollout(tok, recs), resume=resume,
                      callbacks=callbacks, save_final=False)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """4 uninterrupted steps (a rollout serves 3 optimizer steps: rounds at steps 1 and 4)."""
    return _grpo(world, tmp_path_factory.mktemp("straight"))


def test_grpo_resume_after_ctrl_c_is_bitwise(world, tmp_path, straight):
    first = _grpo(world, tmp_path / "b", callbacks=[_interrupt_at(2)])
    assert first.interrupted and first.step == 2
    assert first.checkpoint_dir.name == "checkpoint-2"  # mid-round: rollout batch saved
    assert (first.checkpoint_dir / "extra_rank0.pt").exists()
    second = _grpo(world, tmp_path / "b", resume=True)
    assert second.step == 4 and not second.interrupted
    _assert_bitwise(straight.model, second.model)
    assert [h["loss"] for h in second.history] == [h["loss"] for h in straight.history]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4


class _CrashOnCall(ScriptedRollout):
    def __init__(self, tok, recs, crash_at):
        super().__init__(tok, recs)
        self.calls, self.crash_at = 0, crash_at

    def generate(self, *a, **k):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("reward server went away")
        return super().generate(*a, **k)


def test_crash_loses_at_most_the_step_in_progress(world, tmp_path, straight):
    """No periodic saves at all: the error in step 4's rollout still leaves checkpoint-3,
    and resuming from it reproduces the uninterrupted run exactly."""
    tok, recs, _ = world
    with pytest.raises(RuntimeError, match="went away"):
        _grpo(world, tmp_path / "b", rollout=_CrashOnCall(tok, recs, 2))
    assert ck.latest_checkpoint(tmp_path / "b").name == "checkpoint-3"
    resumed = _grpo(world, tmp_path / "b", resume=True)
    _assert_bitwise(straight.model, resumed.model)


def _sft(world, out, resume=None, callbacks=()):
    tok, recs, _ = world
    cfg = SFTConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=2,
                    gradient_accumulation_steps=2, learning_rate=1e-3, disable_tqdm=True,
                    kernel_backend="torch", max_length=256, save_steps=0, warmup_ratio=0.25)
    return sft_train(make_model(tok), tok, recs, cfg, resume=resume, callbacks=callbacks,
                     save_final=False)


def test_sft_resume_after_ctrl_c_is_bitwise(world, tmp_path):
    straight = _sft(world, tmp_path / "a")
    first = _sft(world, tmp_path / "b", callbacks=[_interrupt_at(2)])
    assert first.interrupted and first.step == 2
    second = _sft(world, tmp_path / "b", resume=str(first.checkpoint_dir))
    _assert_bitwise(straight.model, second.model)
    assert [h["learning_rate"] for h in second.history] == [
        h["learning_rate"] for h in straight.history]


def test_resume_needs_the_same_world_size(world, tmp_path):
    tok = world[0]
    model = make_model(tok)
    path = ck.save_checkpoint(tmp_path, 1, model=model, state={})
    state = (path / "trainer_state.json").read_text().replace('"world_size": 1',
                                                               '"world_size": 2')
    (path / "trainer_state.json").write_text(state)
    with pytest.raises(RuntimeError, match="saved by 2 processes"):
        ck.load_checkpoint(path)
