"""RankGRPOTrainer against TRL's own GRPOTrainer loss (TRL >= 1.16, CPU, tiny model).

The parity grid is TRL's own list of loss types x importance-sampling levels, read from its
GRPOConfig; a combination our support table (TRL_LOSS_TYPES / TRL_OPTIONS) refuses must raise
the error that names it, a supported one must give TRL's loss, gradient and metrics in fp32.
When a kernel variant lands and its row turns supported, its case becomes a parity check.
"""

import copy
import math
import re

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from rankgrpo.integrations import UnsupportedOptionError, catalog_reward_function  # noqa: E402
from rankgrpo.integrations.trl import (  # noqa: E402
    TRL_LOSS_TYPES,
    TRL_OPTIONS,
    RankGRPOConfig,
    RankGRPOTrainer,
)
from rankgrpo.model import build_tiny_model  # noqa: E402
from rankgrpo.tiny import build_tokenizer  # noqa: E402

ITEMS = [f"Film{i} ({1980 + i})" for i in range(24)]
PROMPTS = ["recommend films like alien", "something like heat", "films like up",
           "films like jaws"]


def _trl_choices(field_name: str) -> list[str]:
    """The quoted values TRL's GRPOConfig help text lists for a field."""
    help_text = trl.GRPOConfig.__dataclass_fields__[field_name].metadata["help"]
    m = re.search(r"Supported values are (.*?)\.\s", help_text)
    head = m.group(1) if m else help_text.split("Possible values")[0]
    return list(dict.fromkeys(re.findall(r"'(\w+)'", head)))


TRL_LOSSES = _trl_choices("loss_type")
TRL_LEVELS = [v for v in _trl_choices("importance_sampling_level") if v in ("token", "sequence")]


def test_grid_read_from_trl_is_covered_by_our_table():
    assert {"grpo", "dapo", "dr_grpo", "bnpo"} <= set(TRL_LOSSES), TRL_LOSSES
    assert TRL_LEVELS == ["token", "sequence"]
    missing = [lt for lt in TRL_LOSSES if lt not in TRL_LOSS_TYPES]
    assert not missing, f"TRL loss types without a row in TRL_LOSS_TYPES: {missing}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer(ITEMS, texts=PROMPTS)
    model = build_tiny_model(len(tok), seed=0, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d), tok


def _config(cls, out, **kw):
    base = dict(output_dir=str(out), use_cpu=True, bf16=False, report_to=[],
                save_strategy="no", max_steps=2, per_device_train_batch_size=4,
                num_generations=2, max_completion_length=10, logging_steps=1, seed=0,
                temperature=0.9, gradient_checkpointing=False)
    base.update(kw)
    return cls(**base)


def _length_reward(completions, **kw):
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def batch_trainer(world, tmp_path_factory):
    """One trainer (with a reference model, beta > 0) and one generated batch whose old
    log-probs are perturbed so that ratios leave 1 and both clip sides are hit."""
    path, tok = world
    cfg = _config(RankGRPOConfig, tmp_path_factory.mktemp("out"), beta=0.05,
                  use_bias_correction_kl=False, epsilon=0.1, epsilon_high=0.15,
                  gradient_accumulation_steps=2)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    tr = RankGRPOTrainer(model=path, reward_funcs=_length_reward, args=cfg, train_dataset=ds,
                         processing_class=tok)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 2
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(2)]
    inputs = tr._generate_and_score_completions(rows)
    g = torch.Generator().manual_seed(1)
    ref_lp = inputs.get("old_per_token_logps")
    if ref_lp is None:  # on-policy: TRL skipped the old log-probs; make some
        with torch.no_grad():
            ref_lp = inputs["ref_per_token_logps"].clone()
    inputs["old_per_token_logps"] = ref_lp + 0.15 * torch.randn(ref_lp.shape, generator=g)
    # The reference equals the untrained policy: move it so the KL term is not 0.
    inputs["ref_per_token_logps"] = ref_lp + 0.3 * torch.randn(ref_lp.shape, generator=g)
    # Rows of different lengths, so grpo / bnpo / dr_grpo / dapo / luspo differ.
    m = inputs["completion_mask"].clone()
    for row, keep in enumerate((10, 7, 3, 9)):
        m[row, keep:] = 0
    inputs["completion_mask"] = m
    assert inputs["completion_mask"].sum() > 4
    return tr, inputs


