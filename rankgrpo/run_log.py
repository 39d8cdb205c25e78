"""Where a run's metrics go: a JSONL file (one object per logged step), optional TensorBoard,
and a tqdm progress bar showing reward / NDCG / tokens per second."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from .fileio import atomic_write_text


def peak_memory_gib() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"memory/peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _clean(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Writes on the main process only. On resume, entries after the resumed step are
    dropped from the JSONL file, so the log matches the run that continues."""

    def __init__(self, output_dir, *, report_to=("jsonl",), main: bool = True,
                 total_steps: int = 0, initial_step: int = 0, disable_tqdm: bool = False,
                 desc: str = "train", postfix_keys: dict[str, str] | None = None):
        self.main = main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.jsonl = "jsonl" in report_to and main
        self.tb = None
        self.postfix_keys = postfix_keys or {}
        if main:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
        if self.jsonl:
            self._truncate_after(initial_step)
        if "tensorboard" in report_to and main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the install
                raise ImportError("report_to includes 'tensorboard' but the tensorboard "
                                  "package is missing: pip install tensorboard") from e
            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        self.bar = None
        if main and not disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc,
                            dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        with atomic_write_text(self.path) as f:
            f.write("".join(x + "\n" for x in keep))

    def log(self, record: dict) -> None:
        if not self.main:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        if self.jsonl:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = int(rec.get("step", 0))
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def progress(self, record: dict, advance: int = 1) -> None:
        if self.bar is None:
            return
        post = {}
        for short, key in self.postfix_keys.items():
            if key in record:
                post[short] = f"{record[key]:.4g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(advance)

    def write(self, message: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
