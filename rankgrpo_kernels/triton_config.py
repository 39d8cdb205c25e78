"""Block sizes of the Triton phase-1 kernels: a small table keyed by dtype and hidden size.

Nothing here depends on the number of tokens N: the forward's reduction over the vocabulary
(tiles, splits, their order) is then the same for a row in a batch of 1 or of 64, which is what
makes it batch-invariant. The backward may depend on N (the dz slab width and the token split
of the dW GEMM do); it is deterministic for a given shape, not batch-invariant.

Override for experiments (bench sweeps, tests) with `override(...)` or the environment variable
RANKGRPO_TRITON_CONFIG, e.g.
    RANKGRPO_TRITON_CONFIG="fwd=128x256x64w8s3,v_split=16384,dh=128x256x64w8s3,slab_mib=128"
Keys: fwd, dz, dw, dh (tiles, MxNxK + w<num_warps> + s<num_stages>), v_split, group,
slab_mib, slab_cols ("slab_mib=64" trades backward speed for less memory at large T),
dhidden (accumulate | recompute, below), dh_splits, fill (programs per SM the split GEMMs aim
for; their fp32 partial buffers grow with it).

dhidden: how the backward forms dhidden = dz @ W over the whole vocabulary.
    "accumulate" (the default until a GPU run decides): per vocabulary slab, dh += dz[:, slab]
        @ W[slab] into an fp32 [N, H] running sum (4 N H bytes extra for 16-bit operands with
        more than one slab), 8 T H V FLOPs for the whole step.
    "recompute": the vocabulary-slab pass computes dW (and dbias) only; a second pass walks
        token slabs, recomputes the logit tiles of all V for them into a [rows, V] dz slab and
        runs dh[rows] = dz @ W with the reduction over all of V inside the GEMM (split over V
        into `dh_splits` fp32 partials, summed in a fixed order, when the token slab has too
        few output tiles to fill the GPU). No [N, H] fp32 buffer; 10 T H V FLOPs.

A tile's M, N and K are, per kernel:
    fwd / dz  M tokens,        N vocabulary columns, K hidden (the logit tile and its K-loop)
    dw        M slab columns,  N hidden columns,     K tokens  (dW[slab] = dz^T @ hidden)
    dh        M tokens,        N hidden columns,     K slab columns (dh += dz @ W[slab])
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    m: int
    n: int
    k: int
    num_warps: int = 8
    num_stages: int = 3

    def __str__(self) -> str:
        return f"{self.m}x{self.n}x{self.k}w{self.num_warps}s{self.num_stages}"


@dataclass(frozen=True)
class Config:
    fwd: Tile              # lse_partial_kernel
    v_split: int           # vocabulary columns per forward split (a multiple of fwd.n)
    group: int             # token blocks per L2 group in the forward
    dz: Tile               # dlogits_kernel
    dw: Tile               # dweight_kernel
    dh: Tile               # dhidden_kernel
    slab_mib: float = 64   # budget for the backward's dz slab [N, slab] (MiB)
    slab_cols: int = 0     # slab width to aim for within that budget (0: as wide as it allows)
    combine_rows: int = 64  # rows per program of lse_combine_kernel
    combine_k: int = 64     # hidden chunk of its target-logit dot
    dhidden: str = "accumulate"  # DHIDDEN_MODES: fp32 running sum, or recompute the logits
    dh_splits: int = 0      # recompute: vocabulary splits of the dh GEMM (0: enough to fill)
    fill: int = 2           # programs per SM the split GEMMs aim for (dW token splits, dh
                            # vocabulary splits): their fp32 partials take ~fill x SMs tiles


DHIDDEN_MODES = ("accumulate", "recompute")


# GPU table. 16-bit operands use the tensor cores (wgmma on sm_90, mma on sm_80); fp32 uses
# input_precision="ieee" (exact fp32, CUDA cores), the correctness path, not a speed target.
# 16-bit: timed on an H200 with triton 3.6 (bench/results/2026-11-26-h200-tune/). A 4096-column
# dz slab was the fastest width at T=8192 and T=32768 (narrower slabs mean more dhidden
# read-add-write passes), capped by slab_mib (4096 columns reach 256 MiB at T=32768). dW's GEMM
# takes 128 x 256 tiles; the other kernels keep 128 x 128, because 128 x 256 made them spill
# on sm_90 (though it timed faster there; see the tune log).
_GPU_16 = Config(
    fwd=Tile(128, 128, 64, num_warps=8, num_stages=4), v_split=8192, group=16,
    dz=Tile(128, 128, 64, num_warps=8, num_stages=4),
    dw=Tile(128, 256, 64, num_warps=8, num_stages=3),
    dh=Tile(128, 128, 64, num_warps=8, num_stages=4),
    slab_mib=256, slab_cols=4096,
)
_GPU_32 = Config(
    fwd=Tile(64, 64, 32, num_warps=4, num_stages=2), v_split=4096, group=8,
    dz=Tile(64, 64, 32, num_warps=4, num_stages=2),
    dw=Tile(64, 64, 16, num_warps=4, num_stages=2),  # K=32 spills on sm_80 (transposed dz)
    dh=Tile(64, 64, 32, num_warps=4, num_stages=2),
)
# Interpreter (CPU): one program costs ~0.5 ms whatever its size, so tiles are large.
_INTERPRET = Config(
    fwd=Tile(64, 512, 64), v_split=2048, group=2,
    dz=Tile(64, 512, 64), dw=Tile(256, 64, 64), dh=Tile(64, 64, 256),
    slab_mib=1, combine_rows=64, combine_k=64,
)

_override: dict = {}


def _parse_env() -> dict:
    return parse_spec(os.environ.get("RANKGRPO_TRITON_CONFIG", ""))


def parse_spec(spec: str) -> dict:
    """"fwd=128x128x64w8s4,v_split=8192,..." -> Config field changes."""
    out: dict = {}
    spec = spec.strip()
    if not spec:
        return out
    for item in spec.split(","):
        key, _, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if key in ("fwd", "dz", "dw", "dh"):
            m = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:w(\d+))?(?:s(\d+))?", val)
            if not m:
                raise ValueError(f"RANKGRPO_TRITON_CONFIG: bad tile {item!r}, "
                                 f"expected e.g. {key}=128x128x64w8s4")
            out[key] = Tile(int(m[1]), int(m[2]), int(m[3]), int(m[4] or 8), int(m[5] or 3))
        elif key in ("v_split", "group", "combine_rows", "combine_k", "slab_cols",
                     "dh_splits", "fill"):
            out[key] = int(val)
        elif key == "dhidden":
            out[key] = val
        elif key == "slab_mib":
            out[key] = float(val)
        else:
            raise ValueError(f"RANKGRPO_TRITON_CONFIG: unknown key {key!r}")
    return out


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def base_config(dtype: torch.dtype, hidden: int, vocab: int, *, interpret: bool) -> Config:
    """The table entry, before overrides. Depends on dtype, H and V only (never on N)."""
    if interpret:
        return _INTERPRET
    if dtype == torch.float32:
        return _GPU_32
    return _GPU_16


def select(dtype: torch.dtype, hidden: int, vocab: int, *, interpret: bool | None = None
           ) -> Config:
    """The configuration for operands of `dtype`, hidden size H and vocabulary V."""
    cfg = base_config(dtype, hidden, vocab,
                      interpret=interpreting() if interpret is None else interpret)
    changes = {**_parse_env(), **_override}
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
    if cfg.v_split % cfg.fwd.n:
        raise ValueError(f"v_split={cfg.v_split} must be a multiple of the forward tile's "
                         f"N={cfg.fwd.n}")
    if cfg.dhidden not in DHIDDEN_MODES:
        raise ValueError(f"dhidden={cfg.dhidden!r}: expected one of {DHIDDEN_MODES}")
    if cfg.fill < 1:
        raise ValueError(f"fill={cfg.fill}: expected a positive number of programs per SM")
    if cfg.dh_splits < 0:
        raise ValueError(f"dh_splits={cfg.dh_splits}: expected 0 (automatic) or a positive "
                         "count")
    return cfg


@contextlib.contextmanager
def override(**changes):
    """Temporarily replace Config fields (e.g. fwd=Tile(...), v_split=..., slab_mib=...)."""
    bad = set(changes) - {f.name for f in dataclasses.fields(Config)}
    if bad:
        raise ValueError(f"unknown Config fields: {sorted(bad)}")
    saved = dict(_override)
    _override.update(changes)
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)