def _loss_and_grad(fn, tr, inputs):
    tr.model.zero_grad(set_to_none=True)
    for k in list(tr._metrics["train"]):
        tr._metrics["train"][k].clear()
    loss = fn(tr.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters()
             if p.grad is not None}
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items() if v}
    return loss.detach(), grads, metrics


def _set(tr, level, loss_type, beta, delta=None, **options):
    from rankgrpo.integrations.trl import check_trl_args

    for obj in (tr, tr.args):
        obj.loss_type, obj.importance_sampling_level = loss_type, level
    tr.beta = tr.args.beta = beta
    tr.args.delta = delta
    # TRL's default bias-corrected KL at the token level, the plain k3 at the sequence level
    tr.args.use_bias_correction_kl = level == "token"
    for name in ("top_entropy_quantile", "off_policy_mask_threshold", "entropy_coef"):
        value = options.get(name, {"top_entropy_quantile": 1.0, "entropy_coef": 0.0}.get(name))
        setattr(tr, name, value)
        setattr(tr.args, name, value)
    tr._entropy_bonus_enabled = tr.entropy_coef != 0.0
    tr._route = check_trl_args(tr.args)


def _compare(tr, inputs, tag):
    l_ref, g_ref, m_ref = _loss_and_grad(
        lambda m, x: trl.GRPOTrainer._compute_loss(tr, m, x), tr, inputs)
    l_our, g_our, m_our = _loss_and_grad(tr._compute_loss, tr, inputs)
    n_ref = torch.sqrt(sum((g.double() ** 2).sum() for g in g_ref.values()))
    n_our = torch.sqrt(sum((g.double() ** 2).sum() for g in g_our.values()))
    assert g_ref.keys() == g_our.keys()
    gerr = max(float((g_ref[k] - g_our[k]).abs().max()) for k in g_ref) / float(n_ref)
    lerr = abs(float(l_ref - l_our))
    print(f"PARITY {tag} loss {float(l_ref):.6g} abs err {lerr:.2e}; grad norm "
          f"{float(n_ref):.6g} vs {float(n_our):.6g}; max |dgrad| / |grad| {gerr:.2e}")
    assert lerr <= 1e-5 * max(1.0, abs(float(l_ref))), (l_ref, l_our)
    assert abs(float(n_ref - n_our)) <= 1e-5 * float(n_ref)
    assert gerr <= 1e-5
    assert set(m_ref) <= set(m_our), (m_ref.keys(), m_our.keys())
    for k, v in m_ref.items():
        assert math.isclose(v, m_our[k], rel_tol=1e-4, abs_tol=1e-5), (k, v, m_our[k])
    return m_ref


@pytest.mark.parametrize("level", TRL_LEVELS)
@pytest.mark.parametrize("loss_type", TRL_LOSSES)
def test_loss_grad_metrics_match_trl(batch_trainer, level, loss_type):
    from rankgrpo.integrations.trl import check_trl_args

    tr, inputs = batch_trainer
    route = TRL_LOSS_TYPES[loss_type]
    if isinstance(route, str):  # refused today: the check names it (config: see the end)
        args = copy.copy(tr.args)
        args.loss_type, args.importance_sampling_level = loss_type, level
        with pytest.raises(UnsupportedOptionError, match=f"loss_type='{loss_type}'"):
            check_trl_args(args)
        return
    # KL on everywhere; the two-sided cap (delta) on at the token level.
    beta, delta = (0.05, 1.3) if level == "token" else (0.05, None)
    _set(tr, level, loss_type, beta, delta)
    m_ref = _compare(tr, inputs, f"{level} {loss_type} beta={beta} delta={delta} "
                                 f"bias_corrected_kl={tr.args.use_bias_correction_kl}")
    if "clip_ratio/region_mean" in m_ref and level == "token":
        assert m_ref["clip_ratio/region_mean"] > 0


# Settings that switch each refusable option on; the table decides raise vs. run.
ACTIVATE = {
    "use_bias_correction_kl": dict(beta=0.05, use_bias_correction_kl=True),
    "top_entropy_quantile": dict(top_entropy_quantile=0.5),
    "off_policy_mask_threshold": dict(off_policy_mask_threshold=0.5),
    "entropy_coef": dict(entropy_coef=0.01),
    "use_adaptive_entropy": dict(use_adaptive_entropy=True),
    "vllm_importance_sampling_correction": dict(use_vllm=True,
                                                vllm_importance_sampling_correction=True),
}


