"""The contenders: the same inputs through each loss implementation.

Each contender has
    skip_reason(device) -> None when it can run here, else why not (reported as "skipped");
    loss(inp)           -> the scalar loss with autograd attached (the timed forward);
    logp(inp)           -> per-token log-probs without grad (the old/ref log-prob pass),
                           or None when the contender has no such pass of its own.
The timed backward is `loss.backward()` for all of them.

Contenders:
    triton, torch, native   ours, `fused_linear_rank_grpo_loss(backend=...)`, rank level
    triton-token/-seq       ours at token / sequence level (the levels Liger has)
    reference               backend="reference": fp32 logits materialised, log_softmax and
                            autograd, as TRL computes per-token log-probs
    liger-token/-seq        liger-kernel's LigerFusedLinearGRPOLoss (computes the gradients
                            inside its forward, so its "backward" is nearly free)
    cce+seg                 Cut Cross-Entropy `linear_cross_entropy(reduction="none")`
                            (logp = -CE) followed by our segment stage in PyTorch
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

import rankgrpo_kernels as rk

from .inputs import Inputs

# Clip ranges per level: the paper's defaults (SPEC section 7). Every contender at a level
# gets the same ones.
EPSILONS = {"rank": (0.06, 0.08), "token": (0.2, 0.26), "sequence": (3e-4, 4e-4)}


def _module_missing(name: str) -> str | None:
    return None if importlib.util.find_spec(name) is not None else f"{name} not installed"


class Contender:
    name = ""
    level = "rank"
    compiles = False          # first calls compile or autotune: warm up one extra time
    note = ""

    def skip_reason(self, device: torch.device) -> str | None:
        return None

    def compiles_on(self, device: torch.device) -> bool:
        return self.compiles

    def loss(self, inp: Inputs) -> torch.Tensor:
        raise NotImplementedError

    def logp(self, inp: Inputs) -> torch.Tensor | None:
        return None

    def has_logp(self) -> bool:
        """False where the no-grad pass is another contender's (the same kernel)."""
        return False

    def _adv(self, inp: Inputs) -> torch.Tensor:
        return inp.adv_rank if self.level == "rank" else inp.adv_row


class Ours(Contender):
    def __init__(self, name: str, backend: str, level: str = "rank"):
        self.name, self.backend, self.level = name, backend, level
        self.compiles = backend in ("triton", "native")
        self.note = f'fused_linear_rank_grpo_loss(backend="{backend}", level="{level}")'

    def skip_reason(self, device):
        if self.backend == "triton" and device.type != "cuda":
            return "no CUDA device (the Triton interpreter is for tests, not timing)"
        if self.backend == "triton" and not rk.triton_available():
            return "rankgrpo_kernels.triton_available() is False"
        if self.backend == "native" and not rk.native_available():
            return "native op library not built (rankgrpo_kernels.native_available() is False)"
        return None

    def loss(self, inp):
        lo, hi = EPSILONS[self.level]
        loss, _ = rk.fused_linear_rank_grpo_loss(
            inp.hidden, inp.weight, inp.targets, inp.old_logp, self._adv(inp), inp.segment_ids,
            inp.mask, backend=self.backend, validate=False, level=self.level,
            loss_type="bnpo", epsilon_low=lo, epsilon_high=hi)
        return loss

    def has_logp(self):
        return self.level == "rank"  # other levels: the same pass as the rank-level one

    def logp(self, inp):
        with torch.no_grad():
            return rk.linear_logprobs(inp.hidden, inp.weight, inp.targets,
                                      backend=self.backend, validate=False)


class Reference(Ours):
    def __init__(self):
        super().__init__("reference", "reference")
        self.note = "materialised fp32 logits + log_softmax + autograd (TRL-style)"


