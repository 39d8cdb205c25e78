"""The contenders: the same inputs through each loss implementation.

Each contender has
    skip_reason(device) -> None when it can run here, else why not (reported as "skipped");
    loss(inp)           -> the scalar loss with autograd attached (the timed forward);
    logp(inp)           -> per-token log-probs without grad (the old/ref log-prob pass),
                           or None when the contender has no such pass of its own.
The timed backward is `contender.backward(loss)`: `loss.backward()`, for triton-lean inside
its configuration.

Contenders:
    triton, torch, native   ours, `fused_linear_rank_grpo_loss(backend=...)`, rank level
    triton-token/-seq       ours at token / sequence level (the levels Liger has)
    triton-lean             ours (triton, rank level) under the round-2 memory-lean Triton
                            configuration LEAN_CONFIG (dhidden recomputed, 32 MiB slab), timed
                            beside the default table in the same run
    reference               backend="reference": fp32 logits materialised, log_softmax and
                            autograd, as TRL computes per-token log-probs
    liger-token/-seq        liger-kernel's LigerFusedLinearGRPOLoss (computes the gradients
                            inside its forward, so its "backward" is nearly free)
    cce+seg                 Cut Cross-Entropy `linear_cross_entropy(reduction="none")`
                            (logp = -CE) followed by our segment stage in PyTorch
    trl-chunked+seg         TRL's own chunked LM-head log-probs (`ChunkedLogProbFunction`, what
                            `add_fused_lm_head` runs; cuBLAS tiles + a Triton fold on CUDA,
                            torch ops elsewhere) followed by our segment stage in PyTorch
    liger-triton-token      liger-kernel's newest GRPO entry point, `triton_grpo_loss`: a Triton
                            loss over materialised bf16 logits (CUDA only)
    compile-chunked+seg     a token-chunked log-prob written in PyTorch, each chunk under
                            `torch.compile` and activation checkpointing (recomputed in the
                            backward), followed by our segment stage in PyTorch
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import torch

import rankgrpo_kernels as rk
from rankgrpo_kernels import triton_config

from .inputs import Inputs

# Clip ranges per level: the paper's defaults (docs/math.md section 7). Every contender at a level
# gets the same ones.
EPSILONS = {"rank": (0.06, 0.08), "token": (0.2, 0.26), "sequence": (3e-4, 4e-4)}


def loss_kwargs(level: str, inp: Inputs) -> dict:
    """The keyword arguments every contender at `level` passes to our loss functions: the
    bench's settings (bnpo, the level's clip range, no validation) and where each completion
    ends (eos_mask, which per-rank advantages need to give the EOS token advantage 0)."""
    lo, hi = EPSILONS[level]
    kw = dict(validate=False, level=level, loss_type="bnpo", epsilon_low=lo, epsilon_high=hi)
    if "eos_mask" in inspect.signature(rk.rank_grpo_loss).parameters:
        kw["eos_mask"] = inp.eos_mask
    return kw


def segment_loss(logp: torch.Tensor, inp: Inputs) -> torch.Tensor:
    """Our segment stage (torch backend) on per-token log-probs from a peer's phase 1."""
    loss, _ = rk.rank_grpo_loss(logp, inp.old_logp, inp.adv_rank, inp.segment_ids, inp.mask,
                                backend="torch", **loss_kwargs("rank", inp))
    return loss


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

    def backward(self, loss: torch.Tensor) -> None:
        """The timed backward (a contender whose kernels read a setting at backward time
        applies it here too)."""
        loss.backward()

    def has_logp(self) -> bool:
        """False where the no-grad pass is another contender's (the same kernel)."""
        return False

    # whose no-grad pass this contender's is, when has_logp() is False
    logp_same_as = "the contender's other level"

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
        loss, _ = rk.fused_linear_rank_grpo_loss(
            inp.hidden, inp.weight, inp.targets, inp.old_logp, self._adv(inp), inp.segment_ids,
            inp.mask, backend=self.backend, **loss_kwargs(self.level, inp))
        return loss

    def has_logp(self):
        return self.level == "rank"  # other levels: the same pass as the rank-level one

    def logp(self, inp):
        with torch.no_grad():
            return rk.linear_logprobs(inp.hidden, inp.weight, inp.targets,
                                      backend=self.backend, validate=False)


