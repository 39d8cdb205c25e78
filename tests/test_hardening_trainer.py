"""The training loops under attack: a NaN mid-run (stop naming the step, or skip it when
configured), damaged checkpoints (--resume falls back to the newest intact one, exactly),
a resume with a changed config (named, refused unless allowed, then applied), and the
trainer state's round trip."""

from __future__ import annotations

import json

import pytest
import torch
from _trainer_world import make_model, params_snapshot, world_fixture

from rankgrpo import checkpoint as ck
from rankgrpo.config import ConfigError, SFTConfig
from rankgrpo.runtime import NonFiniteError, TrainerState
from rankgrpo.sampler import EpochSampler
from rankgrpo.sft import sft_train

world = world_fixture(8)


def _cfg(out, **kw) -> SFTConfig:
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, learning_rate=1e-3, disable_tqdm=True,
                kernel_backend="torch", max_length=256, save_steps=1, save_total_limit=None,
                lr_scheduler_type="constant")
    base.update(kw)
    return SFTConfig(**base)


def _sft(world, out, resume=None, model=None, allow=False, **kw):
    tok, recs, _ = world
    return sft_train(model if model is not None else make_model(tok), tok, recs,
                     _cfg(out, **kw), resume=resume, save_final=False,
                     allow_config_change=allow)


def _nan_on_backwards(model, calls: set[int]) -> None:
    """The LM head's gradient is NaN on the given backward calls (1-based; the input
    embedding is tied to it, so the hook is on the shared weight): that step's gradient
    norm is NaN."""
    count = [0]

    def hook(grad):
        count[0] += 1
        return grad * float("nan") if count[0] in calls else grad

    model.get_output_embeddings().weight.register_hook(hook)


def _all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nonfinite_gradient_stops_naming_the_step_and_keeps_the_last_checkpoint(world, tmp_path):
    tok = world[0]
    model = make_model(tok)
    _nan_on_backwards(model, {5})  # 2 micro-batches a step: the 5th backward is step 3's
    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite gradient norm"):
        _sft(world, tmp_path, model=model)
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert not (tmp_path / "checkpoint-3").exists()
    assert ck.check_checkpoint(tmp_path / "checkpoint-2") is None
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_nonfinite_forward_stops_naming_the_step(world, tmp_path):
    """NaN hidden states (e.g. an overflow in the forward) are caught by the kernels' input
    check; the loop reports them as a non-finite step too."""
    tok = world[0]
    model = make_model(tok)
    count = [0]

    def hook(_mod, _inp, out):
        count[0] += 1
        return out * float("nan") if count[0] == 5 else out

    model.model.norm.register_forward_hook(hook)
    with pytest.raises(NonFiniteError, match=r"^step 3: hidden contains NaN"):
        _sft(world, tmp_path, model=model)
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_nonfinite_step_is_skipped_when_allowed(world, tmp_path):
    tok = world[0]
    model = make_model(tok)
    snaps = {}
    _nan_on_backwards(model, {5})
    res = sft_train(model, tok, world[1], _cfg(tmp_path, skip_nonfinite_steps=1),
                    save_final=False,
                    callbacks=[lambda r: snaps.__setitem__(r["step"], params_snapshot(model))
                               if r["event"] == "step" else None])
    assert res.step == 4 and _all_finite(res.model)
    assert [h["nonfinite_skipped"] for h in res.history] == [0.0, 0.0, 1.0, 0.0]
    # the skipped step applied nothing
    assert all(torch.equal(snaps[2][n], snaps[3][n]) for n in snaps[2])
    assert not all(torch.equal(snaps[3][n], snaps[4][n]) for n in snaps[3])
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1
    # a second bad step is one too many
    model = make_model(tok)
    _nan_on_backwards(model, {3, 7})
    with pytest.raises(NonFiniteError, match=r"^step 4: "):
        sft_train(model, tok, world[1], _cfg(tmp_path / "b", skip_nonfinite_steps=1),
                  save_final=False)