class Liger(Contender):
    def __init__(self, level: str):
        self.level = level
        self.name = "liger-token" if level == "token" else "liger-seq"
        self._module = None
        self.note = f'LigerFusedLinearGRPOLoss(importance_sampling_level="{level}")'

    def skip_reason(self, device):
        return _module_missing("liger_kernel")

    def compiles_on(self, device):
        return device.type == "cuda"

    def _get(self, device: torch.device, compiled: bool | None = None):
        if self._module is None or compiled is not None:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            lo, hi = EPSILONS[self.level]
            if compiled is None:
                compiled = self.compiles_on(device)  # torch.compile of its loss math
            self._module = LigerFusedLinearGRPOLoss(
                beta=0.0, compiled=compiled, use_ref_model=False, epsilon_low=lo,
                epsilon_high=hi, loss_type="bnpo", importance_sampling_level=self.level)
            self.note = (f'LigerFusedLinearGRPOLoss(importance_sampling_level="{self.level}", '
                         f'compiled={compiled})')
        return self._module

    def loss(self, inp):
        module = self._get(inp.hidden.device)
        args = (inp.hidden, inp.weight, inp.targets, inp.mask_int, inp.adv_row)
        try:
            loss, _ = module(*args, old_per_token_logps=inp.old_logp)
        except Exception as err:  # noqa: BLE001 - torch.compile can fail on a bare machine
            if not module.compiled or "out of memory" in str(err).lower():
                raise
            inp.clear_grads()
            loss, _ = self._get(inp.hidden.device, compiled=False)(
                *args, old_per_token_logps=inp.old_logp)
            self.note += f" after torch.compile failed ({type(err).__name__}: {str(err)[:80]})"
        return loss

    def has_logp(self):
        return self.level == "token"  # liger-seq: the same pass as liger-token

    def logp(self, inp):
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

        with torch.no_grad():
            return LigerFusedLinearPPOBase.chunk_forward(inp.hidden, inp.weight, inp.targets)


class CCE(Contender):
    name = "cce+seg"
    compiles = True
    note = 'linear_cross_entropy(reduction="none") then rank_grpo_loss(backend="torch")'

    def __init__(self, allow_cpu: bool = False):
        self.allow_cpu = allow_cpu

    def skip_reason(self, device):
        missing = _module_missing("cut_cross_entropy")
        if missing:
            return missing
        if device.type != "cuda" and not self.allow_cpu:
            return ("CCE's kernel needs CUDA; its torch_compile fallback takes ~25 s to "
                    "compile on CPU (--cce-cpu to include it)")
        return None

    def _neg_ce(self, inp):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if inp.hidden.is_cuda else "torch_compile"
        return -linear_cross_entropy(inp.hidden, inp.weight, inp.targets, reduction="none",
                                     impl=impl)

    def loss(self, inp):
        lo, hi = EPSILONS["rank"]
        loss, _ = rk.rank_grpo_loss(self._neg_ce(inp), inp.old_logp, inp.adv_rank,
                                    inp.segment_ids, inp.mask, backend="torch", validate=False,
                                    level="rank", loss_type="bnpo", epsilon_low=lo,
                                    epsilon_high=hi)
        return loss

    def has_logp(self):
        return True

    def logp(self, inp):
        with torch.no_grad():
            return self._neg_ce(inp)


def make(name: str, *, cce_cpu: bool = False) -> Contender:
    table = {
        "triton": lambda: Ours("triton", "triton"),
        "triton-token": lambda: Ours("triton-token", "triton", "token"),
        "triton-seq": lambda: Ours("triton-seq", "triton", "sequence"),
        "torch": lambda: Ours("torch", "torch"),
        "native": lambda: Ours("native", "native"),
        "reference": Reference,
        "liger-token": lambda: Liger("token"),
        "liger-seq": lambda: Liger("sequence"),
        "cce+seg": lambda: CCE(allow_cpu=cce_cpu),
    }
    if name not in table:
        raise ValueError(f"unknown contender {name!r}; known: {sorted(table)}")
    return table[name]()


def segment_stage_backends(device: torch.device) -> dict[str, str | None]:
    """Segment-stage implementations -> None if runnable here, else why not."""
    out: dict[str, str | None] = {"torch": None, "reference": None}
    out["native"] = None if rk.native_available() else "native op library not built"
    try:
        importlib.import_module("rankgrpo_kernels.segment_triton")
        out["triton"] = None if device.type == "cuda" else "no CUDA device"
    except Exception:  # noqa: BLE001 - any import failure: no Triton segment kernel
        out["triton"] = "no Triton segment kernel (rankgrpo_kernels.segment_triton)"
    return out