# The round-2 configuration aimed at <= 64 MiB extra at T = 32768 (docs/design.md; see
# tools.triton_tune --plan-only): no fp32 dhidden running sum, a 32 MiB dz slab, one program
# per SM for the split GEMMs.
LEAN_CONFIG = "dhidden=recompute,slab_mib=32,fill=1"


class Configured(Ours):
    """Ours under a RANKGRPO_TRITON_CONFIG-style override, applied around each call."""

    def __init__(self, name: str, spec: str):
        super().__init__(name, "triton")
        self.changes = triton_config.parse_spec(spec)
        self.note = f'{self.note} with RANKGRPO_TRITON_CONFIG="{spec}"'

    def loss(self, inp):
        with triton_config.override(**self.changes):
            return super().loss(inp)

    # Config fields the no-grad forward reads; the others (dz slab, dhidden mode, splits of
    # the backward GEMMs) change the backward only, whose forward is then triton's own.
    FORWARD_FIELDS = frozenset({"fwd", "v_split", "group", "combine_rows", "combine_k"})
    logp_same_as = "triton's (the configuration changes the backward only)"

    def has_logp(self):
        return bool(self.FORWARD_FIELDS & self.changes.keys())

    def logp(self, inp):
        with triton_config.override(**self.changes):
            return super().logp(inp)

    def backward(self, loss):
        with triton_config.override(**self.changes):  # the backward selects its tiles again
            loss.backward()


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


class LogpThenSegment(Contender):
    """A peer's per-token log-prob path (`_logp`) followed by our segment stage: the loss is
    `segment_loss(_logp(inp))` and the no-grad pass is `_logp` under no_grad."""

    def _logp(self, inp: Inputs) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, inp):
        return segment_loss(self._logp(inp), inp)

    def has_logp(self):
        return True

    def logp(self, inp):
        with torch.no_grad():
            return self._logp(inp)


class CCE(LogpThenSegment):
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

    def _logp(self, inp):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if inp.hidden.is_cuda else "torch_compile"
        return -linear_cross_entropy(inp.hidden, inp.weight, inp.targets, reduction="none",
                                     impl=impl)


class TRLChunked(LogpThenSegment):
    """TRL 1.16's fused LM-head path: `ChunkedLogProbFunction` on the masked positions (on
    Triton devices, as `add_fused_lm_head` compacts them; every position elsewhere), scattered
    back, then our segment stage."""

    name = "trl-chunked+seg"
    compiles = True  # its Triton fold kernels compile on the first call (CUDA)
    note = ("trl ChunkedLogProbFunction (add_fused_lm_head's path, chunk_size 32768) then "
            'rank_grpo_loss(backend="torch")')
    CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16

    def skip_reason(self, device):
        missing = _module_missing("trl")
        if missing:
            return missing
        try:
            importlib.import_module("trl.kernels.chunked_logprob")
        except Exception as err:  # noqa: BLE001 - an older TRL has no such module
            return f"trl.kernels.chunked_logprob not importable ({type(err).__name__}: {err})"
        return None

    def _logp(self, inp: Inputs) -> torch.Tensor:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton

        h = inp.hidden
        b, length, hdim = h.shape
        if _use_triton(h.device):
            mask = inp.mask
            lp = ChunkedLogProbFunction.apply(h[mask], inp.weight, None, inp.targets[mask],
                                              1.0, self.CHUNK, None, 1.0, ())[0]
            return lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        lp = ChunkedLogProbFunction.apply(h.reshape(-1, hdim), inp.weight, None,
                                          inp.targets.reshape(-1), 1.0, self.CHUNK, None,
                                          1.0, ())[0]
        return lp.view(b, length).masked_fill(~inp.mask, 0)



