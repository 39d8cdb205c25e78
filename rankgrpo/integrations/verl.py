"""Rank-GRPO losses in verl's policy-loss registry (verl >= 0.9), and a per-rank catalog
reward manager.

Importing this module registers three policy losses, picked in a verl config by
`actor_rollout_ref.actor.policy_loss.loss_mode=<name>`:

- "rankgrpo_token": token-level clipped surrogate (equals verl's "vanilla": dual clip
  `clip_ratio_c` and the log-ratio clamp included);
- "rankgrpo_sequence": sequence-level ratio (GSPO; equals verl's "gspo" whenever the
  advantage is constant along a response, as verl's GRPO / RLOO estimators give);
- "rankgrpo_rank": Rank-GRPO, one ratio per (response, rank) segment;
- "rankgrpo_geo_mean": GMPO (equals verl's "geo_mean": the per-response geometric mean of
  the token ratios, each token's log-ratio clipped in log space by the sign of its advantage).

They take verl's arguments (old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode, config, rollout_is_weights), honour every `loss_agg_mode` with verl's
global-batch normalisation (`config.global_batch_info`; "rankgrpo_geo_mean" ignores both, as
verl's geo_mean does), apply `rollout_is_weights` (the kernel's `importance_weights`), and
return verl's metric names.
The log-probs come from verl's actor (its own logits path); the loss stage is
`rankgrpo_kernels.rank_grpo_loss`. Every refused option raises UnsupportedOptionError naming it.

The rank loss needs segment ids, which verl 0.9.1's `ppo_loss` does not pass on: call it
inside `with rank_segments(ids):` (or pass `segment_ids=` directly); `segment_ids_from_responses`
builds them from the response ids with the tokenizer's newline table.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict
from collections.abc import Container, Iterator
from typing import Any

import torch
from verl.trainer.ppo import core_algos

from rankgrpo_kernels import (
    eos_mask_from_ids,
    group_advantages,
    rank_grpo_loss,
    segment_ids_from_newlines,
    token_advantages,
)

from ._support import Option, check_all

__all__ = [
    "LOSS_NAMES",
    "VERL_OPTIONS",
    "VERL_AGG_MODES",
    "rank_segments",
    "segment_ids_from_responses",
    "rank_grpo_advantages",
    "policy_loss",
    "RankCatalogRewardManager",
]

LOSS_NAMES = {"rankgrpo_token": "token", "rankgrpo_sequence": "sequence",
              "rankgrpo_rank": "rank", "rankgrpo_geo_mean": "geo_mean"}

# verl's agg_loss modes -> (kernel loss_type, denominator rule). D is the global denominator
# verl divides by, times 1 / dp_size (DDP/FSDP average the gradients over dp ranks).
VERL_AGG_MODES = {
    "token-mean": ("bnpo", "batch_num_tokens"),
    "token-sum": ("bnpo", "one"),
    "seq-mean-token-sum": ("bnpo", "global_batch_size"),
    "seq-mean-token-sum-norm": ("bnpo", "global_batch_size x loss_scale_factor"),
    "seq-mean-token-mean": ("grpo", "global_batch_size"),
}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        try:
            return cfg.get(key, default)
        except TypeError:
            pass
    return getattr(cfg, key, default)


def _pl(cfg: Any, key: str, default: Any = None) -> Any:
    return _get(_get(cfg, "policy_loss"), key, default)


VERL_OPTIONS: tuple[Option, ...] = (
    Option("policy_loss.loss_mode", "registered loss name",
           "rankgrpo_token / rankgrpo_sequence / rankgrpo_rank / rankgrpo_geo_mean"),
    Option("clip_ratio / clip_ratio_low / clip_ratio_high", "PPO clip range", "epsilon_low / "
           "epsilon_high (low and high fall back to clip_ratio)"),
    Option("clip_ratio_c", "dual-clip bound for negative advantages (token level, vanilla)",
           "clip_ratio_c"),
    Option("loss_agg_mode", "token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean, "
           "seq-mean-token-sum-norm", "loss_type + normalizer (VERL_AGG_MODES)"),
    Option("global_batch_info (dp_size, batch_num_tokens, global_batch_size)",
           "global normalisation across micro-batches and dp ranks", "normalizer"),
    Option("loss_scale_factor", "seq-mean-token-sum-norm's constant (default T)", "normalizer"),
    Option("rollout_is_weights (policy_loss.rollout_correction)",
           "per-token importance weights from the rollout engine's log-probs",
           "importance_weights (geo_mean: the per-response geometric mean of them, as verl)"),
    Option("use_kl_loss / kl_loss_coef / kl_loss_type",
           "KL loss; verl adds it OUTSIDE the policy loss (workers/utils/losses.py)",
           "unchanged: verl's own kl_penalty (k1, k2/mse, abs, k3/low_var_kl, '+' variants) "
           "still applies on top of our policy loss"),
    Option("entropy_coeff", "entropy bonus; verl adds it outside the policy loss",
           "unchanged: verl's own"),
    Option("policy_loss.loss_mode=geo_mean (GMPO)", "geometric-mean ratio with log-space clip "
           "(loss_agg_mode and global_batch_info unused: mean over the micro-batch's responses)",
           "rankgrpo_geo_mean: surrogate='geo_mean', level='sequence', loss_type='grpo', "
           "normalizer = responses"),
    Option("policy_loss.loss_mode=sapo / cispo / gpg / clip_cov / kl_cov / dro / dppo_* / "
           "bypass_mode", "verl's other losses",
           unsupported="no rankgrpo equivalent yet; keep verl's own loss_mode", raises=False),
    Option("log-ratio clamps", "vanilla clamps log(ratio) to [-20, 20], gspo caps the "
           "sequence log-ratio at 10", "log_ratio_clamp=(-20, 20) (token), (None, 10) "
           "(sequence); none at the rank level"),
)


_SEGMENTS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "rankgrpo_verl_segments", default=None)


@contextlib.contextmanager
def rank_segments(segment_ids: torch.Tensor) -> Iterator[None]:
    """Carry [B, T] rank segment ids (kernel convention: 0..N-1 items, N overflow, -1
    padding) to "rankgrpo_rank" calls made inside the block (verl's ppo_loss does not pass
    them)."""
    token = _SEGMENTS.set(segment_ids)
    try:
        yield
    finally:
        _SEGMENTS.reset(token)


def segment_ids_from_responses(responses: torch.Tensor, response_mask: torch.Tensor,
                               tokenizer: Any, num_ranks: int) -> torch.Tensor:
    """[B, T] segment ids of verl's `responses` from the tokenizer's newline table."""
    from rankgrpo.tokens import newline_counts

    table = newline_counts(tokenizer).to(responses.device)
    if int(responses.max()) >= table.shape[0]:
        table = newline_counts(tokenizer, int(responses.max()) + 1).to(responses.device)
    return segment_ids_from_newlines(responses, response_mask, table, num_ranks)


def _normalizer(mode: str, mask: torch.Tensor, info: dict, cfg: Any) -> torch.Tensor | float:
    dp = info.get("dp_size") or 1
    kind = VERL_AGG_MODES[mode][1]
    if kind == "one":
        return 1.0 / dp
    if kind == "batch_num_tokens":
        n = info.get("batch_num_tokens")
        if n is None:
            if dp > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            n = mask.sum()
        return torch.as_tensor(n, dtype=torch.float64) / dp
    gbs = info.get("global_batch_size")
    if gbs is None:
        if dp > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        gbs = (mask.sum(-1) > 0).sum()
    d = torch.as_tensor(gbs, dtype=torch.float64) / dp
    if kind == "global_batch_size x loss_scale_factor":
        lsf = info.get("loss_scale_factor")
        d = d * (mask.shape[-1] if lsf is None else lsf)
    return d


def policy_loss(level: str, old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                advantages: torch.Tensor, response_mask: torch.Tensor,
                loss_agg_mode: str = "token-mean", config: Any = None,
                rollout_is_weights: torch.Tensor | None = None, *,
                segment_ids: torch.Tensor | None = None,
                backend: str = "auto") -> tuple[torch.Tensor, dict[str, float]]:
    """verl's policy-loss contract on rankgrpo_kernels.rank_grpo_loss.

    Args: as verl's registered losses (all [B, T]; advantages per token; rollout_is_weights
    [B, T] or None), plus level ("token", "sequence", "rank", "geo_mean") and, for "rank",
    segment_ids [B, T] (else taken from `rank_segments`). Returns (loss, {"actor/pg_clipfrac",
    "actor/ppo_kl", "actor/pg_clipfrac_lower"}).

    "sequence" uses the kernel's ratio_gradient="token" (verl's gspo differentiates each
    token's term through its own log-prob: the same gradient as the sequence mean when the
    advantage and the weights are constant along a response, verl's otherwise).
    """
    if loss_agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {tuple(VERL_AGG_MODES)}, got "
                         f"{loss_agg_mode!r}")
    if level not in LOSS_NAMES.values():
        raise ValueError(f"level must be one of {tuple(LOSS_NAMES.values())}, got {level!r}")
    check_all(VERL_OPTIONS, config)
    clip = _get(config, "clip_ratio", 0.2)
    low = _get(config, "clip_ratio_low", None)
    high = _get(config, "clip_ratio_high", None)
    low = clip if low is None else low
    high = clip if high is None else high
    dual = None
    clamp = None
    if level == "token":
        dual = _get(config, "clip_ratio_c", 3.0)
        dual = None if dual is None else float(dual)
        clamp = (-20.0, 20.0)  # verl's vanilla clamps each token's log-ratio
    elif level == "sequence":
        clamp = (None, 10.0)  # verl's gspo caps the sequence log-ratio
    mask = response_mask.bool()
    seg = None
    if level == "rank":
        seg = segment_ids if segment_ids is not None else _SEGMENTS.get()
        if seg is None:
            raise ValueError(
                "rankgrpo_rank needs rank segment ids: verl 0.9.1's ppo_loss passes only "
                "old_log_prob, log_prob, advantages and response_mask; call it inside "
                "`with rankgrpo.integrations.verl.rank_segments(ids):` (ids from "
                "segment_ids_from_responses) or pass segment_ids=")
    kernel_loss, _ = VERL_AGG_MODES[loss_agg_mode]
    # seq-mean-token-mean: verl divides by (tokens + 1e-8) with the sum an integer tensor,
    # so the 1e-8 is lost in float32 and the division is by the token count, as the kernel's.
    adv = advantages
    info = dict(_get(config, "global_batch_info", None) or {})
    if "loss_scale_factor" not in info and _get(config, "loss_scale_factor") is not None:
        info["loss_scale_factor"] = _get(config, "loss_scale_factor")
    normalizer = _normalizer(loss_agg_mode, mask, info, config)
    variant: dict[str, Any] = {}
    kernel_level = level
    isw = rollout_is_weights
    if level == "sequence":
        variant["ratio_gradient"] = "token"
    elif level == "geo_mean":
        # verl's geo_mean: -mean_t(A) * exp(mean_t of the clipped log-ratios) per response,
        # torch.mean over the micro-batch's responses (empty ones count, with loss 0), no
        # loss_agg_mode or global normalisation; IS weights enter as their geometric mean.
        kernel_level, kernel_loss = "sequence", "grpo"
        variant["surrogate"] = "geo_mean"
        normalizer = float(mask.shape[0])
        if isw is not None:  # verl's expression, in the dtypes verl's mask gives it
            rm = response_mask
            isw = torch.exp((torch.log(isw + 1e-10) * rm).sum(-1) / (rm.sum(-1) + 1e-8))
    loss, _ = rank_grpo_loss(
        log_prob, old_log_prob, adv, seg, mask, epsilon_low=float(low),
        epsilon_high=float(high), clip_ratio_c=dual, log_ratio_clamp=clamp, level=kernel_level,
        loss_type=kernel_loss, normalizer=normalizer, advantages_per="token",
        importance_weights=isw, backend=backend, **variant)
    # verl's metric names and definitions (local means over the response mask).
    with torch.no_grad():
        lr = (log_prob - old_log_prob).detach()
        m = mask.to(lr.dtype)
        denom = m.sum().clamp(min=1)
        if level == "geo_mean":
            a = advantages.detach()
            clipped = (lr != lr.clamp(-low, high)).to(lr.dtype)
            return loss, {
                "actor/pg_clipfrac": float((clipped * (a > 0) * m).sum() / denom),
                "actor/ppo_kl": float((-lr * m).sum() / denom),
                "actor/pg_clipfrac_lower": float((clipped * (a < 0) * m).sum() / denom)}
        if level == "token":
            w = torch.exp(lr)
        elif level == "sequence":
            w = torch.exp((lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1))
            w = w.expand_as(lr)
        else:
            s = int(torch.where(mask, seg, -1).max().clamp(min=0)) + 1
            rows = torch.arange(lr.shape[0], device=lr.device).unsqueeze(1)
            key = torch.where(mask, rows * s + seg.clamp(min=0), 0)
            tot = torch.zeros(lr.shape[0] * s, dtype=lr.dtype, device=lr.device)
            num = tot.index_add(0, key.reshape(-1), m.reshape(-1)).clamp(min=1)
            w = torch.exp(tot.index_add(0, key.reshape(-1), (lr * m).reshape(-1)) / num)[key]
        a = advantages.detach().to(lr.dtype)
        l1, l2 = -a * w, -a * w.clamp(1 - low, 1 + high)
        clipfrac = ((l2 > l1).to(lr.dtype) * m).sum() / denom
        lower = torch.zeros((), dtype=lr.dtype)
        if dual is not None:
            l3 = -a * dual
            lower = ((torch.maximum(l1, l2) > l3) & (a < 0)).to(lr.dtype).mul(m).sum() / denom
        metrics = {"actor/pg_clipfrac": float(clipfrac),
                   "actor/ppo_kl": float((-lr * m).sum() / denom),
                   "actor/pg_clipfrac_lower": float(lower)}
    return loss, metrics


def _register(name: str, level: str):
    def fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
           config=None, rollout_is_weights=None, **kw):
        return policy_loss(level, old_log_prob, log_prob, advantages, response_mask,
                           loss_agg_mode, config, rollout_is_weights, **kw)

    fn.__name__ = f"compute_policy_loss_{name}"
    fn.__doc__ = f"rankgrpo's {level}-level policy loss for verl (see policy_loss)."
    core_algos.register_policy_loss(name)(fn)
    return fn


compute_policy_loss_rankgrpo_token = _register("rankgrpo_token", "token")
compute_policy_loss_rankgrpo_sequence = _register("rankgrpo_sequence", "sequence")
compute_policy_loss_rankgrpo_rank = _register("rankgrpo_rank", "rank")
compute_policy_loss_rankgrpo_geo_mean = _register("rankgrpo_geo_mean", "geo_mean")


def rank_grpo_advantages(rank_rewards: torch.Tensor, segment_ids: torch.Tensor,
                         response_mask: torch.Tensor, index: Any, *,
                         eos_mask: torch.Tensor | None = None,
                         scale: str = "group") -> torch.Tensor:
    """Per-token Rank-GRPO advantages [B, T] for verl's batch: per-rank rewards [B, N] are
    normalised within each prompt group (rows sharing `index`, verl's "uid"), then spread
    onto the tokens of each rank (EOS and overflow get 0; docs/math.md section 5)."""
    uids = list(index)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, u in enumerate(uids):
        groups[u].append(i)
    sizes = {len(v) for v in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"every prompt group needs the same number of responses, got sizes "
                         f"{sorted(sizes)}")
    order = [i for v in groups.values() for i in v]
    perm = torch.tensor(order, device=rank_rewards.device)
    adv_sorted = group_advantages(rank_rewards[perm], sizes.pop(), scale=scale)
    adv = torch.empty_like(adv_sorted)
    adv[perm] = adv_sorted
    return token_advantages(adv, segment_ids, response_mask, eos_mask)


class RankCatalogRewardManager:
    """A verl reward manager (same constructor and __call__ as verl's AbstractRewardManager)
    that scores each response's recommendation list against a catalog, per rank.

    __call__(data) returns verl's [B, T] reward tensor with rank k's reward on the last token
    of item k (so a sequence-level estimator sees their sum), and with return_dict also
    reward_extra_info["rank_rewards"] (the [N] list per response) and
    reward_extra_info["rank_segment_ids"] ([B, T] tensor) for `rank_grpo_advantages` and the
    "rankgrpo_rank" loss. Ground truth comes from non_tensor_batch["reward_model"]
    ["ground_truth"] ([[title, year], ...]) and seen titles from
    non_tensor_batch["extra_info"]["seen_titles"] (optional).
    """

    def __init__(self, tokenizer: Any, num_examine: int = 0, compute_score: Any = None,
                 reward_fn_key: str = "data_source", *, catalog: Container | None = None,
                 num_ranks: int = 20, kind: str = "exp_inf", gamma: float | None = None,
                 **kwargs: Any):
        from .rewards import catalog_reward_function

        if compute_score is not None:
            raise ValueError("RankCatalogRewardManager scores with the catalog; compute_score "
                             "must be None")
        self.tokenizer, self.num_examine, self.num_ranks = tokenizer, num_examine, num_ranks
        self.reward_fn_key = reward_fn_key
        self._score = catalog_reward_function(catalog, num_ranks=num_ranks, kind=kind,
                                              gamma=gamma)

    def __call__(self, data: Any, return_dict: bool = False):
        responses = data.batch["responses"]
        b, t = responses.shape
        attn = data.batch["attention_mask"]
        mask = attn[:, -t:].bool()
        texts = [self.tokenizer.decode(responses[i][mask[i]], skip_special_tokens=True)
                 for i in range(b)]
        nt = data.non_tensor_batch
        gts = [nt["reward_model"][i]["ground_truth"] for i in range(b)]
        extra = nt.get("extra_info", [{}] * b)
        seen = [(extra[i] or {}).get("seen_titles", []) for i in range(b)]
        per_rank = torch.tensor(self._score(completions=texts,
                                            groundtruth_with_release_year=gts,
                                            seen_titles=seen), dtype=torch.float32)
        seg = segment_ids_from_responses(responses, mask, self.tokenizer, self.num_ranks)
        reward = torch.zeros(b, t, dtype=torch.float32)
        for k in range(self.num_ranks):  # rank k's reward on the last token of item k
            pos = torch.where(seg == k, torch.arange(t).expand(b, t), -1).amax(-1)
            has = pos >= 0
            reward[has, pos[has]] += per_rank[has, k]
        if not return_dict:
            return reward
        eos_ids = self.tokenizer.eos_token_id
        return {"reward_tensor": reward,
                "reward_extra_info": {"rank_rewards": per_rank.tolist(),
                                      "rank_segment_ids": seg,
                                      "eos_mask": eos_mask_from_ids(responses, mask, eos_ids)}}


def register_reward_manager(name: str = "rankgrpo_catalog") -> None:
    """Register RankCatalogRewardManager in verl's reward-manager registry under `name`
    (needs verl.workers.reward_manager, which imports more of verl than core_algos)."""
    from verl.workers.reward_manager import register

    register(name)(RankCatalogRewardManager)