@pytest.mark.parametrize("name,value", [("top_entropy_quantile", 0.5),
                                        ("off_policy_mask_threshold", 0.02),
                                        ("entropy_coef", 0.03)])
def test_option_parity(batch_trainer, name, value):
    """Options the kernel implements, switched on one at a time: TRL's loss and gradient."""
    row = next(o for o in TRL_OPTIONS if o.name == name)
    if not row.supported:
        pytest.skip(f"{name} is refused today (see test_refused_options_name_themselves)")
    tr, inputs = batch_trainer
    try:
        _set(tr, "token", "dapo", 0.05, None, **{name: value})
        _compare(tr, inputs, f"token dapo {name}={value}")
    finally:
        _set(tr, "token", "dapo", 0.05, None)


def _trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16's importance_sampling_ratio as _generate_and_score_completions builds it from
    vLLM's sampler log-probs (written out here, independent of the kernel's own)."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    r = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(r, min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return r.masked_fill((r < lo) | (r > hi), 0.0)


# every mode once; vespo takes the weights into its gamma weight (token modes only)
IS_CASES = [("token", "dapo", "token_truncate"), ("token", "bnpo", "sequence_truncate"),
            ("sequence", "grpo", "sequence_mask"), ("token", "vespo", "token_mask")]


@pytest.mark.parametrize("level,loss_type,mode", IS_CASES)
def test_vllm_importance_sampling_parity(batch_trainer, level, loss_type, mode):
    """vLLM's truncated / masked IS correction: a batch carrying the sampler's log-probs and
    TRL's importance_sampling_ratio (as TRL builds them with use_vllm=True), TRL's loss,
    gradient and metrics against ours; the correction must change TRL's loss (not vacuous)."""
    tr, inputs = batch_trainer
    g = torch.Generator().manual_seed(3)
    old = inputs["old_per_token_logps"]
    sampling = old + 0.1 * torch.randn(old.shape, generator=g)
    sampling[0, 1] = float("nan")  # a token vLLM gave no log-prob for: ratio 1
    mask = inputs["completion_mask"].float()
    clip_min, clip_max = (0.93, 1.08) if mode.startswith("token") else (0.85, 1.05)
    ratio = _trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max)
    m = mask.bool()
    r = ratio.expand_as(m)[m]
    assert bool((r != 1).any()), "no token's weight moved: the case would not test anything"
    if mode.endswith("truncate"):
        assert bool(((r == clip_min) | (r == clip_max)).any()), "no weight truncated"
    else:
        assert bool((r == 0).any()), "no weight masked"
    batch = dict(inputs, sampling_per_token_logps=sampling, importance_sampling_ratio=ratio)
    names = ("use_vllm", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
             "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max")
    saved = [(o, n, getattr(o, n)) for o in (tr, tr.args) for n in names if hasattr(o, n)]
    try:
        _set(tr, level, loss_type, 0.05, None)
        plain = trl.GRPOTrainer._compute_loss(tr, tr.model, inputs).detach()
        for obj in (tr, tr.args):
            obj.use_vllm, obj.vllm_importance_sampling_correction = True, True
            obj.vllm_importance_sampling_mode = mode
            obj.vllm_importance_sampling_clip_min = clip_min
            obj.vllm_importance_sampling_clip_max = clip_max
        _set(tr, level, loss_type, 0.05, None)  # the option table accepts the config now
        _compare(tr, batch, f"{level} {loss_type} vllm IS {mode} [{clip_min}, {clip_max}]")
        corrected = trl.GRPOTrainer._compute_loss(tr, tr.model, batch).detach()
        assert abs(float(corrected - plain)) > 1e-6, (plain, corrected)
    finally:
        for o, n, v in saved:
            setattr(o, n, v)
        _set(tr, "token", "dapo", 0.05, None)