class LigerTriton(Contender):
    """liger-kernel's `triton_grpo_loss` (liger_kernel.transformers.grpo_loss): the GRPO loss
    as one Triton kernel over logits the caller materialises ([B, L+1, V] in the model dtype,
    the last position dropped, as a model's output is), token level."""

    name = "liger-triton-token"
    level = "token"
    compiles = True
    note = ('liger triton_grpo_loss(importance_sampling_level="token", loss_type="bnpo") on '
            "materialised logits = hidden @ W^T")

    def skip_reason(self, device):
        missing = _module_missing("liger_kernel")
        if missing:
            return missing
        if device.type != "cuda":
            return "triton_grpo_loss is a Triton kernel: needs CUDA"
        return None

    def loss(self, inp):
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        lo, hi = EPSILONS["token"]
        h = torch.cat([inp.hidden, inp.hidden[:, -1:]], dim=1)  # L+1 positions
        logits = h @ inp.weight.t()
        loss, _ = triton_grpo_loss(logits, inp.old_logp, None, inp.targets, inp.adv_row,
                                   inp.mask_int, temperature=1.0, beta=0.0, eps_low=lo,
                                   eps_high=hi, loss_type="bnpo",
                                   importance_sampling_level="token", reduce=True)
        return loss


def _chunk_logp(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log_softmax(h @ w^T)[y] of one token chunk, fp32 logits (what torch.compile fuses)."""
    z = (h @ w.t()).float()
    return z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)


class CompiledChunked(LogpThenSegment):
    """The loss a practitioner writes with PyTorch alone: tokens in chunks whose fp32 logits
    stay under 256 MiB, each chunk's log-prob function under `torch.compile` and activation
    checkpointing (logits recomputed in the backward, never all alive), then our segment
    stage."""

    name = "compile-chunked+seg"
    compiles = True
    CHUNK_BYTES = 256 * 2**20

    def __init__(self, allow_cpu: bool = False):
        self.allow_cpu = allow_cpu
        self._fn = None
        self.note = ("torch.compile(chunk log_softmax) + checkpoint per token chunk, then "
                     'rank_grpo_loss(backend="torch")')

    def skip_reason(self, device):
        if device.type != "cuda" and not self.allow_cpu:
            return ("torch.compile takes tens of seconds to compile on CPU (the inductor C++ "
                    "backend; over the smoke suite's few seconds): --compile-cpu to include it")
        return None

    def chunk_tokens(self, tokens: int, vocab: int) -> int:
        """The largest power of two whose fp32 logits fit CHUNK_BYTES (at most T)."""
        rows = max(1, self.CHUNK_BYTES // (4 * vocab))
        return min(tokens, 1 << (rows.bit_length() - 1))

    def _logp(self, inp: Inputs) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        if self._fn is None:
            self._fn = torch.compile(_chunk_logp, dynamic=False)
        h = inp.hidden.reshape(-1, inp.hidden.shape[-1])
        y = inp.targets.reshape(-1)
        c = self.chunk_tokens(h.shape[0], inp.weight.shape[0])
        parts = [checkpoint(self._fn, h[i:i + c], inp.weight, y[i:i + c], use_reentrant=False)
                 if torch.is_grad_enabled() else self._fn(h[i:i + c], inp.weight, y[i:i + c])
                 for i in range(0, h.shape[0], c)]
        return torch.cat(parts).view(inp.targets.shape)



def make(name: str, *, cce_cpu: bool = False, compile_cpu: bool = False) -> Contender:
    table = {
        "triton": lambda: Ours("triton", "triton"),
        "triton-token": lambda: Ours("triton-token", "triton", "token"),
        "triton-seq": lambda: Ours("triton-seq", "triton", "sequence"),
        "torch": lambda: Ours("torch", "torch"),
        "native": lambda: Ours("native", "native"),
        "triton-lean": lambda: Configured("triton-lean", LEAN_CONFIG),
        "reference": Reference,
        "liger-token": lambda: Liger("token"),
        "liger-seq": lambda: Liger("sequence"),
        "liger-triton-token": LigerTriton,
        "cce+seg": lambda: CCE(allow_cpu=cce_cpu),
        "trl-chunked+seg": TRLChunked,
        "compile-chunked+seg": lambda: CompiledChunked(allow_cpu=compile_cpu),
    }
    if name not in table:
        raise ValueError(f"unknown contender {name!r}; known: {sorted(table)}")
    return table[name]()


def segment_stage_backends(device: torch.device) -> dict[str, str | None]:
    """Segment-stage implementations -> None if runnable here, else why not. (There is no
    Triton segment stage: the bench's segment table measures whether one would pay.)"""
    out: dict[str, str | None] = {"torch": None, "reference": None}
    out["native"] = None if rk.native_available() else "native op library not built"
    return out
