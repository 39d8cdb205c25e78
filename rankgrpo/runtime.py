"""Pieces both training loops share: the trainer state (`TrainerState`: what a checkpoint
holds besides weights, optimizer, scheduler and RNG), the accelerator, the optimizer step and
its non-finite guard, periodic evaluation, resuming (with the config check), the loop itself
(`train_loop`: logging, evaluation, checkpoints, Ctrl-C / SIGTERM, the final save) and the
result object."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    GracefulInterrupt,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
)
from .config import ConfigError
from .model import save_pretrained
from .run_log import RunLogger
from .sampler import EpochSampler

# Config keys a resumed run may change without breaking an exact resume: where and how often
# it logs, evaluates and saves. max_steps / num_train_epochs (extending a run) are allowed
# only when the learning-rate schedule does not depend on the total number of steps.
RESUME_SAFE_KEYS = ("output_dir", "logging_steps", "save_steps", "save_total_limit",
                    "eval_steps", "eval_on_start", "report_to", "disable_tqdm")
LENGTH_KEYS = ("max_steps", "num_train_epochs")


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN or inf (the update was not applied)."""


@dataclass
class TrainerState:
    """What a checkpoint holds besides weights, optimizer, scheduler and RNG: enough for a
    resumed run to continue exactly as an uninterrupted one.

    stage: "sft" or "grpo"; sampler: the data order and position (`EpochSampler`);
    config: the section's config as a dict (a snapshot, compared on resume); step: optimizer
    steps done; num_tokens: tokens trained on so far (all processes); skipped_steps: steps
    whose update was dropped for a non-finite loss or gradient (`skip_nonfinite_steps`).
    `state_dict()` is JSON (trainer_state.json); `extra_state()` holds per-process tensors
    (extra_rank{r}.pt), none here; subclasses add theirs (the RL loop's pending rollout).
    """

    stage: str
    sampler: EpochSampler
    config: dict = field(default_factory=dict)
    step: int = 0
    num_tokens: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return {"stage": self.stage, "step": self.step, "num_tokens": self.num_tokens,
                "skipped_steps": self.skipped_steps, "sampler": self.sampler.state_dict(),
                "config": self.config}

    def extra_state(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict, extra: dict | None = None, device=None) -> None:
        """Restore from a checkpoint's trainer_state.json (and extra_rank{r}.pt). The config
        snapshot stays this run's (see `check_resume_config` for the comparison)."""
        saved_stage = state.get("stage", self.stage)
        if saved_stage != self.stage:
            raise ConfigError(f"the checkpoint is of stage {saved_stage!r}, not "
                              f"{self.stage!r}: resume it with the matching command")
        self.step = int(state["step"])
        self.num_tokens = int(state.get("num_tokens", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.sampler.load_state_dict(state["sampler"])

    def snapshot(self) -> tuple[dict, dict, dict | None]:
        """(RNG, state_dict, extra_state) now: what an emergency save of this moment needs."""
        return rng_state(), self.state_dict(), self.extra_state()


def make_saver(state: TrainerState, out_dir: Path, *, model, optimizer, scheduler, tokenizer,
               accelerator, save_total_limit: int | None) -> Callable[..., Path]:
    """save(step, snapshot=None) -> checkpoint-{step} of `state` now, or of a `snapshot`
    taken earlier (`TrainerState.snapshot`, e.g. at a failed step's start)."""

    def save(step: int, snapshot: tuple | None = None) -> Path:
        rng, meta, extra = snapshot if snapshot is not None else (
            None, state.state_dict(), state.extra_state())
        return save_checkpoint(out_dir, step, model=model, optimizer=optimizer,
                               scheduler=scheduler, state=meta, extra=extra,
                               tokenizer=tokenizer, accelerator=accelerator,
                               save_total_limit=save_total_limit, rng=rng)

    return save


@dataclass
class TrainResult:
    """What `sft_train` / `grpo_train` return.

    model: the trained (unwrapped) model; step: optimizer steps done; history: one dict of
    metrics per step (this run's steps; see metrics.jsonl for a resumed run's earlier ones);
    eval_history: one dict per held-out evaluation ({"step", "recall@5", "ndcg@5", ...});
    final_dir: the saved HF folder (None when not saved); interrupted: stopped by Ctrl-C or
    SIGTERM (after saving a checkpoint); signal: which (signal.SIGINT / SIGTERM), else None.
    """

    model: Any
    step: int
    history: list[dict] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    final_dir: Path | None = None
    checkpoint_dir: Path | None = None
    interrupted: bool = False
    seconds: float = 0.0
    signal: int | None = None


def make_accelerator(cfg):
    """An Accelerator for this process (bf16 autocast when cfg.bf16). Under `accelerate
    launch` its environment decides DDP / FSDP / DeepSpeed.

    FSDP without a GPU (CI's 2 gloo processes): accelerate 1.15 turns FSDP on only for
    accelerator devices and silently makes a CPU run DDP, and torch's FSDP1 refuses CPU;
    torch's FSDP2 (`fully_shard`) runs on gloo, so `fsdp_on_cpu` gives the CPU accelerator
    the FSDP2 plugin the launch environment describes (rankgrpo/configs/accelerate-fsdp.yaml).
    """
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if cpu and fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        # checked before Accelerator(), whose FSDP1 plugin would fail with a device error
        raise ConfigError(f"FSDP without a GPU needs fsdp_version: 2 (FSDP_VERSION="
                          f"{os.environ.get('FSDP_VERSION', '1')}): torch's FSDP1 needs an "
                          "accelerator device; see rankgrpo/configs/accelerate-fsdp.yaml")
    acc = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=cpu)
    if cpu and fsdp:
        fsdp_on_cpu(acc)
    return acc


def fsdp_on_cpu(accelerator, plugin=None):
    """Make a multi-process CPU `accelerator` an FSDP2 one (in place; returns it).

    accelerate 1.15 only enables FSDP for accelerator devices (AcceleratorState keeps a
    MULTI_CPU run DDP and drops the plugin), although FSDP2 itself runs on gloo. This sets
    what it skipped, before anything is prepared: `state.fsdp_plugin`, `state.distributed_type`
    and, as AcceleratorState.__init__ does for GPUs, PartialState's `distributed_type` (every
    later AcceleratorState(), e.g. in accelerate's optimizer wrapper, copies it back).
    `plugin`: a `FullyShardedDataParallelPlugin` with fsdp_version=2, default: the one the
    FSDP_* environment variables of `accelerate launch` describe. A single process (nothing
    to shard) or a non-CPU accelerator is returned unchanged."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return accelerator
    if accelerator._models or accelerator._optimizers:
        raise RuntimeError("fsdp_on_cpu: call it before accelerator.prepare")
    plugin = plugin if plugin is not None else FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(f"FSDP without a GPU needs fsdp_version 2, not {plugin.fsdp_version}")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def steps_for(num_items: int, items_per_step: int, cfg, steps_per_batch: int = 1) -> int:
    """Optimizer steps: max_steps, or enough batches for num_train_epochs."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * num_items / items_per_step)) * steps_per_batch


def optimizer_step(model, optimizer, scheduler, cfg, accelerator, *, step: int | None = None,
                   loss: float | None = None, state: TrainerState | None = None
                   ) -> tuple[float, float]:
    """Clip, step, schedule, zero; returns (grad_norm before clipping, lr used).

    A non-finite gradient norm or `loss` (this process's; the verdict is shared by all
    processes) is never applied: the gradients are dropped and, while `state.skipped_steps`
    < cfg.skip_nonfinite_steps, the step is skipped (counted in state.skipped_steps, the
    scheduler still advances); otherwise `NonFiniteError` names step `step`.
    """
    lr = optimizer.param_groups[0]["lr"]
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    if accelerator is not None and getattr(accelerator, "is_fsdp2", False):
        # FSDP2: DTensor gradients on one mesh, which torch's clip handles. accelerate's
        # matches `params` against every prepared model with `==` (a RuntimeError once a
        # second model was prepared) and returns None when they are not all of its parameters.
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    elif accelerator is not None:
        norm = accelerator.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = float(norm) if norm is not None else float("nan")
    bad = not math.isfinite(norm) or (loss is not None and not math.isfinite(loss))
    if sync_flag(bad, accelerator):
        optimizer.zero_grad(set_to_none=True)
        allowed = getattr(cfg, "skip_nonfinite_steps", 0)
        if state is not None and state.skipped_steps < allowed:
            state.skipped_steps += 1
            scheduler.step()
            return norm, lr
        what = "loss" if loss is not None and not math.isfinite(loss) else "gradient norm"
        raise NonFiniteError(
            f"step {step}: non-finite {what} (loss={loss}, grad_norm={norm}); the update was "
            f"not applied, the last checkpoint is intact (config key skip_nonfinite_steps="
            f"{allowed} is how many such steps a run may skip)")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, lr


def sync_flag(flag: bool, accelerator) -> bool:
    """True on every process when it is True on any (a Ctrl-C seen by one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def run_eval(model, tokenizer, records, catalog, eval_config, num_ranks, accelerator,
             step: int, logger, callbacks: Sequence[Callable[[dict], None]] = ()) -> dict:
    from .evaluate import evaluate

    t0 = time.perf_counter()
    m = evaluate(model, tokenizer, records, catalog, config=eval_config, num_ranks=num_ranks,
                 accelerator=accelerator)
    rec = {"step": step, **m, "time/eval": time.perf_counter() - t0}
    logger.log({"step": step, **{f"eval/{k}": v for k, v in rec.items() if k != "step"}})
    keys = [k for k in ("recall@10", "ndcg@10", "ndcg@20") if k in m]
    logger.write(f"[eval step {step}] " + " ".join(f"{k}={m[k]:.4f}" for k in keys))
    for cb in callbacks:
        cb({"event": "eval", **rec})
    return rec


def _read_history(path: Path, step: int) -> tuple[list[dict], list[dict]]:
    """The step and evaluation records up to `step` in a run's metrics.jsonl (the history of
    the run a resumed one continues)."""
    hist, evals = [], []
    if not path.exists():
        return hist, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) > step:
            continue
        if any(k.startswith("eval/") for k in rec):
            evals.append({"step": rec["step"], **{k[5:]: v for k, v in rec.items()
                                                  if k.startswith("eval/")}})
        else:
            hist.append(rec)
    return hist, evals


def _json_view(value: Any) -> Any:
    return json.loads(json.dumps(value))


def check_resume_config(saved: dict, cfg, allow: bool = False) -> list[str]:
    """Compare a checkpoint's config snapshot with this run's section `cfg`.

    Returns one "key: old -> new" line per changed key. A change outside RESUME_SAFE_KEYS
    (and of max_steps / num_train_epochs under a schedule that depends on the run's length)
    breaks an exact resume: `ConfigError` naming every such key unless `allow`.
    """
    if not saved:
        return []
    now = _json_view(dict(vars(cfg)))
    length_free = cfg.lr_scheduler_type in ("constant", "multistep") or (
        cfg.lr_scheduler_type == "constant_with_warmup" and
        (cfg.warmup_steps > 0 or cfg.warmup_ratio == 0))
    safe = set(RESUME_SAFE_KEYS) | (set(LENGTH_KEYS) if length_free else set())
    changed, unsafe = [], []
    for key in sorted(set(now) | set(saved)):
        if key not in saved or key not in now:
            continue  # a key added or removed by a newer version: nothing to compare
        if saved[key] != now[key]:
            changed.append(f"{key}: {saved[key]!r} -> {now[key]!r}")
            if key not in safe:
                unsafe.append(key)
    if unsafe and not allow:
        raise ConfigError(
            "--resume: the config differs from the checkpoint's in " + "; ".join(
                c for c in changed if c.split(":")[0] in unsafe) + " - this breaks an exact "
            "resume; restore the checkpoint's values or pass --allow-config-change "
            "(allow_config_change=True) to apply them")
    return changed


def preflight_resume(checkpoint: Path | None, cfg, allow_config_change: bool = False) -> int:
    """Before any compute: the step of `checkpoint` (0 for a fresh run), after checking its
    config snapshot against `cfg` (`check_resume_config`)."""
    if checkpoint is None:
        return 0
    meta = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    check_resume_config(meta.get("config", {}), cfg, allow=allow_config_change)
    return int(meta["step"])


def _apply_optimizer_config(optimizer, scheduler, cfg) -> None:
    """After an allowed config change: the optimizer's hyper-parameters and the schedule's
    base learning rate from `cfg` (a loaded optimizer state would keep the old ones)."""
    for g in optimizer.param_groups:
        g.update(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                 weight_decay=cfg.weight_decay, initial_lr=cfg.learning_rate)
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    for g, f in zip(optimizer.param_groups, scheduler.lr_lambdas):
        g["lr"] = cfg.learning_rate * f(scheduler.last_epoch)


def resume_or_seed(checkpoint: Path | None, cfg, optimizer, scheduler, state: TrainerState,
                   accelerator, allow_config_change: bool = False, logger=None
                   ) -> TrainerState:
    """Resume `state`, the optimizer, the scheduler and this process's RNG from
    `checkpoint`, or seed a fresh run with cfg.seed + rank. With allow_config_change the
    changed optimizer keys of `cfg` replace the checkpoint's."""
    if checkpoint is None:
        seed_everything(cfg.seed + accelerator.process_index)
        return state
    meta, extra = load_checkpoint(checkpoint, optimizer=optimizer, scheduler=scheduler,
                                  accelerator=accelerator)
    state.load_state_dict(meta, extra, accelerator.device)
    changes = check_resume_config(meta.get("config", {}), cfg, allow=allow_config_change)
    if changes:
        if allow_config_change:
            _apply_optimizer_config(optimizer, scheduler, cfg)
        if logger is not None:
            logger.write(f"resume from {checkpoint.name}: config changes applied: "
                         + "; ".join(changes))
    return state


STOP_MESSAGE = "stopped by {signal} after step {step}; resume with --resume"


def train_loop(model, tokenizer, cfg, accelerator, logger: RunLogger,
               train_step: Callable[[int], dict], save: Callable[..., Path], *,
               state: TrainerState, total_steps: int, checkpoint: Path | None, eval_records,
               catalog, eval_config, num_ranks: int,
               callbacks: Sequence[Callable[[dict], None]], save_final: bool,
               stop_message: str = STOP_MESSAGE) -> TrainResult:
    """Both stages' loop: optimizer steps state.step+1 .. total_steps, then the end of the run.

    train_step(n) does optimizer step n and returns its metrics; save(n) writes checkpoint-n.
    Around them: state.step advances; each step's metrics go to the history (after those of
    the run resumed from `checkpoint`, if any), the log (every cfg.logging_steps steps and
    the last), the progress bar and the callbacks; `eval_records` (None: none) are evaluated
    on start when cfg.eval_on_start, every cfg.eval_steps steps and at the end (not again
    when a resumed finished run already has that evaluation); a checkpoint is saved every
    cfg.save_steps steps, at the last one and on Ctrl-C / SIGTERM, which then stops the run
    (logged with `stop_message`; TrainResult.signal says which); the model goes to
    <output_dir>/final when save_final and not stopped.
    """
    out_dir = Path(cfg.output_dir)
    step = state.step
    history, evals = [], []
    if checkpoint is not None:
        history, evals = _read_history(out_dir / "metrics.jsonl", step)

    def evaluate(at: int) -> None:
        evals.append(run_eval(model, tokenizer, eval_records, catalog, eval_config, num_ranks,
                              accelerator, at, logger, callbacks))

    interrupted, last_ckpt, signum = False, checkpoint, None
    t_run = time.perf_counter()
    try:
        with GracefulInterrupt() as interrupt:
            if eval_records is not None and cfg.eval_on_start and step == 0:
                evaluate(step)
            while step < total_steps:
                try:
                    rec = train_step(step + 1)
                except ValueError as e:  # the kernels' input check: NaN/inf hidden states
                    if "NaN or inf" not in str(e):
                        raise
                    raise NonFiniteError(f"step {step + 1}: {e}; the update was not applied, "
                                         "the last checkpoint is intact") from e
                step += 1
                state.step = step
                history.append(rec)
                if step % cfg.logging_steps == 0 or step == total_steps:
                    logger.log(rec)
                logger.progress(rec)
                for cb in callbacks:
                    cb({"event": "step", **rec})
                if eval_records is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
                    evaluate(step)
                stop = sync_flag(interrupt.requested, accelerator)
                if (cfg.save_steps and step % cfg.save_steps == 0) or stop or \
                        step == total_steps:
                    last_ckpt = save(step)
                if stop:
                    interrupted = True
                    signum = interrupt.signum or signal.SIGINT
                    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                    logger.write(stop_message.format(step=step, checkpoint=last_ckpt,
                                                     signal=name))
                    break
            already = any(e.get("step") == step for e in evals)
            if not interrupted and eval_records is not None and not already and (
                    not cfg.eval_steps or step % cfg.eval_steps != 0):
                evaluate(step)
    finally:
        logger.close()
    final_dir = None
    if save_final and not interrupted:
        final_dir = out_dir / "final"
        save_pretrained(model, tokenizer, final_dir, accelerator)
    return TrainResult(model=accelerator.unwrap_model(model), step=step, history=history,
                       eval_history=evals, output_dir=out_dir, final_dir=final_dir,
                       checkpoint_dir=last_ckpt, interrupted=interrupted,
                       seconds=time.perf_counter() - t_run, signal=signum)