def test_adaptive_entropy_controller_parity(batch_trainer):
    """use_adaptive_entropy over three optimizer steps of two micro-batches each (different
    token counts, so the window sums matter), driven through accelerate's sync_gradients as
    TRL's training loop does: TRL's and our loss, gradient, logged entropy_coef and controller
    state after each step. The target is moved before step 3 so that the coefficient is
    raised (steps 1-2), applied (step 2) and withheld and lowered (step 3)."""
    tr, inputs = batch_trainer
    short = dict(inputs, completion_mask=inputs["completion_mask"].clone())
    short["completion_mask"][:, 4:] = 0
    micro = [inputs, short]
    names = ("use_adaptive_entropy", "entropy_target", "entropy_coef_delta", "entropy_coef_max",
             "entropy_coef_min")
    saved = [(tr.args, n, getattr(tr.args, n)) for n in names]
    saved.append((tr, "use_adaptive_entropy", tr.use_adaptive_entropy))
    gs = tr.accelerator.gradient_state

    def run(fn):
        tr.entropy_coef, tr._last_world_entropy = 0.02, float("inf")
        tr._entropy_window_stats = None
        tr.args.entropy_target = 100.0
        out = []
        for step in range(3):
            if step == 2:
                tr.args.entropy_target = 0.0
            for k, x in enumerate(micro):
                gs._set_sync_gradients(k == len(micro) - 1)
                loss, grads, metrics = _loss_and_grad(fn, tr, x)
                out.append((loss, grads, metrics, tr.entropy_coef, tr._last_world_entropy))
        return out

    try:
        _set(tr, "token", "dapo", 0.05, None, entropy_coef=0.02)
        tr.use_adaptive_entropy = tr.args.use_adaptive_entropy = True
        tr._entropy_bonus_enabled = True
        tr.args.entropy_coef_delta, tr.args.entropy_coef_max = 0.05, 1.0
        tr.args.entropy_coef_min = 0.0
        _set(tr, "token", "dapo", 0.05, None, entropy_coef=0.02)
        tr._entropy_bonus_enabled = True
        theirs = run(lambda m, x: trl.GRPOTrainer._compute_loss(tr, m, x))
        ours = run(tr._compute_loss)
    finally:
        gs._set_sync_gradients(True)
        for o, n, v in saved:
            setattr(o, n, v)
        _set(tr, "token", "dapo", 0.05, None)
    coefs = [t[3] for t in theirs[1::2]]
    assert coefs == pytest.approx([0.07, 0.12, 0.07]), coefs  # up, up, down
    applied = []
    for i, ((lt, gt, mt, ct, et), (lo, go, mo, co, eo)) in enumerate(zip(theirs, ours)):
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gt.values()))
        gerr = max(float((gt[k] - go[k]).abs().max()) for k in gt) / float(norm)
        print(f"ADAPTIVE step {i // 2 + 1} micro {i % 2 + 1}: loss {float(lt):.8g} vs "
              f"{float(lo):.8g}, max |dgrad| / |grad| {gerr:.2e}, entropy_coef {ct:.3g} vs "
              f"{co:.3g}, last world entropy {et:.6g} vs {eo:.6g}")
        assert abs(float(lt - lo)) <= 1e-5 * max(1.0, abs(float(lt)))
        assert gerr <= 1e-5
        assert ct == co
        assert (math.isinf(et) and math.isinf(eo)) or math.isclose(et, eo, rel_tol=1e-5)
        assert mt.keys() <= mo.keys()
        for k, v in mt.items():
            assert math.isclose(v, mo[k], rel_tol=1e-4, abs_tol=1e-5), (k, v, mo[k])
        # dapo's policy_loss is the loss before the bonus (TRL divides it by nothing else)
        applied.append(float(lt) - mt["policy_loss"])
    # step 2 applied the bonus (loss below the policy loss), steps 1 and 3 did not
    assert all(a < -1e-6 for a in applied[2:4]), applied
    assert all(abs(a) < 1e-7 for a in applied[:2] + applied[4:]), applied


@pytest.mark.parametrize("name", sorted(ACTIVATE))
def test_refused_options_name_themselves(name, tmp_path):
    row = next(o for o in TRL_OPTIONS if o.name == name)
    if row.supported:
        checked_by = {"use_adaptive_entropy": "test_adaptive_entropy_controller_parity",
                      "vllm_importance_sampling_correction":
                          "test_vllm_importance_sampling_parity"}
        pytest.skip(f"{name} is supported now: "
                    f"{checked_by.get(name, 'test_option_parity / the grid')} checks it")
    with pytest.raises(UnsupportedOptionError, match=name):
        _config(RankGRPOConfig, tmp_path, **ACTIVATE[name])


