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
A crash while saving leaves the previous checkpoint intact; a checkpoint damaged later
(a truncated or corrupt file) is detected by `check_checkpoint`, and `--resume` falls back
to the newest intact one. `prepare_output_dir` refuses to start a fresh run in the folder of
an old one (unless told to overwrite it).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import zipfile
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


def check_checkpoint(path: str | os.PathLike) -> str | None:
    """None when checkpoint folder `path` is intact, else what is wrong, naming the file.

    Reads trainer_state.json; checks each .safetensors header against the file's size (a
    truncated file fails) and each .pt archive's CRCs (a truncated or altered one fails),
    without building any tensor.
    """
    p = Path(path)
    f = p / "trainer_state.json"
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "step" not in state:
            return f"{f}: no 'step' in it"
    except (OSError, ValueError) as e:
        return f"{f}: {type(e).__name__}: {e}"
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        return f"{p}: no .safetensors weights"
    for f in weights:
        problem = _check_safetensors(f)
        if problem:
            return f"{f}: {problem}"
    for f in sorted(p.glob("*.pt")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{f}: CRC mismatch in {bad}"
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            return f"{f}: {type(e).__name__}: {e}"
    return None


def _check_safetensors(f: Path) -> str | None:
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                return "truncated header"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if 8 + n + end != size:
        return f"truncated or padded: {size} bytes, the header describes {8 + n + end}"
    return None


def resolve_resume(resume: str | bool | None, output_dir: str | os.PathLike,
                   log=None) -> Path | None:
    """--resume forms: None/False (fresh run), True/"auto"/"latest" (the newest intact
    checkpoint in output_dir; fresh if none), or a checkpoint folder (which must be intact).

    A damaged checkpoint is reported in one line naming the file (to `log`, default stderr,
    main process only) and skipped in favour of the next newest.
    """
    if resume in (None, False, "", "false", "no"):
        return None
    if resume in (True, "auto", "latest", "true", "yes"):
        say = log or (lambda m: print(m, file=sys.stderr, flush=True))
        newest = latest_checkpoint(output_dir)
        candidates = list_checkpoints(output_dir)
        if newest is not None and newest not in candidates and _CKPT.match(newest.name):
            candidates.append(newest)
        candidates.sort(key=lambda c: int(_CKPT.match(c.name).group(1)), reverse=True)
        skipped = []
        for c in candidates:
            problem = check_checkpoint(c)
            if problem is None:
                if skipped and _is_main_env():
                    say(f"[rankgrpo] resuming from {c.name} instead (newest intact checkpoint)")
                return c
            skipped.append(c)
            if _is_main_env():
                say(f"[rankgrpo] checkpoint damaged, skipped: {problem}")
        if skipped:
            raise FileNotFoundError(f"--resume: no intact checkpoint in {output_dir} (all "
                                    f"{len(skipped)} are damaged)")
        return None
    p = Path(str(resume))
    if not (p / "trainer_state.json").exists():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no "
                                "trainer_state.json)")
    problem = check_checkpoint(p)
    if problem is not None:
        raise FileNotFoundError(f"--resume {resume}: checkpoint damaged: {problem}")
    return p


def _is_main_env() -> bool:
    return os.environ.get("RANK", "0") == "0"


# names a fresh run writes into its output_dir; --overwrite removes exactly these
RUN_FILES = ("latest", "metrics.jsonl", "final", "tensorboard")


def run_entries(output_dir: str | os.PathLike) -> list[Path]:
    """The entries of an old run in output_dir: checkpoints (also unfinished ones), `latest`,
    metrics.jsonl, final/, tensorboard/."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name in RUN_FILES or _CKPT.match(p.name)
                  or p.name.startswith(".tmp-checkpoint-"))


def prepare_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool,
                       log=None) -> None:
    """Refuse a fresh run in a non-empty output_dir (it would mix with, then destroy, the
    old run: rotation deletes the new checkpoints, `latest` dangles, metrics.jsonl is
    wiped) unless `resume` (continue it) or `overwrite` (delete the old run's checkpoints,
    latest, metrics.jsonl, final/ and tensorboard/ first, saying so). Raises
    FileExistsError / NotADirectoryError / PermissionError with a one-line message."""
    d = Path(output_dir)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"output_dir {str(d)!r} is a file, not a folder")
    if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir {str(d)!r} is not writable")
    if not d.exists():
        parent = next((q for q in d.parents if q.exists()), None)
        if parent is not None and not parent.is_dir():
            raise NotADirectoryError(f"output_dir {str(d)!r}: {str(parent)!r} is a file")
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"output_dir {str(d)!r} cannot be created: {str(parent)!r} "
                                  "is not writable")
        return
    if resume or not any(d.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"output_dir {str(d)!r} is not empty (an earlier run?): pass "
                              "--resume to continue it, --overwrite to replace it, or choose "
                              "another output_dir")
    old = run_entries(d)
    for p in old:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if old:
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"[rankgrpo] --overwrite: removed {', '.join(p.name for p in old)} from {d}")


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
        from .model import quiet_hf_saving

        with quiet_hf_saving():
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
    """While active, the first Ctrl-C (SIGINT) or SIGTERM only sets `requested` (and
    `signum`): the loop finishes the step in progress, saves a checkpoint and stops. A second
    one interrupts at once. Only the main thread can install signal handlers; elsewhere this
    is inert."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n[rankgrpo] {name}: finishing this step, saving a checkpoint, then stopping "
              "(send it again to stop at once)", flush=True)

    def _restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        self._restore()
        return False
