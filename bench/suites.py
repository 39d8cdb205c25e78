"""Shapes and suites: what each `python -m bench --suite NAME` measures.

A suite is data: shapes, token counts, dtype, device, contenders and time budgets. The
runner (runner.py) reads nothing else, so adding a shape or a contender is one line here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Shape:
    """An LM head: hidden size H and vocabulary size V."""

    name: str
    hidden: int
    vocab: int


SHAPES = {
    s.name: s
    for s in (
        Shape("qwen2.5-0.5b", 896, 151936),
        Shape("llama-3.2-3b", 3072, 128256),
        Shape("qwen2.5-7b", 3584, 152064),
        Shape("cpu-4k", 256, 32000),
        Shape("tiny", 40, 301),       # nothing a multiple of a block size
        Shape("small", 128, 4099),
    )
}

# Every contender the suites know, in the order tables list them (fast ones first).
ALL_CONTENDERS = (
    "triton", "triton-token", "triton-seq", "triton-lean", "torch", "native", "cce+seg",
    "trl-chunked+seg", "compile-chunked+seg", "liger-token", "liger-seq", "liger-triton-token",
    "reference",
)


@dataclass(frozen=True)
class Suite:
    name: str
    device: str                     # "cpu" or "cuda"
    dtype: str                      # "float32" or "bfloat16"
    shapes: tuple[str, ...]
    tokens: tuple[int, ...]
    contenders: tuple[str, ...]
    completion_len: int = 1024      # tokens per completion (rows = T / completion_len)
    num_ranks: int = 20
    isolate: bool = False           # one process per contender (CPU memory needs it)
    input_sets: int = 1             # rotated between calls so caches do not serve them
    warmup: int = 1                 # extra warm-ups for contenders that compile/autotune
    max_reps: int = 20
    min_reps: int = 2
    cell_budget_s: float = 2.0      # timed reps of one contender at one size
    max_step_s: float = 20.0        # skip a size whose step is predicted to take longer
    budget_s: float = 0.0           # whole suite; 0 = no limit
    rounds: int = 1                 # isolated timing processes per contender, interleaved
    segment_table: bool = True
    targets: bool = True            # check docs/design.md's performance targets
    threads: int = 0                # torch CPU threads; 0 = torch's default
    notes: tuple[str, ...] = field(default_factory=tuple)


SUITES = {
    "smoke": Suite(
        name="smoke", device="cpu", dtype="float32", shapes=("tiny",),
        tokens=(128, 256), completion_len=64,
        contenders=("triton", "torch", "native", "cce+seg", "trl-chunked+seg",
                    "compile-chunked+seg", "liger-token", "liger-seq", "liger-triton-token",
                    "reference"),
        max_reps=2, min_reps=1, cell_budget_s=0.05, max_step_s=60.0, budget_s=0.0,
        targets=False, threads=1,
        notes=("CI smoke run: tiny shapes, one thread, numbers are not performance data",)),
    "cpu": Suite(
        name="cpu", device="cpu", dtype="float32", shapes=("cpu-4k",), tokens=(4096,),
        contenders=("torch", "reference"), isolate=True, max_reps=2, cell_budget_s=30.0,
        max_step_s=600.0, rounds=2, segment_table=False,
        notes=("each contender in its own process; memory = growth of the process's peak "
               "resident set (VmHWM) over the step, in a process whose glibc mmap threshold "
               "is pinned so that freed blocks return to the OS",)),
    "cpu-trl": Suite(
        name="cpu-trl", device="cpu", dtype="float32", shapes=("cpu-4k",), tokens=(4096,),
        contenders=("torch", "trl-chunked+seg", "reference"), isolate=True, max_reps=2,
        cell_budget_s=30.0, max_step_s=600.0, rounds=1, segment_table=False,
        notes=("ours (torch backend) beside TRL 1.16's two log-prob paths at V = 32000: its "
               "chunked LM head (ChunkedLogProbFunction, what add_fused_lm_head runs) and "
               "materialised fp32 logits (reference), each followed by the same segment stage",
               "each contender in its own process; memory = growth of the process's peak "
               "resident set (VmHWM) over the step, in a process whose glibc mmap threshold "
               "is pinned so that freed blocks return to the OS",)),
    "standard": Suite(
        name="standard", device="cuda", dtype="bfloat16",
        shapes=("qwen2.5-0.5b", "llama-3.2-3b", "qwen2.5-7b"), tokens=(8192, 32768),
        contenders=ALL_CONTENDERS, input_sets=2, warmup=1, max_reps=25, cell_budget_s=1.5,
        max_step_s=5.0, budget_s=330.0,
        notes=("contenders run in the order listed; a size whose step is predicted (linearly "
               "in T from the previous size) above 5 s, or past the suite's time budget, is "
               "skipped with the prediction as the reason",)),
}

_CUSTOM_SHAPE = re.compile(r"^(\d+)x(\d+)$")


def parse_shapes(text: str) -> tuple[str, ...]:
    """Comma-separated shape names or HxV pairs (e.g. "qwen2.5-0.5b,1024x50000")."""
    names = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        m = _CUSTOM_SHAPE.match(item)
        if m:
            SHAPES.setdefault(item, Shape(item, int(m.group(1)), int(m.group(2))))
        elif item not in SHAPES:
            raise ValueError(f"unknown shape {item!r}; known: {sorted(SHAPES)} or HxV")
        names.append(item)
    if not names:
        raise ValueError("--shapes is empty")
    return tuple(names)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def parse_contenders(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in ALL_CONTENDERS]
    if bad or not names:
        raise ValueError(f"unknown contender(s) {bad}; known: {list(ALL_CONTENDERS)}")
    return names


def customise(suite: Suite, **changes) -> Suite:
    """The suite with command-line overrides (None means keep)."""
    return replace(suite, **{k: v for k, v in changes.items() if v is not None})