def test_router_aux_loss_and_zero3_are_refused_by_name(batch_trainer, monkeypatch):
    """The two refusals a CPU config cannot switch on: the MoE router loss (needs an MoE
    model: its row's check on a config whose trainer found the aux loss enabled) and DeepSpeed
    ZeRO-3 (its sharded LM head weight), raised where the trainer meets them."""
    import types

    from rankgrpo.integrations.trl import check_trl_args

    args = copy.copy(batch_trainer[0].args)
    args._rankgrpo_aux_loss_enabled = True
    with pytest.raises(UnsupportedOptionError, match="^router_aux_loss_coef"):
        check_trl_args(args)
    import transformers.integrations.deepspeed as ds

    tr = batch_trainer[0]
    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(UnsupportedOptionError, match="ZeRO-3"):
        tr._head(types.SimpleNamespace(config=tr._causal_lm(tr.model).config))


def test_docs_table_in_sync():
    from pathlib import Path

    from rankgrpo.integrations._support import table_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    assert table_markdown(TRL_OPTIONS) in doc, "regenerate the TRL table in the doc"


def test_every_refused_option_has_an_activation():
    # router_aux_loss_coef needs an MoE model; the rest are switched on by a config alone
    refusable = {o.name for o in TRL_OPTIONS
                 if not o.supported and o.raises and o.name != "router_aux_loss_coef"}
    assert refusable <= set(ACTIVATE), refusable - set(ACTIVATE)


def test_default_grpo_config_trains_like_trl(world, tmp_path):
    """trl.GRPOTrainer and RankGRPOTrainer from the same seed, data and TRL's default loss
    (dapo, token level), with gradient accumulation and two iterations per generation:
    the logged losses and gradient norms agree step by step."""
    path, tok = world
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    logs = []
    for cls in (trl.GRPOTrainer, RankGRPOTrainer):
        cfg = _config(trl.GRPOConfig, tmp_path / cls.__name__, gradient_accumulation_steps=2,
                      per_device_train_batch_size=2, num_iterations=2, learning_rate=1e-3)
        tr = cls(model=path, reward_funcs=_length_reward, args=cfg, train_dataset=ds,
                 processing_class=tok)
        tr.train()
        logs.append([h for h in tr.state.log_history if "loss" in h])
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs):
        print(f"E2E step {a['step']}: loss {a['loss']:.8g} vs {b['loss']:.8g}, grad_norm "
              f"{a['grad_norm']:.8g} vs {b['grad_norm']:.8g}")
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)
        assert math.isclose(a["entropy"], b["entropy"], rel_tol=1e-4)


def test_peft_lora_trains_like_trl(world, tmp_path):
    """PEFT (LoRA on the attention projections; TRL refuses lm_head itself): trl.GRPOTrainer
    and RankGRPOTrainer from the same seed and data log the same loss and gradient norm."""
    peft = pytest.importorskip("peft")
    path, tok = world
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    logs = []
    for cls in (trl.GRPOTrainer, RankGRPOTrainer):
        cfg = _config(trl.GRPOConfig, tmp_path / cls.__name__, max_steps=1,
                      per_device_train_batch_size=2, learning_rate=1e-3, beta=0.05)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               task_type="CAUSAL_LM", init_lora_weights=False)
        tr = cls(model=path, reward_funcs=_length_reward, args=cfg, train_dataset=ds,
                 processing_class=tok, peft_config=lora)
        tr.train()
        logs.append([h for h in tr.state.log_history if "loss" in h])
    for a, b in zip(*logs):
        print(f"PEFT step {a['step']}: loss {a['loss']:.8g} vs {b['loss']:.8g}, grad_norm "
              f"{a['grad_norm']:.8g} vs {b['grad_norm']:.8g}")
        assert a["grad_norm"] > 0
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4)


def _rank_dataset():
    gt = [[["Film1", "1981"], ["Film2", "1982"]], [["Film3", "1983"]],
          [["Film4", "1984"], ["Film5", "1985"]], [["Film6", "1986"]]]
    return datasets.Dataset.from_dict({"prompt": PROMPTS,
                                       "groundtruth_with_release_year": gt,
                                       "seen_titles": [[] for _ in PROMPTS]})


