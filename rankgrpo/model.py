"""Models: loading Hugging Face causal LMs, the hidden states and LM head the fused loss
needs, the frozen reference, and the hooks that keep DDP / FSDP / ZeRO-3 correct.

The loss never touches the model's logits: it takes the LAST hidden states (after the final
norm, `model.<base>(...)`) and the LM head weight (the embedding matrix when tied) and calls
`rankgrpo_kernels`, which never materialises [tokens x vocab].
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else _DTYPES[name]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(requested: str = "auto", device: str | torch.device = "cpu",
                               dtype: Any = None) -> str:
    """flash_attention_2 only when flash_attn imports, on CUDA, in half precision; else sdpa."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" and flash_attn_available() and dtype in (
            torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except Exception:  # noqa: BLE001 - a broken install falls back to sdpa
            pass
    return "sdpa"


def _hf_kwargs(cfg: ModelConfig) -> dict:
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    return kw


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The tokenizer, left padding (generation), with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    src = path or cfg.tokenizer_name_or_path or cfg.model_name_or_path
    if src is None:
        raise ValueError("no tokenizer: set model.tokenizer_name_or_path or "
                         "model.model_name_or_path")
    kw = _hf_kwargs(cfg) if (path is None and cfg.tokenizer_name_or_path is None) else {
        "trust_remote_code": cfg.trust_remote_code}
    if _generic_fast_tokenizer(src):
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(src)
    else:
        tok = AutoTokenizer.from_pretrained(src, **kw)
    prepare_tokenizer(tok)
    return tok


def _generic_fast_tokenizer(src: str) -> bool:
    """A folder whose tokenizer was saved as a plain `tokenizers` tokenizer (e.g. one trained
    in-process). AutoTokenizer would rebuild it as the model type's tokenizer class (a Qwen2
    config gives Qwen2Tokenizer, with another pre-tokenizer), so it is loaded as saved."""
    import json

    cfg_file = Path(src) / "tokenizer_config.json"
    if not (Path(src) / "tokenizer.json").exists() or not cfg_file.exists():
        return False
    try:
        cls = json.loads(cfg_file.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return cls in ("TokenizersBackend", "PreTrainedTokenizerFast")


def prepare_tokenizer(tokenizer) -> Any:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tiny_model(vocab_size: int, *, seed: int | None = None, **overrides):
    """A small random Qwen2 (tests and CPU demos). Defaults: hidden 64, 2 layers, tied
    embeddings; `overrides` are Qwen2Config keywords."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              tie_word_embeddings=True, rope_theta=10000.0)
    kw.update(overrides)
    kw["vocab_size"] = int(kw.get("vocab_size", vocab_size))
    config = Qwen2Config(**kw)
    config._attn_implementation = "sdpa"
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Qwen2ForCausalLM(config)
    return Qwen2ForCausalLM(config)


def load_model(cfg: ModelConfig, path: str | None = None, *, device: str | None = None,
               tokenizer=None, seed: int | None = None):
    """Any HF causal LM from `path` (default cfg.model_name_or_path; a local folder, a hub id,
    or a GGUF file via cfg.gguf_file), or a random tiny Qwen2 when cfg.tiny is set and no
    path is given."""
    src = path or cfg.model_name_or_path
    if src is None and cfg.tiny is not None:
        if tokenizer is None:
            raise ValueError("model.tiny needs the tokenizer (its vocabulary size)")
        model = build_tiny_model(len(tokenizer), seed=seed, **cfg.tiny)
        dtype = resolve_dtype(cfg.dtype)
        if dtype != "auto":
            model = model.to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        dtype = resolve_dtype(cfg.dtype)
        kw = _hf_kwargs(cfg) if path is None else {"trust_remote_code": cfg.trust_remote_code}
        if path is not None and cfg.gguf_file and Path(path, cfg.gguf_file).exists():
            kw["gguf_file"] = cfg.gguf_file
        attn = choose_attn_implementation(cfg.attn_implementation, device or "cpu",
                                          None if dtype == "auto" else dtype)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation=attn,
                                                     **kw)
        if "gguf_file" in kw:
            _forget_gguf_quantizer(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if device is not None:
        model = model.to(device)
    return model


def _forget_gguf_quantizer(model) -> None:
    """transformers dequantizes a GGUF file into ordinary float weights but keeps a "gguf"
    quantizer tag that makes save_pretrained refuse; the trained model is a plain one."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass


def base_model(model):
    """The decoder stack whose `last_hidden_state` is after the final norm (`model.model`
    for Llama/Qwen2/...)."""
    prefix = getattr(model, "base_model_prefix", "model")
    base = getattr(model, prefix, None)
    if base is None and hasattr(model, "get_decoder"):
        base = model.get_decoder()
    if base is None:
        raise TypeError(f"{type(model).__name__} has no base model at .{prefix}")
    return base


def output_embeddings(model) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no linear LM head")
    return head


def lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the LM head; with tied embeddings the weight is
    the input embedding matrix (the same Parameter), so its gradient reaches it."""
    head = output_embeddings(model)
    weight = head.weight
    if getattr(weight, "ds_numel", None) is not None and weight.numel() == 0:
        raise RuntimeError("the LM head weight is partitioned by DeepSpeed ZeRO-3; read it "
                           "inside `gathered_lm_head(model)`")
    return weight, getattr(head, "bias", None)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (what `generate` uses)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_hidden_states(model, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] hidden states after the final norm, positions from the mask."""
    out = base_model(model)(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask),
                            use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def frozen_copy(model, dtype: torch.dtype | None = None):
    """A frozen reference: a deep copy, eval mode, no gradients."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        ref = ref.to(dtype)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def generation_eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for src in (tokenizer.eos_token_id, getattr(gen, "eos_token_id", None)):
        if src is None:
            continue
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("no EOS token id: the tokenizer and generation config define none")
    return ids


# ----------------------------------------------------------------------------- distributed

def call_through_wrapper(wrapped, inner, fn: Callable, *args, **kwargs):
    """Run `fn(*args, **kwargs)` as if it were `inner.forward`, called through the
    DDP/FSDP/DeepSpeed wrapper `wrapped`, so the wrapper's forward hooks run (DDP prepares
    its gradient all-reduce; FSDP unshards the root's parameters, the LM head among them).
    FSDP2 shards in place (`wrapped is inner`): its root's forward hooks are run the same way.
    Without a wrapper it is a plain call."""
    if wrapped is inner and not is_fsdp2_module(inner):
        return fn(*args, **kwargs)
    original = inner.forward

    def redirected(*_a, **_k):
        inner.forward = original
        return fn(*args, **kwargs)

    inner.forward = redirected
    try:
        return wrapped()
    finally:
        inner.forward = original


def is_fsdp2_module(module) -> bool:
    """True for a module `torch.distributed.fsdp.fully_shard` (FSDP2) has sharded."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_zero3(accelerator) -> bool:
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", 0) == 3


@contextlib.contextmanager
def gathered_lm_head(model, accelerator=None):
    """Make the full LM head weight readable for the fused loss.

    Plain / DDP: nothing to do. DeepSpeed ZeRO-3: `deepspeed.zero.GatheredParameters` over
    the head's weight and bias (keep the context open through backward, so autograd sees
    the full tensor and DeepSpeed's gradient hooks reduce-scatter it). FSDP: call the loss
    through `call_through_wrapper`, which runs the wrapper's forward hooks; the LM head must
    be in a unit that is whole after the base model's forward: the root unit, or (accelerate's
    FSDP2) one unit with the final norm and embeddings that is not resharded after forward.
    FSDP2 is tested on CPU (tests/test_hardening_fsdp.py); ZeRO-3 and FSDP1 are NOT TESTED
    here (no GPUs, no DeepSpeed): the code paths exist behind these checks.
    """
    if accelerator is None or not is_zero3(accelerator):
        yield
        return
    import deepspeed  # only reached under ZeRO-3

    head = output_embeddings(model)
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextlib.contextmanager
def quiet_hf_saving():
    """No transformers progress bar ("Writing model shards") while saving: the run's own bar
    and log say what is saved."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_pretrained(model, tokenizer, path: str | os.PathLike, accelerator=None) -> None:
    """Save an HF folder (weights gathered under ZeRO-3/FSDP) that `load_model` reads."""
    path = Path(path)
    if accelerator is not None:
        state = accelerator.get_state_dict(model)
        unwrapped = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            with quiet_hf_saving():
                unwrapped.save_pretrained(path, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)
        accelerator.wait_for_everyone()
        return
    with quiet_hf_saving():
        model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
