"""Rank-GRPO inside TRL's GRPOTrainer (TRL >= 1.16): the loss on our fused kernels.

`RankGRPOTrainer` is `trl.GRPOTrainer` with one method replaced, `_compute_loss`: TRL still
generates, scores, computes old / reference log-probs and advantages, shuffles, accumulates
and logs; the loss of each micro-batch runs `rankgrpo_kernels.linear_logprobs` on the policy's
LAST HIDDEN STATES and LM head weight (never a [B, T, V] logits tensor) and then
`rankgrpo_kernels.rank_grpo_loss` (the two phases `fused_linear_rank_grpo_loss` composes; they
are called separately so that TRL's per-sequence clip metrics can be read from the [B, T]
log-probs). See docs/integrations.md for the option table and docs/math.md for the loss.

`importance_sampling_level="rank"` (only on `RankGRPOConfig`) is Rank-GRPO: rank segments
from the tokenizer's newline table (or the aligned parser), per-rank rewards from the reward
functions (a float per completion is broadcast to every rank, a list gives one reward per
rank), per-rank group advantages, optional length shaping.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import trl

from rankgrpo_kernels import (
    LengthShaping,
    eos_mask_from_ids,
    group_advantages,
    linear_logprobs,
    rank_grpo_loss,
    segment_ids_from_newlines,
    token_advantages,
)

from ._support import Option, UnsupportedOptionError, check_all

__all__ = [
    "RankGRPOConfig",
    "RankGRPOTrainer",
    "TRL_OPTIONS",
    "TRL_LOSS_TYPES",
    "TRL_LEVELS",
    "UnsupportedOptionError",
]


@dataclass(frozen=True)
class LossRoute:
    """How a TRL loss_type maps onto the kernel: its `loss_type` and the denominator TRL uses.

    denominator: "rows" (B), "tokens" (local masked tokens), "rows_x_max_len"
    (B * max_completion_length), "global_tokens" (TRL's num_items_in_batch per accumulation
    window, dapo) or "pairs" (non-empty (row, rank) pairs, Rank-GRPO's own aggregation); all
    multiplied by the gradient-accumulation steps in training, as TRL does.
    """

    kernel_loss_type: str
    denominator: str


# TRL 1.16's loss types (GRPOConfig.loss_type) plus Rank-GRPO's own "rank" aggregation. The
# kernel's loss_type names its aggregation and surrogate (docs/math.md section 7.1); the
# denominator is passed as `normalizer`, so each row states TRL's.
TRL_LOSS_TYPES: dict[str, LossRoute | str] = {
    "grpo": LossRoute("grpo", "rows"),
    "bnpo": LossRoute("bnpo", "tokens"),
    "dr_grpo": LossRoute("dr_grpo", "rows_x_max_len"),
    "dapo": LossRoute("bnpo", "global_tokens"),
    "luspo": LossRoute("bnpo", "rows"),  # sum over a row's tokens, mean over rows
    "cispo": LossRoute("cispo", "global_tokens"),
    "sapo": LossRoute("sapo", "rows"),
    "vespo": LossRoute("vespo", "global_tokens"),
    "rank": LossRoute("rank", "pairs"),
}

# importance_sampling_level -> kernel level. "rank" exists only on RankGRPOConfig.
TRL_LEVELS = {"token": "token", "sequence": "sequence", "rank": "rank"}


def _beta_on(a: Any) -> bool:
    return getattr(a, "beta", 0.0) != 0.0


# Every loss-relevant GRPOConfig option of TRL 1.16, with its route or its refusal.
TRL_OPTIONS: tuple[Option, ...] = (
    Option("loss_type", "aggregation / surrogate family", "loss_type + normalizer (TRL_LOSS_TYPES)",
           None),
    Option("importance_sampling_level", "token, sequence (GSPO) or rank (Rank-GRPO) ratios",
           "level"),
    Option("epsilon", "lower clip range", "epsilon_low"),
    Option("epsilon_high", "upper clip range (DAPO clip-higher)", "epsilon_high"),
    Option("delta", "two-sided clipping: ratio capped at delta (INTELLECT-2)", "delta"),
    Option("beta", "k3 KL to the reference model", "beta + ref_logp"),
    Option("use_bias_correction_kl", "KL multiplied by the importance ratio (TRL's default)",
           "use_bias_correction_kl"),
    Option("temperature", "sampling temperature; logits are divided by it", "temperature"),
    Option("max_completion_length", "dr_grpo's constant denominator",
           "max_completion_length"),
    Option("num_iterations", "policy updates per generation batch (old log-probs from TRL)",
           "old_logp"),
    Option("steps_per_generation", "micro-steps per generation batch (dapo's normaliser)",
           "normalizer"),
    Option("gradient_accumulation_steps", "loss divided by the accumulation steps",
           "normalizer"),
    Option("mask_truncated_completions", "truncated completions leave the mask (TRL, upstream)",
           "mask"),
    Option("scale_rewards", "group / batch / none std scaling of advantages",
           "advantages (TRL; rank level: group_advantages(scale=))"),
    Option("reward_weights", "weights of the reward functions", "advantages (TRL / ours)"),
    Option("multi_objective_aggregation", "sum_then_normalize or normalize_then_sum",
           "advantages (TRL)"),
    Option("cast_lm_head_to_fp32", "LM head projection in float32",
           "hidden states and weight cast to float32"),
    Option("top_entropy_quantile", "keep only the top-rho entropy tokens in the policy loss",
           "top_entropy_quantile (+ the fused pass's entropy)"),
    Option("off_policy_mask_threshold", "drop negative-advantage sequences whose KL to the "
           "sampler exceeds it (DeepSeek-V3.2)",
           "off_policy_mask_threshold (+ sampling_logp when TRL has it)"),
    Option("entropy_coef", "entropy bonus -coef * mean entropy (not scaled by the loss "
           "type's normaliser; divided by the accumulation steps)",
           "entropy_coef / accumulation steps (+ the fused pass's entropy)"),
    Option("use_adaptive_entropy", "adaptive entropy bonus (Skywork-OR1; entropy_target, "
           "entropy_coef_min / _max / _delta): the previous optimizer step's coefficient, "
           "applied while the measured entropy is <= entropy_target",
           "entropy_coef per call from TRL's controller state (entropy sums over the "
           "accumulation window, reduced across processes at sync_gradients)"),
    Option("vllm_importance_sampling_correction", "truncated / masked IS from vLLM's "
           "sampler log-probs (vllm_importance_sampling_mode token_truncate, token_mask, "
           "sequence_truncate, sequence_mask; _clip_min / _clip_max)",
           "importance_weights = inputs['importance_sampling_ratio'] (TRL computes it; vespo "
           "folds it into its gamma weight instead)"),
    Option("sapo_temperature_pos / sapo_temperature_neg", "sapo's gate temperatures",
           "sapo_temperature_pos / sapo_temperature_neg"),
    Option("vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg",
           "vespo's gamma weights", "vespo_k_pos / vespo_lambda_pos / vespo_k_neg / "
           "vespo_lambda_neg"),
    Option("router_aux_loss_coef", "MoE load-balancing loss added to the policy loss",
           unsupported="the MoE router auxiliary loss is not added on the fused path yet; "
                       "set router_aux_loss_coef=0.0",
           active=lambda a: bool(getattr(a, "_rankgrpo_aux_loss_enabled", False))),
)


def check_trl_args(args: Any) -> LossRoute:
    """Validate a GRPOConfig for the fused path; returns the loss route. Raises
    UnsupportedOptionError naming the first option the kernels do not implement."""
    level = args.importance_sampling_level
    if level not in TRL_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {tuple(TRL_LEVELS)}, "
                         f"got {level!r}")
    route = TRL_LOSS_TYPES.get(args.loss_type)
    if route is None:
        raise ValueError(f"loss_type must be one of {tuple(TRL_LOSS_TYPES)}, got "
                         f"{args.loss_type!r}")
    if isinstance(route, str):
        raise UnsupportedOptionError(f"loss_type={args.loss_type!r}: {route}")
    if route.kernel_loss_type == "rank" and level != "rank":
        raise ValueError("loss_type='rank' (mean over (completion, rank) pairs) needs "
                         "importance_sampling_level='rank'")
    check_all(TRL_OPTIONS, args)
    return route


@dataclass
class RankGRPOConfig(trl.GRPOConfig):
    """`trl.GRPOConfig` plus Rank-GRPO's options; every TRL option keeps its meaning.

    `importance_sampling_level` also accepts "rank", and `loss_type` also "rank" (each
    (completion, rank) pair weighs the same). The options below only act at the rank level,
    except `kernel_backend` / `kernel_validate`.
    """

    num_ranks: int = field(default=20, metadata={"help": "N, items per recommendation list; "
                                                 "segment ids >= N share one overflow bin."})
    rank_segments: str = field(default="newline", metadata={
        "help": "'newline' (item k = tokens after the k-th newline, from the tokenizer's "
                "newline table) or 'aligned' (decode and parse each completion)."})
    length_shaping: bool = field(default=False, metadata={
        "help": "Add the length shaping of docs/math.md (overflow / short-EOS / exact-EOS)."})
    overflow_penalty: float = field(default=-0.1, metadata={"help": "Length shaping."})
    short_eos_penalty: float = field(default=-0.1, metadata={"help": "Length shaping."})
    exact_eos_bonus: float = field(default=0.1, metadata={"help": "Length shaping."})
    kernel_backend: str = field(default="auto", metadata={
        "help": "rankgrpo_kernels backend: auto, torch, triton, native or reference."})
    kernel_validate: bool = field(default=True, metadata={
        "help": "Let the kernels check shapes and finiteness (a few host syncs)."})

    def __post_init__(self):
        super().__post_init__()
        if self.rank_segments not in ("newline", "aligned"):
            raise ValueError(f"rank_segments must be 'newline' or 'aligned', got "
                             f"{self.rank_segments!r}")
        if not (isinstance(self.num_ranks, int) and self.num_ranks >= 1):
            raise ValueError(f"num_ranks must be an int >= 1, got {self.num_ranks!r}")
        check_trl_args(self)


class _PerRankReward:
    """Wraps a TRL reward function for the rank level: keeps the per-rank rewards [B, N] it
    returns (a float broadcast to all N ranks, a list/tensor of up to N per-rank values,
    zero-padded; None -> NaN) and hands TRL the mean over ranks, for its logs."""

    def __init__(self, func, num_ranks: int):
        self.func, self.num_ranks = func, num_ranks
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        self.last: torch.Tensor | None = None

    def _row(self, r) -> list[float]:
        n = self.num_ranks
        if r is None:
            return [math.nan] * n
        if isinstance(r, torch.Tensor):
            r = r.tolist()
        if isinstance(r, (int, float)):
            return [float(r)] * n
        vals = [float(v) for v in r]
        if len(vals) > n:
            raise ValueError(f"reward function {self.__name__!r} returned {len(vals)} per-rank "
                             f"rewards for one completion; num_ranks is {n}")
        return vals + [0.0] * (n - len(vals))

    def __call__(self, *args, **kwargs):
        out = self.func(*args, **kwargs)
        self.last = torch.tensor([self._row(r) for r in out], dtype=torch.float32)
        return [float(torch.nanmean(row)) if not bool(row.isnan().all()) else None
                for row in self.last]


class RankGRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` whose loss runs on rankgrpo's fused kernels (same constructor).

    Every TRL option either maps to a kernel keyword or raises UnsupportedOptionError naming
    it (TRL_OPTIONS, TRL_LOSS_TYPES); a plain `trl.GRPOConfig` works for the token and
    sequence levels, `RankGRPOConfig` adds the rank level.
    """

    def __init__(self, model, reward_funcs, args=None, *pos, **kw):
        if args is None:
            raise ValueError("RankGRPOTrainer needs args (a GRPOConfig or RankGRPOConfig)")
        self._route = check_trl_args(args)
        self._rank = args.importance_sampling_level == "rank"
        if self._rank and not isinstance(args, RankGRPOConfig):
            raise ValueError("importance_sampling_level='rank' needs a RankGRPOConfig (it holds "
                             "num_ranks and the segment options)")
        self._per_rank: list[_PerRankReward] = []
        if self._rank:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            wrapped = []
            for f in funcs:
                if isinstance(f, (str, torch.nn.Module)) or not callable(f):
                    raise UnsupportedOptionError(
                        "reward_funcs: reward models (a model id or nn.Module) are not supported "
                        "at importance_sampling_level='rank' yet; pass Python reward functions")
                import inspect
                if inspect.iscoroutinefunction(f):
                    raise UnsupportedOptionError(
                        "reward_funcs: async reward functions are not supported at "
                        "importance_sampling_level='rank' yet")
                w = _PerRankReward(f, args.num_ranks)
                functools.update_wrapper(w, f, assigned=("__name__", "__qualname__", "__doc__"),
                                         updated=())
                wrapped.append(w)
            self._per_rank = wrapped
            reward_funcs = wrapped
            if args.multi_objective_aggregation != "sum_then_normalize":
                raise UnsupportedOptionError(
                    "multi_objective_aggregation: only 'sum_then_normalize' at "
                    "importance_sampling_level='rank'")
        super().__init__(model, reward_funcs, args, *pos, **kw)
        args._rankgrpo_aux_loss_enabled = self.aux_loss_enabled
        check_all(TRL_OPTIONS, args)
        self._nl_table: torch.Tensor | None = None

    # ---- rank level: per-rank advantages --------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        for w in self._per_rank:
            w.last = None
        out = super()._generate_and_score_completions(inputs)
        if not self._rank:
            return out
        mode = "train" if self.model.training else "eval"
        g = (self.num_generations if mode == "train"
             else (self.num_generations_eval or self.num_generations))
        device = out["completion_ids"].device
        per = torch.stack([w.last.to(device) for w in self._per_rank], dim=1)  # [b, F, N]
        per = self.accelerator.gather(per)
        weights = self.reward_weights.to(device).view(1, -1, 1)
        rewards = torch.nansum(per * weights, dim=1)  # [B_global, N]
        adv = group_advantages(rewards, g, scale=self.scale_rewards)
        b = out["completion_ids"].shape[0]
        start = self.accelerator.process_index * b
        out["advantages"] = torch.nan_to_num(adv[start:start + b], nan=0.0)
        return out

    def _segment_ids(self, completion_ids: torch.Tensor, mask: torch.Tensor,
                     vocab_size: int) -> torch.Tensor:
        n = self.args.num_ranks
        if self.args.rank_segments == "aligned":
            from rankgrpo.alignment import aligned_segment_ids

            return aligned_segment_ids(self.processing_class, completion_ids, mask, n).segment_ids
        if self._nl_table is None or self._nl_table.shape[0] != vocab_size:
            from rankgrpo.tokens import newline_counts

            self._nl_table = newline_counts(self.processing_class, vocab_size).to(
                completion_ids.device)
        return segment_ids_from_newlines(completion_ids, mask, self._nl_table, n)

    # ---- the fused loss --------------------------------------------------------------------
    def _causal_lm(self, model):
        m = self.accelerator.unwrap_model(model)
        if hasattr(m, "get_base_model"):  # PEFT
            m = m.get_base_model()
        return m

    def _head(self, lm) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        cfg = lm.config.get_text_config()
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            raise UnsupportedOptionError(
                "model config final_logit_softcapping: logit soft-capping is not in the kernel")
        for name in ("output_multiplier", "lm_head_multiplier", "logits_scaling"):
            if getattr(cfg, name, None) not in (None, 1, 1.0):
                raise UnsupportedOptionError(f"model config {name}: not supported on the fused "
                                             "path yet")
        scale = getattr(cfg, "logit_scale", None)
        scale = 1.0 if scale is None else float(scale)
        if scale <= 0:
            raise UnsupportedOptionError(f"model config logit_scale={scale}: must be > 0")
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            # ZeRO-3 partitions lm_head.weight outside the head's own forward, and the fused
            # backward re-reads it: gathering it for both is not implemented yet.
            raise UnsupportedOptionError(
                "deepspeed ZeRO-3: the fused loss reads the LM head weight outside the head's "
                "forward; not supported yet (ZeRO-1/2 and DDP are)")
        head = lm.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if type(weight).__name__ == "DTensor":
            raise UnsupportedOptionError(
                "FSDP2 (sharded lm_head DTensor): gathering the LM head for the fused loss is "
                "not implemented yet")
        if weight is None or weight.dim() != 2:
            raise UnsupportedOptionError("lm_head: the fused loss needs a plain linear LM head "
                                         "(a PEFT adapter on lm_head is not supported)")
        return weight, getattr(head, "bias", None), scale

    def _last_hidden(self, model, input_ids, attention_mask) -> torch.Tensor:
        """The backbone's last hidden states [B, L, H], through the (wrapped) model's own
        forward, so DDP / DeepSpeed / PEFT hooks run; the LM head sees only the last position
        (logits_to_keep=1), so no [B, L, V] logits exist."""
        lm = self._causal_lm(model)
        backbone = getattr(lm, lm.base_model_prefix)
        store: dict[str, torch.Tensor] = {}

        def hook(_mod, _args, output):
            store["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handle = backbone.register_forward_hook(hook)
        try:
            with self.accelerator.autocast():
                model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1,
                      use_cache=False)
        finally:
            handle.remove()
        if "h" not in store:
            raise RuntimeError("the backbone's forward hook did not fire; cannot read the last "
                               "hidden states")
        return store["h"]

    def _normalizer(self, route: LossRoute, mask: torch.Tensor, seg: torch.Tensor | None,
                    inputs: dict, train: bool) -> torch.Tensor | float:
        b = mask.shape[0]
        ga = self.current_gradient_accumulation_steps if train else 1
        kind = route.denominator
        if kind == "rows":
            return float(b * ga)
        if kind == "tokens":
            return mask.sum().clamp(min=1).to(torch.float64) * ga
        if kind == "rows_x_max_len":
            return float(b * self.max_completion_length * ga)
        if kind == "global_tokens":
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return n
        if kind == "pairs":
            s = self.args.num_ranks + 1
            rows = torch.arange(b, device=mask.device).unsqueeze(1)
            key = torch.where(mask, rows * s + seg.clamp(min=0), 0)
            cnt = torch.zeros(b * s, device=mask.device).index_add_(
                0, key.reshape(-1), mask.reshape(-1).float())
            return (cnt > 0).sum().clamp(min=1).to(torch.float64) * ga
        raise ValueError(f"unknown denominator {kind!r}")

    def _compute_loss(self, model, inputs):
        for key in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes",
                    "token_type_ids", "mm_token_type_ids"):
            if inputs.get(key) is not None:
                raise UnsupportedOptionError(f"inputs[{key!r}]: multimodal inputs are not "
                                             "supported on the fused path yet")
        args = self.args
        route = self._route
        level = TRL_LEVELS[self.importance_sampling_level]
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask.bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        c = completion_ids.size(1)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)

        hidden = self._last_hidden(model, input_ids, attention_mask)[:, -c - 1:-1]
        lm = self._causal_lm(model)
        weight, bias, scale = self._head(lm)
        if args.cast_lm_head_to_fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        else:
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        targets = completion_ids.masked_fill(~mask, -100)
        backend, validate = (getattr(args, "kernel_backend", "auto"),
                             getattr(args, "kernel_validate", True))
        logp, entropy = linear_logprobs(hidden.contiguous(), weight, targets, bias=bias,
                                        temperature=self.temperature / scale,
                                        return_entropy=True, backend=backend,
                                        validate=validate)

        adv = inputs["advantages"]
        seg = eos = None
        num_segments = None
        adv_per = "row" if adv.dim() == 1 else "token"
        if level == "rank":
            seg = self._segment_ids(completion_ids, mask, weight.shape[0])
            num_segments = args.num_ranks + 1
            # EOS ends the list: with per-rank advantages it gets 0 (docs/math.md section 5)
            eos = eos_mask_from_ids(completion_ids, mask, list(self.eos_token_ids))
            # [B, N] per rank (ours), [B] per row; a [B, T] tensor with T != N is per token
            if adv.dim() == 1 or adv.shape[1] == args.num_ranks:
                shaping = (LengthShaping(args.overflow_penalty, args.short_eos_penalty,
                                         args.exact_eos_bonus) if args.length_shaping else None)
                adv = token_advantages(adv, seg, mask, eos, shaping=shaping,
                                       num_ranks=args.num_ranks)
                adv_per = "token"
        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        train = self.model.training
        normalizer = self._normalizer(route, mask, seg, inputs, train)
        ga = self.current_gradient_accumulation_steps if train else 1
        # TRL's bonus is the plain mean entropy, divided only by the accumulation steps. With
        # the adaptive controller, every micro-batch of a window applies the coefficient of the
        # previous optimizer step, and only while the entropy measured then was <= the target.
        coef = float(self.entropy_coef)
        if self.use_adaptive_entropy and self._last_world_entropy > args.entropy_target:
            coef = 0.0
        entropy_coef = coef / ga
        # vLLM's truncated / masked importance weights, computed by TRL when it generated the
        # batch ([B, T] for token_* modes, [B, 1] for sequence_*). TRL's vespo reads them
        # whenever the batch has them and folds them into its gamma weight (the kernel does the
        # same with importance_weights); the other loss types multiply the policy term by them.
        is_ratio = inputs.get("importance_sampling_ratio")
        if route.kernel_loss_type != "vespo" and not (
                self.use_vllm and self.vllm_importance_sampling_correction):
            is_ratio = None
        if is_ratio is not None and is_ratio.dim() == 2 and is_ratio.shape[1] == 1:
            is_ratio = is_ratio.squeeze(1)  # per row: the kernel takes [B]
        loss, _ = rank_grpo_loss(
            logp, old, adv, seg, mask, ref_logp=ref, beta=self.beta,
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=args.delta,
            level=level, loss_type=route.kernel_loss_type,
            max_completion_length=self.max_completion_length, normalizer=normalizer,
            num_segments=num_segments, eos_mask=eos, advantages_per=adv_per,
            entropy=entropy, use_bias_correction_kl=bool(args.use_bias_correction_kl),
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
            vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg,
            sampling_logp=inputs.get("sampling_per_token_logps"),
            off_policy_mask_threshold=args.off_policy_mask_threshold,
            top_entropy_quantile=args.top_entropy_quantile, entropy_coef=entropy_coef,
            importance_weights=is_ratio, backend=backend, validate=validate)
        if self._entropy_bonus_enabled:
            self._entropy_bonus_bookkeeping(loss, entropy, mask, entropy_coef, ga, route, train)
        self._log_trl_metrics(logp.detach(), old, ref, adv, seg, mask, entropy, level,
                              "train" if train else "eval", is_ratio)
        return loss

    def _entropy_bonus_bookkeeping(self, loss, entropy, mask, coef, ga, route, train):
        """TRL's policy_loss metric (the loss before the bonus, per optimizer step for the loss
        types TRL divides by the accumulation steps), the adaptive entropy controller's update
        (TRL's rule and state: `entropy_coef`, `_last_world_entropy`, the window sums
        `_entropy_window_stats`, which TRL's checkpoint hooks also save) and `entropy_coef`."""
        with torch.no_grad():
            eff = mask
            if self.args.top_entropy_quantile < 1.0:
                eff = self.get_high_entropy_mask(entropy, mask, 1 - self.args.top_entropy_quantile)
            e = eff.to(entropy.dtype)
            ent_sum, ent_count = (entropy * e).sum(), e.sum()
            bonus = ent_sum / ent_count.clamp(min=1.0)
            policy = loss.detach() + coef * bonus.to(loss.dtype)
            if route.denominator != "global_tokens":
                policy = policy * ga
        mode = "train" if train else "eval"
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
        if self.use_adaptive_entropy and train:
            stats = torch.stack([ent_sum, ent_count]).detach()
            win = self._entropy_window_stats
            self._entropy_window_stats = stats if win is None else win + stats
            if self.accelerator.sync_gradients:
                tot = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world = (tot[0] / tot[1].clamp(min=1.0)).item()
                a = self.args
                if world <= a.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta,
                                            a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta,
                                            a.entropy_coef_min)
                self._last_world_entropy = world
                self._entropy_window_stats = None
        if train and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    # ---- TRL's metric names ----------------------------------------------------------------
    def _log_trl_metrics(self, logp, old, ref, adv, seg, mask, entropy, level, mode,
                         is_ratio=None):
        m = mask.to(logp.dtype)
        lr = torch.where(mask, logp - old.to(logp.dtype), 0)
        if level == "token":
            coef = torch.exp(lr)
        elif level == "sequence":
            coef = torch.exp(lr.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1))
        else:
            s = self.args.num_ranks + 1
            rows = torch.arange(lr.shape[0], device=lr.device).unsqueeze(1)
            key = torch.where(mask, rows * s + seg.clamp(min=0), 0)
            tot = torch.zeros(lr.shape[0] * s, dtype=lr.dtype, device=lr.device)
            num = tot.index_add(0, key.reshape(-1), m.reshape(-1)).clamp(min=1)
            tot = tot.index_add(0, key.reshape(-1), lr.reshape(-1))
            coef = torch.exp(tot / num)[key]
        a = (adv.unsqueeze(1) if adv.dim() == 1 else adv).to(coef.dtype)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                s, n = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                s, n = (x * m).sum(), m.sum()
            t = self.accelerator.reduce(torch.stack([s.float(), n.float()]), reduction="sum")
            return (t[0] / t[1].clamp(min=1.0)).item()

        def seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

        metrics = self._metrics[mode]
        if ref is not None:
            r = ref.to(logp.dtype) - logp
            kl = torch.exp(r) - r - 1
            if self.args.use_bias_correction_kl:  # TRL logs the ratio-weighted KL then
                kl = kl * coef
            metrics["kl"].append(global_masked_mean(kl))
        metrics["entropy"].append(global_masked_mean(entropy.detach()))
        if self.loss_type == "cispo":
            cl = ((coef > self.epsilon_high) & (a > 0)).float()
            metrics["cispo_clip_ratio"].append(global_masked_mean(cl))
            return
        if self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages=a[:, :1] if level != "rank" else a, log_ratio_per_token=lr,
                mask=m, importance_sampling_ratio=is_ratio, k_pos=self.args.vespo_k_pos,
                lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg)
            metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi))
            return
        if self.loss_type == "sapo":
            return
        low = ((coef < 1 - self.epsilon_low) & (a < 0)).float()
        high = ((coef > 1 + self.epsilon_high) & (a > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(((low + high) > 0).float()))
        gl = self.accelerator.gather(seq_mean(low))
        gh = self.accelerator.gather(seq_mean(high))
        metrics["clip_ratio/low_min"].append(torch.nan_to_num(gl, nan=math.inf).min().item()
                                             if not bool(gl.isnan().all()) else math.nan)
        metrics["clip_ratio/high_max"].append(torch.nan_to_num(gh, nan=-math.inf).max().item()
                                              if not bool(gh.isnan().all()) else math.nan)