@pytest.mark.parametrize("opts", [dict(loss_type="rank", length_shaping=True),
                                  dict(loss_type="dapo", rank_segments="aligned",
                                       beta=0.05, use_bias_correction_kl=False)])
def test_rank_level_trains_end_to_end(world, tmp_path, opts):
    from rankgrpo.catalog import Catalog

    path, tok = world
    catalog = Catalog([(t.rsplit(" (", 1)[0], int(t[-5:-1])) for t in ITEMS])
    reward = catalog_reward_function(catalog, num_ranks=3, kind="log")
    cfg = _config(RankGRPOConfig, tmp_path, importance_sampling_level="rank", num_ranks=3,
                  learning_rate=1e-2, **opts)
    tr = RankGRPOTrainer(model=path, reward_funcs=[reward, _length_reward], args=cfg,
                         train_dataset=_rank_dataset(), processing_class=tok)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    seen = {}
    orig = tr._compute_loss

    def spy(model, inputs):
        seen["adv_shape"] = tuple(inputs["advantages"].shape)
        return orig(model, inputs)

    tr._compute_loss = spy
    tr.train()
    hist = [h for h in tr.state.log_history if "loss" in h]
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
    assert seen["adv_shape"][1] == 3  # per-rank advantages [B, N]
    assert "rewards/catalog_log/mean" in hist[0]
    changed = sum(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    assert changed > 0


def test_rank_level_loss_matches_logits_reference(world, tmp_path):
    """The rank-level loss on the fused path equals rank_grpo_loss(backend="reference") on
    log-probs taken from the full logits in float64 (independent of the fused kernels)."""
    from rankgrpo.tokens import newline_counts
    from rankgrpo_kernels import eos_mask_from_ids, rank_grpo_loss, segment_ids_from_newlines

    path, tok = world
    cfg = _config(RankGRPOConfig, tmp_path, importance_sampling_level="rank", num_ranks=3,
                  loss_type="rank", epsilon=0.1)
    tr = RankGRPOTrainer(model=path, reward_funcs=_length_reward, args=cfg,
                         train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                         processing_class=tok)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    inputs = tr._generate_and_score_completions([{"prompt": p} for p in PROMPTS[:2]
                                                 for _ in range(2)])
    b, t = inputs["completion_ids"].shape
    g = torch.Generator().manual_seed(2)
    inputs["advantages"] = torch.randn(b, 3, generator=g)
    old = torch.randn(b, t, generator=g) * 0.2 - 3.0
    inputs["old_per_token_logps"] = old
    loss = tr._compute_loss(tr.model, inputs).detach()
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logits = tr.model(input_ids=ids, attention_mask=am).logits[:, -t - 1:-1].double()
        lp = torch.log_softmax(logits / cfg.temperature, -1).gather(
            -1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
        mask = inputs["completion_mask"].bool()
        seg = segment_ids_from_newlines(inputs["completion_ids"], mask,
                                        newline_counts(tok, logits.shape[-1]), 3)
        eos = eos_mask_from_ids(inputs["completion_ids"], mask, tok.eos_token_id)
        ref, _ = rank_grpo_loss(lp, old.double(), inputs["advantages"].double(), seg, mask,
                                eos_mask=eos,
                                epsilon_low=0.1, epsilon_high=0.1, level="rank",
                                loss_type="rank", num_segments=4, backend="reference")
    print(f"RANK loss fused {float(loss):.8g} vs float64 reference {float(ref):.8g}")
    assert abs(float(loss) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's "Rank-GRPO in TRL" block, run as written (in a temporary directory)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Rank-GRPO in TRL", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert any(isinstance(v, type) and v.__name__ == "RankGRPOTrainer"
               for v in namespace.values())


@pytest.mark.parametrize("loss_type", [lt for lt in TRL_LOSSES
                                       if isinstance(TRL_LOSS_TYPES[lt], str)])
def test_refused_loss_types_fail_at_config_time(loss_type, tmp_path):
    # Last in the file: building TrainingArguments resets accelerate's shared state, which
    # the module-scoped trainer above relies on.
    with pytest.raises(UnsupportedOptionError, match=f"loss_type='{loss_type}'"):
        _config(RankGRPOConfig, tmp_path, loss_type=loss_type)