def test_cli_reports_a_nonfinite_run_in_one_line(monkeypatch, tmp_path, capsys):
    import rankgrpo.cli as cli

    def boom(*a, **k):
        raise NonFiniteError("step 7: non-finite gradient norm (loss=1.0, grad_norm=nan)")

    monkeypatch.setattr(cli, "run", boom)
    monkeypatch.setattr(cli, "preflight", lambda *a: None)
    rc = cli.main(["sft", "model.tiny={}", "model.tokenizer_name_or_path=x",
                   "data.train_file=x", f"sft.output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "step 7" in err


def _truncate(path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _flip(path) -> None:
    """Alter one byte in the middle (inside the tensor data) of a file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_are_named_and_skipped(world, tmp_path, capsys):
    straight = _sft(world, tmp_path / "a", max_steps=3)
    _sft(world, tmp_path / "b", max_steps=3)
    b = tmp_path / "b"
    assert [p.name for p in ck.list_checkpoints(b)] == [f"checkpoint-{i}" for i in (1, 2, 3)]
    _truncate(b / "checkpoint-3" / "model.safetensors", 4000)
    _flip(b / "checkpoint-2" / "optimizer.pt")
    assert "model.safetensors" in ck.check_checkpoint(b / "checkpoint-3")
    assert "optimizer.pt" in ck.check_checkpoint(b / "checkpoint-2")
    capsys.readouterr()
    assert ck.resolve_resume(True, b).name == "checkpoint-1"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert "checkpoint-3/model.safetensors" in err[0] and "checkpoint-2/optimizer.pt" in err[1]
    assert "resuming from checkpoint-1 instead" in err[2]
    with pytest.raises(FileNotFoundError, match="checkpoint-3/model.safetensors"):
        ck.resolve_resume(str(b / "checkpoint-3"), b)
    # the resumed run ends where the uninterrupted one did, bitwise
    resumed = _sft(world, b, resume=True, max_steps=3)
    a, r = params_snapshot(straight.model), params_snapshot(resumed.model)
    assert all(torch.equal(a[n], r[n]) for n in a)
    # every checkpoint damaged: an error, not a silent fresh start
    for c in ck.list_checkpoints(b):
        _truncate(c / "trainer_state.json", 5)
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        ck.resolve_resume(True, b)


def test_resume_with_a_changed_config(world, tmp_path):
    _sft(world, tmp_path, max_steps=2, save_steps=0)
    with pytest.raises(ConfigError, match=r"learning_rate: 0\.001 -> 0\.002") as e:
        _sft(world, tmp_path, resume=True, max_steps=3, learning_rate=2e-3)
    assert "max_steps" not in str(e.value)  # constant schedule: extending is harmless
    with pytest.raises(ConfigError, match="per_device_train_batch_size: 2 -> 1"):
        _sft(world, tmp_path, resume=True, max_steps=3, per_device_train_batch_size=1,
             gradient_accumulation_steps=4)
    with pytest.raises(ConfigError, match="max_steps: 2 -> 3"):  # cosine: it changes the lr
        _sft(world, tmp_path, resume=True, max_steps=3, lr_scheduler_type="cosine")
    # harmless keys pass; an allowed change is applied, not silently ignored
    res = _sft(world, tmp_path, resume=True, max_steps=3, learning_rate=2e-3,
               logging_steps=2, allow=True)
    assert res.history[-1]["learning_rate"] == 2e-3 and res.history[-1]["step"] == 3
    res = _sft(world, tmp_path, resume=True, max_steps=4, learning_rate=2e-3,
               logging_steps=3, save_steps=2)
    assert res.step == 4


def test_trainer_state_round_trip():
    from rankgrpo.rl_step import RLBatch
    from rankgrpo.train import RLTrainerState, _Round

    s = TrainerState("sft", EpochSampler(10, 3), {"learning_rate": 1.0})
    s.sampler.take(4)
    s.step, s.num_tokens, s.skipped_steps = 5, 123, 1
    meta = json.loads(json.dumps(s.state_dict()))
    t = TrainerState("sft", EpochSampler(10, 3))
    t.load_state_dict(meta)
    assert (t.step, t.num_tokens, t.skipped_steps) == (5, 123, 1)
    assert t.sampler.take(6) == s.sampler.take(6)
    with pytest.raises(ConfigError, match="stage 'sft'"):
        TrainerState("grpo", EpochSampler(10, 3)).load_state_dict(meta)
    # the RL state also carries the rollout round still being iterated on
    fields = {f: torch.arange(6).reshape(2, 3) for f in RLBatch.__dataclass_fields__}
    try:
        batch = RLBatch(**fields)
    except TypeError:
        pytest.skip("RLBatch has non-tensor fields")
    r = RLTrainerState("grpo", EpochSampler(10, 3), num_iterations=3,
                       pending=_Round(batch, {"reward": 0.5}, iteration=1))
    meta, extra = json.loads(json.dumps(r.state_dict())), r.extra_state()
    assert meta["pending_iteration"] == 1 and extra is not None
    q = RLTrainerState("grpo", EpochSampler(10, 3), num_iterations=3)
    q.load_state_dict(meta, extra, "cpu")
    assert q.pending.iteration == 1 and q.pending.metrics == {"reward": 0.5}
    assert all(torch.equal(getattr(q.pending.batch, f), fields[f]) for f in fields)
    r.pending.iteration = 3  # used up: nothing pending is saved
    assert "pending_iteration" not in r.state_dict() and r.extra_state() is None
