"""Checkpoints that resume exactly, written atomically; Ctrl-C saves one.

A checkpoint folder `checkpoint-{step}` holds
    model.safetensors (+ config)    the trained weights (gathered under ZeRO-3/FSDP)
    optimizer.pt / scheduler.pt     their state dicts (optimizer per rank when sharded)
    rng_rank{r}.pt                  python, numpy, torch (and CUDA) RNG states of each process
    extra_rank{r}.pt                per-process tensors a loop must keep (e.g. a rollout
                                    batch still being iterated on)
    trainer_state.json              step, data position, anything JSON the loop adds
It is written to a temporary folder in the same directory and moved into place with
`os.replace`; `latest` (also replaced atomically) names the newest complete checkpoint.
A crash while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write_text

_CKPT = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(_to_lists(random.getstate())),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- find / rotate

def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := _CKPT.match(p.name)) and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in output_dir (via `latest`, else the highest step)."""
    d = Path(output_dir)
    pointer = d / "latest"
    if pointer.exists():
        p = d / pointer.read_text(encoding="utf-8").strip()
        if (p / "trainer_state.json").exists():
            return p
    ckpts = list_checkpoints(d)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str | bool | None, output_dir: str | os.PathLike) -> Path | None:
    """--resume forms: None/False (fresh run), True/"auto"/"latest" (newest in output_dir;
    fresh if none), or a checkpoint folder."""
    if resume in (None, False, "", "false", "no"):
        return None
    if resume in (True, "auto", "latest", "true", "yes"):
        return latest_checkpoint(output_dir)
    p = Path(str(resume))
    if not (p / "trainer_state.json").exists():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no "
                                "trainer_state.json)")
    return p


def rotate(output_dir: str | os.PathLike, keep: int | None) -> None:
    if keep is None:
        return
    for p in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- save / load

def _is_sharded(accelerator) -> bool:
    if accelerator is None:
        return False
    dist = str(getattr(accelerator, "distributed_type", ""))
    return "DEEPSPEED" in dist or "FSDP" in dist


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model, optimizer=None,
                    scheduler=None, state: dict | None = None,
                    extra: dict[str, Any] | None = None, tokenizer=None, accelerator=None,
                    save_total_limit: int | None = None, rng: dict | None = None) -> Path:
    """Write checkpoint-{step} atomically and point `latest` at it. Every process calls it.
    `rng` overrides this process's current RNG state (e.g. one captured at a step's start)."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    rank = accelerator.process_index if accelerator is not None else 0
    main = accelerator is None or accelerator.is_main_process
    barrier = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    # weights (gathered to the main process)
    if accelerator is not None:
        weights = accelerator.get_state_dict(model)
        unwrapped = accelerator.unwrap_model(model)
    else:
        weights, unwrapped = model.state_dict(), model
    if main:
        unwrapped.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    if optimizer is not None and (main or _is_sharded(accelerator)):
        name = f"optimizer_rank{rank}.pt" if _is_sharded(accelerator) else "optimizer.pt"
        torch.save(optimizer.state_dict(), tmp / name)
    if scheduler is not None and main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / f"rng_rank{rank}.pt")
    if extra:
        torch.save(extra, tmp / f"extra_rank{rank}.pt")
    barrier()
    if main:
        meta = dict(state or {})
        meta["step"] = step
        meta["world_size"] = accelerator.num_processes if accelerator is not None else 1
        with atomic_write_text(tmp / "trainer_state.json") as f:
            json.dump(meta, f, indent=1)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        with atomic_write_text(out / "latest") as f:
            f.write(final.name)
        rotate(out, save_total_limit)
    barrier()
    return final


def load_weights(model, path: str | os.PathLike) -> None:
    """Load checkpoint weights into an (unwrapped) model, strictly."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")
            and getattr(model.config, "tie_word_embeddings", False)}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()


def load_checkpoint(path: str | os.PathLike, *, optimizer=None, scheduler=None,
                    accelerator=None, restore_rng: bool = True) -> tuple[dict, dict | None]:
    """Restore optimizer, scheduler and this process's RNG; returns (trainer_state, extra).

    Load the weights with `load_weights` before wrapping the model (accelerator.prepare).
    """
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    if state.get("world_size", 1) != world:
        raise RuntimeError(f"{path} was saved by {state.get('world_size')} processes; this run "
                           f"has {world}: an exact resume needs the same number")
    if optimizer is not None:
        name = f"optimizer_rank{rank}.pt" if _is_sharded(accelerator) else "optimizer.pt"
        optimizer.load_state_dict(torch.load(path / name, map_location="cpu",
                                             weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if restore_rng:
        set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=True))
    extra_file = path / f"extra_rank{rank}.pt"
    extra = torch.load(extra_file, weights_only=True) if extra_file.exists() else None
    return state, extra


# ----------------------------------------------------------------------------- Ctrl-C

class GracefulInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets `requested`: the loop finishes the
    step in progress, saves a checkpoint and stops. A second Ctrl-C interrupts at once.
    Only the main thread can install signal handlers; elsewhere this is inert."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        print("\n[rankgrpo] Ctrl-C: finishing this step, saving a checkpoint, then stopping "
              "(press again to stop at once)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
